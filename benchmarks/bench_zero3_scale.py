"""The card's ZeRO-3 command at full model size on CPU (gloo), with each rank's peak RSS per phase.

    nice -n 5 .venv/bin/python benchmarks/bench_zero3_scale.py --model ViT-L-14 --ranks 1 2 \\
        --work /tmp/scale14/work --out benchmarks/results/cpu-zero3-ViT-L-14.json

For each rank count: 224-px synthetic pairs through open_clip's own preprocessing, a random-init
open_clip checkpoint FILE (so the `--pretrained FILE` path runs), then

    deepspeed --num_gpus R launch/unlearn.py --model M --pretrained FILE --zero-stage 3 \\
        --precision bf16 --grad-checkpointing --batch-size 2 --steps 3 --save-every 2 ...

killed (SIGKILL, the whole launcher group) once the step-2 checkpoint is sealed, then the same
command with --resume, which loads it, makes step 3 and exports model.pt. The export is loaded
with open_clip.create_model(M, pretrained=model.pt) and compared with DeepSpeed's own fp32
reconstruction of the step-3 checkpoint (zero_to_fp32: equal) and with the initial checkpoint
(moved). Per-rank, per-phase peak RSS comes from the runs' memory/rank_<r>.step_<s>.json
(engine.telemetry.MemoryPhases), beside the README memory plan's prediction of 16 bytes/param
divided by the ranks.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

GIB = 1024 ** 3


# CPU-sized ZeRO-3 buffers: DeepSpeed's defaults are sized for GPUs (a 5e8-element reduce bucket,
# optimizer sub-groups of 1e9 elements whose fp32 gradient and AdamW temporaries exist whole at
# the step). Smaller ones cost a few more collectives and cap those transients (~0.4 GB at 1e8).
def cpu_zero3(sub_group: int) -> dict:
    """The run's DeepSpeed config: `sub_group` elements per optimizer sub-group (whose fp32
    gradients and AdamW temporaries exist whole at the step) and as many live parameters, half
    that per reduce and prefetch bucket."""
    return {"zero_optimization": {"stage": 3, "sub_group_size": sub_group, "reduce_bucket_size": sub_group // 2,
                                  "stage3_prefetch_bucket_size": sub_group // 2, "stage3_max_live_parameters": sub_group}}


def make_data(root: Path, n_forget: int, n_retain: int, n_eval: int) -> Path:
    """224-px pairs: `n_forget` circles, `n_retain` of the other shapes, `n_eval` held out. Small on
    purpose: the frozen original embeds every pair once (the cache pass) at ~0.2-0.4 TFLOP each."""
    from cliperase.engine.tools.synthetic import SHAPES, generate, write_eval, write_pairs

    if (root / "done").is_file():
        return root
    write_pairs(list(generate(n_forget, 0, shapes=("circle",), prefix="forget-", size=224)), root / "forget")
    write_pairs(list(generate(n_retain, 1, shapes=SHAPES[1:], prefix="retain-", size=224)), root / "retain")
    write_eval(generate(n_eval, 2, prefix="eval-", size=224), root / "eval", SHAPES)
    (root / "done").write_text("")
    return root


def make_checkpoint(model: str, path: Path) -> Path:
    """open_clip's random init of `model` (seed 0) as a plain state dict, in a child process so
    this one never holds the model."""
    if not path.is_file():
        code = ("import sys, torch, open_clip; torch.manual_seed(0); "
                "m = open_clip.create_model(sys.argv[1], pretrained=None); torch.save(m.state_dict(), sys.argv[2])")
        subprocess.run([sys.executable, "-c", code, model, str(path)], check=True)
    return path


def mem_available_gib() -> float:
    """MemAvailable of /proc/meminfo: what other tenants left this run (the machine is shared)."""
    with open("/proc/meminfo") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    return round(kib / 1024 ** 2, 2)


def unlearn_args(model: str, ckpt: Path, data: Path, out: Path, cfg: Path, steps: int, precision: str) -> list:
    return ["--model", model, "--pretrained", str(ckpt), "--zero-stage", "3", "--precision", precision,
            "--grad-checkpointing", "--forget-data", str(data / "forget"), "--retain-data", str(data / "retain"),
            "--eval-data", str(data / "eval"), "--forget-classes", "circle", "--batch-size", "2",
            "--steps", str(steps), "--save-every", "2", "--lr", "1e-4", "--output-dir", str(out), "--no-progress",
            "--deepspeed-config", str(cfg), "--set", "log_every=1", "--set", "keep_checkpoints=1",
            "--set", "eval_batch_size=8", "--set", "warmup_steps=0",
            # no data-loader processes: each is ~0.4 GB that a 24 GiB box running 2 ViT-H ranks lacks,
            # and 2 + 2 pairs a step are decoded in milliseconds
            "--set", "data_workers=0"]


def matmul_rates() -> dict:
    """GFLOP/s of one 1024^3 matmul per dtype, one thread, and the CPU's bf16 flags: a bf16 step
    at full model size finishes only where bf16 runs at least as fast as fp32 (on an AVX2-only
    CPU it crawled; --precision fp32 is the way there)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rates = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
        a @ b
        t0, reps = time.perf_counter(), 0
        while time.perf_counter() - t0 < 2.0:
            a @ b
            reps += 1
        rates[name] = round(2 * 1024 ** 3 * reps / (time.perf_counter() - t0) / 1e9, 1)
    torch.set_num_threads(threads)
    with open("/proc/cpuinfo") as info:
        flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    rates["cpu_bf16_flags"] = sorted(flag for flag in flags if "bf16" in flag or flag.startswith("amx"))
    return rates


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(ranks: int, args: list, log, *, kill_after: Path = None) -> dict:
    """One launcher run; with `kill_after`, the launcher's whole process group is SIGKILLed as
    soon as that file exists. Returns rc and wall time."""
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(_free_port()),
           "launch/unlearn.py", *args]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    killed = False
    while proc.poll() is None:
        if kill_after is not None and kill_after.is_file():  # step_N/ appears by rename, once sealed
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
            proc.wait()
            break
        time.sleep(0.2)
    return {"command": " ".join(["deepspeed", *cmd[1:]]), "rc": proc.returncode, "killed": killed,
            "wall_s": round(time.time() - t0, 1)}


def check_export(model: str, out: Path, ckpt: Path) -> dict:
    """The export loads in open_clip; it equals DeepSpeed's fp32 reconstruction of the last
    checkpoint; it moved away from the initial weights."""
    import open_clip
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from cliperase.engine.models import register_configs

    register_configs()
    exported = open_clip.create_model(model, pretrained=str(out / "model.pt")).state_dict()
    last = sorted((out / "checkpoints").glob("step_*"))[-1]
    # zero_to_fp32 names the engine's module (engine.models.Towers): "clip." + open_clip's names.
    reference = {k.removeprefix("clip."): v for k, v in
                 get_fp32_state_dict_from_zero_checkpoint(str(last.parent), tag=last.name).items()}
    worst = max(float((exported[k] - v.reshape(exported[k].shape).float()).abs().max()) for k, v in reference.items())
    compared = len(reference)
    del reference
    initial = torch.load(ckpt, map_location="cpu", mmap=True, weights_only=True)
    key = "visual.transformer.resblocks.0.attn.in_proj_weight"
    return {"loads_in_open_clip": True, "checked_against": str(last.name),
            "max_abs_diff_vs_zero_to_fp32": worst,
            "parameters_compared": compared, "state_dict_entries": len(exported),
            "weight_checked": key, "max_abs_change_from_initial": float((exported[key] - initial[key]).abs().max())}


def memory_rows(out: Path) -> dict:
    rows = {}
    for f in sorted((out / "memory").glob("rank_*.json")):
        d = json.loads(f.read_text())
        rows[f"rank{d['rank']}.from_step_{d['start_step']}"] = [
            {k: v for k, v in r.items() if k != "peak_is_per_phase"} for r in d["phases"]]
    return rows


def plan(n_params: int, ranks: int) -> dict:
    """The README memory plan: ZeRO-3 + bf16 holds 2 (bf16 weights) + 2 (gradients) + 12 (fp32
    master + Adam moments) bytes/param divided by the ranks, and fp32 4 + 4 + 8: 16 either way;
    the teacher costs nothing with the cache. Activations at batch 2 + 2 with grad checkpointing
    are a few MB and left out."""
    return {"bytes_per_param_per_rank": 16 / ranks, "model_state_bytes_per_rank": 16 * n_params / ranks}


def summarize(result: dict) -> dict:
    """Per rank count: each phase's largest peak RSS over ranks and runs (GiB), the peak per
    parameter per rank, and the plan's model-state bytes beside them."""
    n = result["parameters"]
    out = {}
    for ranks, got in result["by_ranks"].items():
        phases = {}
        for rows in got["memory"].values():
            for row in rows:
                name = row["phase"] + (f" {row['step']}" if "step" in row else "")
                phases[name] = max(phases.get(name, 0), row["peak_rss_bytes"])
        peak = max(phases.values())
        out[ranks] = {"peak_rss_gib_by_phase": {k: round(v / GIB, 2) for k, v in phases.items()},
                      "peak_rss_gib": round(peak / GIB, 2), "peak_bytes_per_param_per_rank": round(peak / n, 2),
                      "plan_model_state_gib_per_rank": round(16 * n / int(ranks) / GIB, 2)}
    return out


def run_one(model: str, ranks: int, ckpt: Path, data: Path, work: Path, cfg: Path, steps: int, resume: bool,
            precision: str) -> dict:
    """`resume`: kill after the step-2 checkpoint and resume (else one uninterrupted run)."""
    out = work / f"run-{model}-{ranks}r-{precision}"
    args = unlearn_args(model, ckpt, data, out, cfg, steps, precision)
    with open(out.with_suffix(".log"), "w") as log:
        runs = [launch(ranks, args, log, kill_after=out / "checkpoints" / "step_00000002" / "manifest.json"
                       if resume else None)]
        if resume:
            runs.append(launch(ranks, args + ["--resume"], log))
    result = {"ranks": ranks, "steps": steps, "runs": runs, "memory": memory_rows(out)}
    if runs[-1]["rc"] == 0:
        result["export"] = check_export(model, out, ckpt)
        result["report_wall_s"] = json.loads((out / "report.json").read_text())["wall_s"]
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--summarize", action="store_true", help="only add the summary to an existing --out file")
    p.add_argument("--ranks", type=int, nargs="+", default=[2])
    p.add_argument("--work", type=Path, help="where data, checkpoints and runs go (required unless --summarize)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--checkpoint", type=Path, help="an open_clip state dict of --model (default: made in --work)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--sub-group-size", type=int, default=100_000_000,
                   help="ZeRO-3 optimizer sub-group (elements); buckets are half of it")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                   help="the card's bf16, or fp32 where the CPU has no bf16 arithmetic (same 16 B/param plan)")
    p.add_argument("--no-resume", action="store_true", help="one uninterrupted run per rank count (no kill and resume)")
    p.add_argument("--n-forget", type=int, default=4)
    p.add_argument("--n-retain", type=int, default=8)
    p.add_argument("--n-eval", type=int, default=6)
    a = p.parse_args(argv)
    if a.summarize:
        result = json.loads(a.out.read_text())
        result["summary"] = summarize(result)
        a.out.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result["summary"], indent=1))
        return 0
    if a.work is None:
        p.error("--work is required")
    import deepspeed
    import open_clip
    import torch

    a.work.mkdir(parents=True, exist_ok=True)
    data = make_data(a.work / "data", a.n_forget, a.n_retain, a.n_eval)
    ckpt = make_checkpoint(a.model, a.checkpoint or a.work / f"{a.model}.pt")
    cfg = a.work / "ds_cpu_zero3.json"
    ds_config = cpu_zero3(a.sub_group_size)
    cfg.write_text(json.dumps(ds_config))
    n = sum(v.numel() for v in torch.load(ckpt, map_location="cpu", mmap=True, weights_only=True).values())
    result = {"model": a.model, "parameters": n, "precision": a.precision, "zero_stage": 3, "batch_per_rank": "2 forget + 2 retain",
              "image_px": 224, "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                           "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1)},
              "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__, "deepspeed": deepspeed.__version__},
              "driver": " ".join(["benchmarks/bench_zero3_scale.py", *(argv or sys.argv[1:])]),
              "deepspeed_config": ds_config, "loadavg_start": os.getloadavg(),
              "mem_available_gib_start": mem_available_gib(), "matmul_gflops_one_thread": matmul_rates(),
              "by_ranks": {}}
    previous = json.loads(a.out.read_text()) if a.out.is_file() else {}
    if (previous.get("model"), previous.get("precision")) == (a.model, a.precision):  # add to the other rank counts
        result["by_ranks"] = previous["by_ranks"]
    for r in a.ranks:
        available = mem_available_gib()
        got = run_one(a.model, r, ckpt, data, a.work, cfg, a.steps, resume=not a.no_resume, precision=a.precision)
        got["driver"] = result["driver"]
        got["loadavg_start"] = result["loadavg_start"]
        got["mem_available_gib_start"] = available
        got["plan"] = plan(n, r)
        peaks = [max(row["peak_rss_bytes"] for row in rows) for rows in got["memory"].values()]
        got["measured"] = {"peak_rss_bytes_per_rank": max(peaks) if peaks else None,
                           "peak_rss_bytes_per_param_per_rank": max(peaks) / n if peaks else None}
        result["by_ranks"][str(r)] = got
        result["loadavg_end"] = os.getloadavg()
        result["summary"] = summarize(result)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
