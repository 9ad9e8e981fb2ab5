"""Runs launch/unlearn.py with one injected fault, for tests/test_faults.py.

    FAULT='<fault json>' python tests/fault_runner.py <unlearn.py arguments...>

(an environment variable, not an argument: the deepspeed launcher puts its --local_rank first)

or, from the tests, `child(fault, argv, stderr_path)` as the target of a process forked from a
multiprocessing forkserver that has imported this module (and so torch, open_clip and the
engine) once: a run then starts in milliseconds instead of seconds.

Faults (the process dies by SIGKILL, as a kill -9 or an OOM killer would, or fails a write):
  {"kind": "none"}
  {"kind": "kill_in_checkpoint", "call": J, "phase": P}: die during the J-th checkpoint write
      (1-based) of this process, at phase P: "model" (half of the model/optimizer file written),
      "seal" (files written, while fsyncing them), "manifest" (before the manifest is written)
      or "rename" (manifest written, before the directory is renamed to step_N).
  {"kind": "kill_after_checkpoint", "call": J}: rank 0 dies right after sealing its J-th
      checkpoint (under the deepspeed launcher, which then stops the other ranks).
  {"kind": "enospc", "call": J}: the J-th checkpoint's model/optimizer write fails with
      ENOSPC after writing half its bytes, as a full disk does.
"""
from __future__ import annotations

import errno
import io
import json
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _install(fault: dict) -> None:
    import torch

    from cliperase.engine import checkpoint, trainer

    kind, call, phase = fault["kind"], fault.get("call", 1), fault.get("phase")
    if kind == "none":
        return
    if kind == "kill_after_checkpoint":  # rank 0 seals the checkpoint, then dies (the launcher ends the rest)
        from cliperase.engine import recipe

        real_commit, sealed = recipe.commit_checkpoint, {"n": 0}

        def commit(*args, **kwargs):
            path = real_commit(*args, **kwargs)
            sealed["n"] += 1
            if sealed["n"] == call:
                _die()
            return path

        recipe.commit_checkpoint = commit
        return
    calls = {"n": 0}
    real_save = trainer.TorchStepper.save

    def save(self, directory):
        calls["n"] += 1
        if calls["n"] != call or phase not in ("model", None):
            return real_save(self, directory)
        buf = io.BytesIO()
        torch.save({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}, buf)
        data = buf.getvalue()
        with open(Path(directory) / "model_optim.pt", "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            if kind == "enospc":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(directory) / "model_optim.pt"))
        _die()

    trainer.TorchStepper.save = save
    if kind != "kill_in_checkpoint" or phase == "model":
        return
    real_fsync, real_write_json, real_replace = checkpoint._fsync_file, checkpoint.write_json, checkpoint.os.replace

    def fsync_file(path):
        if phase == "seal" and calls["n"] == call:
            _die()
        return real_fsync(path)

    def write_json(obj, path):
        if phase == "manifest" and calls["n"] == call and Path(path).name == checkpoint.MANIFEST:
            _die()
        return real_write_json(obj, path)

    class _Os:  # checkpoint.os with replace() watched
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def replace(src, dst):
            if phase == "rename" and calls["n"] == call and str(src).endswith(".partial"):
                _die()
            return real_replace(src, dst)

    checkpoint._fsync_file, checkpoint.write_json, checkpoint.os = fsync_file, write_json, _Os()


from launch.unlearn import main as unlearn_main  # noqa: E402  (the preload: torch, open_clip, the engine)


def child(fault: dict, argv: list, stderr_path: str) -> None:
    """A run in a forked process: stderr to a file, one torch thread, the exit code of the CLI."""
    import torch

    os.setpgrp()  # its own process group, as a shell job: a test can signal the run and its workers together
    fd = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 2)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    torch.set_num_threads(1)
    # Children of a forkserver inherit its start method; DataLoader workers would then be
    # started through it (pickling the dataset, seconds each) instead of forked as in a CLI run.
    import multiprocessing

    multiprocessing.set_start_method("fork", force=True)
    _install(fault)
    sys.exit(unlearn_main(argv))


def main() -> int:
    _install(json.loads(os.environ.get("FAULT", '{"kind": "none"}')))
    return unlearn_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
