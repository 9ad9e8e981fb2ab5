"""Fault injection: runs killed at random moments (SIGKILL, also inside checkpoint writes),
stopped by SIGTERM, starved of disk or handed a corrupt checkpoint, then resumed with the same
command. Every one must end at the weights and report of the uninterrupted reference run.

Each run is a process running tests/fault_runner.py (launch/unlearn.py with a fault installed)
on tiny-clip, forked from a forkserver that imported torch and the engine once; trials run two
at a time (this machine has two cores, each run one thread).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from cliperase.engine.checkpoint import checkpoint_problem, complete_checkpoints
from helpers import run_args, tiny_checkpoint, tiny_data  # noqa: F401

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
STEPS, SAVE_EVERY = 8, 3  # checkpoints at steps 3, 6 and 8: a kill loses up to 2 steps of work
N_KILL_TRIALS = 20


def _args(data: Path, ckpt: Path, out: Path, *extra: str) -> list:
    return run_args(data, out, pretrained=ckpt, steps=STEPS, save_every=SAVE_EVERY) + [
        "--set", "log_every=1", "--set", "keep_checkpoints=2", "--resume", *extra]


class _Result:
    def __init__(self, returncode: int, stderr: str):
        self.returncode, self.stderr = returncode, stderr


_CTX = multiprocessing.get_context("forkserver")
_CTX.set_forkserver_preload(["fault_runner"])


def _start(args: list, fault: dict, out: Path):
    import fault_runner

    out.parent.mkdir(parents=True, exist_ok=True)
    err = out.parent / f"{out.name}.stderr-{time.monotonic_ns()}"
    proc = _CTX.Process(target=fault_runner.child, args=(fault or {"kind": "none"}, args, str(err)))
    proc.start()
    return proc, err


def _finish(proc, err: Path, timeout: float = 300) -> _Result:
    proc.join(timeout)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
        raise AssertionError(f"run did not end in {timeout} s: {err.read_text()[-3000:]}")
    code = proc.exitcode if proc.exitcode >= 0 else 128 - proc.exitcode  # killed by signal N: 128 + N
    return _Result(code, err.read_text() if err.exists() else "")


def _run(args: list, fault: dict = None) -> _Result:
    out = Path(args[args.index("--output-dir") + 1])
    return _finish(*_start(args, fault, out))


def _kill_at(args: list, out: Path, step: int, delay: float, sig: int = signal.SIGKILL, *, group: bool = False) -> int:
    """Start a run; once its log shows `step`, wait `delay` s and send `sig` (to its whole process
    group, data workers included, with `group`, as Ctrl-C in a terminal does). Returns the exit code."""
    proc, err = _start(args, None, out)
    log = out / "log.jsonl"
    deadline = time.monotonic() + 300
    while proc.is_alive() and time.monotonic() < deadline:
        rows = log.read_text().splitlines() if log.exists() else []
        if rows and json.loads(rows[-1])["step"] >= step:
            time.sleep(delay)
            if proc.pid is not None and proc.is_alive():
                (os.killpg if group else os.kill)(proc.pid, sig)
            break
        time.sleep(0.005)
    return _finish(proc, err).returncode


def _weights(out: Path) -> dict:
    return torch.load(out / "model.pt", map_location="cpu", weights_only=True)


def _outcome(out: Path) -> dict:
    report = json.loads((out / "report.json").read_text())
    return {"after": report["after"], "final_losses": report["final_losses"], "before": report["before"]}


def _assert_same_as_reference(out: Path, reference: Path) -> float:
    """Same weights (returns the largest absolute difference), same metrics and final losses."""
    got, want = _weights(out), _weights(reference)
    assert got.keys() == want.keys()
    diff = max(float((got[k].float() - want[k].float()).abs().max()) for k in want)
    assert diff <= 1e-6, f"{out}: weights differ from the uninterrupted run by {diff}"
    assert _outcome(out) == _outcome(reference)
    log_steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert log_steps == list(range(1, STEPS + 1)), "log.jsonl holds each step once"
    for ckpt in complete_checkpoints(out / "checkpoints"):
        assert checkpoint_problem(ckpt) is None
    return diff


@pytest.fixture(scope="module")
def reference(tiny_data, tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "reference"
    result = _run(_args(tiny_data, tiny_checkpoint, out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _kill_trial(i: int, data: Path, ckpt: Path, root: Path) -> dict:
    """One trial: killed once or twice at random steps and moments (or inside a checkpoint
    write), resumed with the same command until it finishes."""
    rng = random.Random(1000 + i)
    out = root / f"trial{i:02d}"
    args = _args(data, ckpt, out)
    kills = []
    for _ in range(1 + (i % 3 == 0)):  # every third trial is killed twice
        if i % 4 == 1:  # inside a checkpoint write, at a random phase
            fault = {"kind": "kill_in_checkpoint", "call": rng.choice([1, 2]),
                     "phase": rng.choice(["model", "seal", "manifest", "rename"])}
            code = _run(args, fault).returncode
            kills.append(fault)
        else:
            step, delay = rng.randrange(1, STEPS), rng.uniform(0.0, 0.4)
            code = _kill_at(args, out, step, delay)
            kills.append({"after_step": step, "delay_s": round(delay, 3)})
        if code == 0:  # finished before the kill landed: still a valid trial of the resume path
            kills[-1]["finished_first"] = True
    result = _run(args)
    assert result.returncode == 0, f"trial {i} ({kills}): {result.stderr[-3000:]}"
    return {"trial": i, "kills": kills, "out": out,
            "partial_left": any(p.name.startswith(".") for p in (out / "checkpoints").iterdir())}


def test_killed_runs_resume_to_the_reference(reference, tiny_data, tiny_checkpoint, tmp_path):
    with ThreadPoolExecutor(max_workers=2) as pool:
        trials = list(pool.map(lambda i: _kill_trial(i, tiny_data, tiny_checkpoint, tmp_path), range(N_KILL_TRIALS)))
    diffs = [_assert_same_as_reference(t["out"], reference) for t in trials]
    killed = [t for t in trials if not all(k.get("finished_first") for k in t["kills"])]
    print(f"\n{len(trials)} trials, {len(killed)} killed before finishing, max weight difference {max(diffs):.3g}")
    for t in trials:
        print(f"  trial {t['trial']:2d}: {t['kills']}")
    assert len(trials) >= 20
    assert len(killed) >= 15, "most kills must land before the run ends, else the trials test little"


def test_sigterm_saves_a_checkpoint_and_resume_finishes(reference, tiny_data, tiny_checkpoint, tmp_path):
    out = tmp_path / "term"
    args = _args(tiny_data, tiny_checkpoint, out)
    code = _kill_at(args, out, 1, 0.0, sig=signal.SIGTERM)
    assert code == 128 + signal.SIGTERM
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "interrupted" and "SIGTERM" in run["error"]
    saved = complete_checkpoints(out / "checkpoints")
    assert saved and json.loads((saved[-1] / "manifest.json").read_text())["step"] < STEPS
    assert not (out / "model.pt").exists()
    assert _run(args).returncode == 0
    _assert_same_as_reference(out, reference)


def test_ctrl_c_to_the_process_group_saves_and_resumes(reference, tiny_data, tiny_checkpoint, tmp_path):
    """SIGINT to the run and its DataLoader workers at once: the workers ignore it, the run saves
    a checkpoint at the end of the step and exits 130."""
    out = tmp_path / "ctrlc"
    args = _args(tiny_data, tiny_checkpoint, out)
    assert _kill_at(args, out, 2, 0.0, sig=signal.SIGINT, group=True) == 128 + signal.SIGINT
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    assert complete_checkpoints(out / "checkpoints")
    assert _run(args).returncode == 0
    _assert_same_as_reference(out, reference)


def test_corrupt_checkpoint_is_detected_and_the_previous_one_used(reference, tiny_data, tiny_checkpoint, tmp_path):
    out = tmp_path / "corrupt"
    args = _args(tiny_data, tiny_checkpoint, out)
    assert _run(args).returncode == 0
    newest, previous = complete_checkpoints(out / "checkpoints")[-2:][::-1]
    target = newest / "model_optim.pt"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit pattern in the middle: same size, wrong content
    target.write_bytes(bytes(data))
    assert "sha256" in checkpoint_problem(newest)
    result = _run(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "passing over a checkpoint" in result.stderr and "model_optim.pt does not match" in result.stderr
    assert json.loads((out / "report.json").read_text())["resumed_from"] == str(previous)
    _assert_same_as_reference(out, reference)


@pytest.mark.parametrize("call", [1, 2])
def test_disk_full_during_a_checkpoint_is_a_clear_error_and_resumable(reference, tiny_data, tiny_checkpoint,
                                                                        tmp_path, call):
    out = tmp_path / "full"
    args = _args(tiny_data, tiny_checkpoint, out)
    result = _run(args, {"kind": "enospc", "call": call})
    assert result.returncode == 1
    assert "No space left on device" in result.stderr and "--resume" in result.stderr
    assert "Traceback" not in result.stderr
    for ckpt in complete_checkpoints(out / "checkpoints"):  # nothing half-written looks complete
        assert checkpoint_problem(ckpt) is None
    assert len(complete_checkpoints(out / "checkpoints")) == call - 1
    assert _run(args).returncode == 0
    _assert_same_as_reference(out, reference)


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_real_full_disk(reference, tiny_data, tiny_checkpoint, tmp_path):
    """A size-limited directory (tmpfs; needs permission to mount): room for the logs and one
    checkpoint (55 MB), not two."""
    mnt = tmp_path / "small"
    if not _mount_tmpfs(mnt, "90m"):
        pytest.skip("cannot mount a size-limited tmpfs here (needs root / CAP_SYS_ADMIN); "
                    "test_disk_full_during_a_checkpoint_* covers the same path with a simulated ENOSPC")
    try:
        out = mnt / "run"
        args = _args(tiny_data, tiny_checkpoint, out)
        result = _run(args)
        assert result.returncode == 1, result.stderr[-3000:]
        assert "No space left on device" in result.stderr and "Traceback" not in result.stderr
        for ckpt in complete_checkpoints(out / "checkpoints"):
            assert checkpoint_problem(ckpt) is None
        subprocess.run(["mount", "-o", "remount,size=400m", str(mnt)], check=True)
        assert _run(args).returncode == 0
        _assert_same_as_reference(out, reference)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_resume_refuses_a_changed_setting(reference, tiny_data, tiny_checkpoint, tmp_path):
    out = tmp_path / "changed"
    assert _kill_at(_args(tiny_data, tiny_checkpoint, out), out, 4, 0.3) != 0
    result = _run(run_args(tiny_data, out, pretrained=tiny_checkpoint, steps=STEPS, save_every=SAVE_EVERY) +
                  ["--set", "log_every=1", "--lr", "3e-4", "--resume"])
    assert result.returncode == 2
    assert "lr: the run being resumed has 0.0001, now 0.0003" in result.stderr


def test_a_crash_while_removing_an_old_checkpoint_leaves_no_half_deleted_one(tmp_path, monkeypatch):
    """keep_checkpoints prunes old checkpoints; a kill in the middle of deleting one must not leave
    a `step_N` with its manifest and missing files (seen in the kill trials above)."""
    from cliperase.engine import checkpoint as C

    root = tmp_path / "checkpoints"

    def make(step):
        tmp = C.begin_checkpoint(root, step)
        for name in ("a.pt", "b.pt", "c.pt"):
            (tmp / name).write_bytes(os.urandom(64))
        return C.commit_checkpoint(tmp, {"step": step}, keep=1)

    make(1)
    real_rmtree = C.shutil.rmtree

    def killed_midway(path, *args, **kwargs):  # deletes one file, then the process is gone
        next(p for p in sorted(Path(path).rglob("*")) if p.is_file()).unlink()
        raise SystemExit("killed")

    monkeypatch.setattr(C.shutil, "rmtree", killed_midway)
    with pytest.raises(SystemExit):
        make(2)  # sealed, then killed while pruning step 1
    monkeypatch.setattr(C.shutil, "rmtree", real_rmtree)
    assert [p.name for p in complete_checkpoints(root)] == ["step_00000002"]
    assert checkpoint_problem(root / "step_00000002") is None
    assert list(root.glob(".step_*.removing")), "the half-deleted one is out of the step_N names"
    make(3)
    assert not list(root.glob(".step_*.removing")), "cleared by the next checkpoint write"
    assert [p.name for p in complete_checkpoints(root)] == ["step_00000003"]
