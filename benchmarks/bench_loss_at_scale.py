"""`cliperase_loss` (chunked) forward + backward at the target N on CPU, against the roofline.

    nice -n 5 .venv/bin/python benchmarks/bench_loss_at_scale.py \
        --n 65536 --d 1024 --out benchmarks/results/cpu-loss-n65536.json

A script, not a pytest benchmark: one run at N = 65,536, d = 1,024 is about 5.3e13 FLOP, tens
of minutes on two cores. It records, in one run on the same machine:

- the loss: a fresh child process (`--child`) builds the inputs from `--seed` (four N x d fp32
  towers, student and teacher, L2-normalised, `logit_scale = 100`), resets the kernel's peak-RSS
  mark (`/proc/self/clear_refs` <- 5), then times one forward and one backward of
  `cliperase_loss(..., impl="chunked")`. Peak extra memory is `VmHWM - VmRSS` before the call:
  everything the call added, the two (N, d) fp32 gradients (its outputs) included; the figure
  without them is recorded too. A sampling thread records the RSS timeline (every 0.5 s).
- the machine's fp32 GEMM rate, measured in the parent before and after the loss, on the loss's
  own tile GEMM (`block_m x d @ d x block_n`, what the chunked path runs) and on one large GEMM.
- the roofline ratio: loss time / (6 passes x 2 N^2 d FLOP / measured GEMM rate), LIMITS.md,
  in wall time and in process CPU time (loss CPU seconds against the GEMM's FLOP per CPU second).

The machine is shared: the load average before and after is recorded with the figures. Under
load, wall time measures the other jobs as much as this one; the CPU-time ratio does not, as
long as no OpenMP thread spins waiting for a descheduled sibling (`--threads 1`).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: `benchmarks` is then not importable by itself
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks._registry import SCALE, _status_bytes, environment, make_inputs  # noqa: E402

GEMM_PASSES = 6  # InfoNCE + consistency KL, symmetric: S and S0 forward, S and S0 again, dA and dB


def gemm_rate(m: int, k: int, n: int, min_seconds: float = 3.0) -> Dict[str, float]:
    """fp32 GEMM rate of `(m x k) @ (k x n)`, repeated for at least `min_seconds` of wall time:
    FLOP per wall second and per second of process CPU time."""
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(m, k, generator=gen)
    b = torch.randn(k, n, generator=gen)
    out = torch.empty(m, n)
    torch.mm(a, b, out=out)  # warm-up
    reps, t0, c0 = 0, time.perf_counter(), time.process_time()
    while True:
        torch.mm(a, b, out=out)
        reps += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds:
            break
    cpu = time.process_time() - c0
    flop = 2.0 * m * k * n * reps
    return {"m": m, "k": k, "n": n, "reps": reps, "seconds": elapsed, "cpu_seconds": cpu,
            "flop_per_s": flop / elapsed, "flop_per_cpu_s": flop / cpu}


def _rss_sampler(samples: List[List[float]], stop: threading.Event, t0: float, every: float = 0.5) -> None:
    while not stop.wait(every):
        samples.append([round(time.perf_counter() - t0, 2), _status_bytes("VmRSS")])


def child(n: int, d: int, seed: int) -> dict:
    """One fwd + bwd in this (fresh) process; returns the timings and memory figures."""
    from cliperase.kernels import cliperase_loss
    from cliperase.kernels._contrastive import DEFAULT_CHUNKED_CONFIG

    x = make_inputs("cliperase_loss", n, d, "cpu", torch.float32, seed=seed)
    scale = torch.tensor(SCALE, requires_grad=True)
    input_bytes = sum(t.numel() * t.element_size() for t in x.values())
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := current RSS (Linux >= 4.0)
        exact = True
    except OSError:
        exact = False  # VmHWM then includes building the inputs: an upper bound
    before = _status_bytes("VmRSS")
    samples: List[List[float]] = []
    stop = threading.Event()
    t0 = time.perf_counter()
    sampler = threading.Thread(target=_rss_sampler, args=(samples, stop, t0), daemon=True)
    sampler.start()
    c0 = time.process_time()
    infonce, kl = cliperase_loss(x["zi"], x["zt"], x["zi0"], x["zt0"], scale, impl="chunked")
    t_fwd, c_fwd = time.perf_counter() - t0, time.process_time() - c0
    (infonce + kl).backward()
    t_total, c_total = time.perf_counter() - t0, time.process_time() - c0
    stop.set()
    sampler.join()
    peak = _status_bytes("VmHWM")
    grad_bytes = sum(x[k].grad.numel() * x[k].grad.element_size() for k in ("zi", "zt"))
    finite = all(bool(torch.isfinite(t).all()) for t in (infonce, kl, x["zi"].grad, x["zt"].grad, scale.grad))
    return {
        "n": n, "d": d, "seed": seed, "logit_scale": SCALE, "dtype": "float32",
        "block_m": DEFAULT_CHUNKED_CONFIG.block_m, "block_n": DEFAULT_CHUNKED_CONFIG.block_n,
        "torch_threads": torch.get_num_threads(),
        "forward_s": t_fwd, "backward_s": t_total - t_fwd, "total_s": t_total,
        "forward_cpu_s": c_fwd, "backward_cpu_s": c_total - c_fwd, "total_cpu_s": c_total,
        "infonce": float(infonce), "kl": float(kl), "all_finite": finite,
        "input_bytes": input_bytes, "grad_bytes": grad_bytes, "rss_before": before, "vmhwm": peak,
        "peak_extra_bytes": peak - before, "peak_extra_minus_grads_bytes": peak - before - grad_bytes,
        "peak_exact": exact, "rss_timeline": samples,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=65536)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="result JSON (default: print only)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for the GEMM rates and the loss (default: torch's); on a shared machine "
                         "1 keeps OpenMP spin-wait out of the CPU time")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            ap.error(f"--threads must be positive, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.n < 1 or args.d < 1:
        ap.error(f"--n and --d must be positive, got {args.n} and {args.d}")
    if args.child:
        print(json.dumps(child(args.n, args.d, args.seed)))
        return

    from cliperase.kernels._contrastive import DEFAULT_CHUNKED_CONFIG as cfg

    load_before = os.getloadavg()
    tile = (min(cfg.block_m, args.n), args.d, min(cfg.block_n, args.n))
    rates_before = {"tile": gemm_rate(*tile), "large": gemm_rate(8192, args.d, 8192)}
    print(f"GEMM before: {json.dumps(rates_before)}", flush=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--n", str(args.n), "--d", str(args.d),
           "--seed", str(args.seed), "--threads", str(torch.get_num_threads())]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"loss child failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    loss = json.loads(proc.stdout.strip().splitlines()[-1])
    load_after = os.getloadavg()
    rates_after = {"tile": gemm_rate(*tile), "large": gemm_rate(8192, args.d, 8192)}
    print(f"GEMM after: {json.dumps(rates_after)}", flush=True)

    flop = GEMM_PASSES * 2.0 * args.n ** 2 * args.d
    rate = {k: (rates_before[k]["flop_per_s"] + rates_after[k]["flop_per_s"]) / 2 for k in ("tile", "large")}
    cpu_rate = {k: (rates_before[k]["flop_per_cpu_s"] + rates_after[k]["flop_per_cpu_s"]) / 2 for k in ("tile", "large")}
    result = {
        "what": "cliperase_loss impl='chunked' fwd+bwd on CPU at the target N (issue 14, item 5)",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "environment": {**environment(), "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
                        "nice": os.nice(0)},
        "loadavg_before": load_before, "loadavg_after": load_after,
        "loss": loss, "child_wall_s": wall,
        "flop": flop, "gemm_passes": GEMM_PASSES, "flop_formula": "6 * 2 * N^2 * d",
        "gemm_before": rates_before, "gemm_after": rates_after,
        "gemm_rate_flop_per_s": rate,
        "roofline_s": {k: flop / r for k, r in rate.items()},
        "roofline_ratio": {k: loss["total_s"] / (flop / r) for k, r in rate.items()},
        "achieved_flop_per_s": flop / loss["total_s"],
        # The same against CPU time: what time-sharing with other jobs does not inflate.
        "gemm_rate_flop_per_cpu_s": cpu_rate,
        "roofline_cpu_s": {k: flop / r for k, r in cpu_rate.items()},
        "roofline_ratio_cpu": {k: loss["total_cpu_s"] / (flop / r) for k, r in cpu_rate.items()},
    }
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    summary = {k: result[k] for k in ("roofline_ratio", "roofline_ratio_cpu", "achieved_flop_per_s")}
    summary.update({k: loss[k] for k in ("total_s", "total_cpu_s", "peak_extra_bytes", "peak_extra_minus_grads_bytes", "all_finite")})
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
