"""The GPU kit's kernel part: fwd+bwd of InfoNCE (`clip_infonce`) and InfoNCE + KL
(`cliperase_loss`) per provider, against one measured bf16 GEMM of 2 N^2 d FLOP in the same run.

    python -m benchmarks.gpu.kernels --out kernels.json [--dry]

On CUDA: N in {16,384, 65,536}, d = 1,024, bf16; providers triton, inf_cl (InfoNCE only), open_clip
(InfoNCE only), chunked and naive, the materialised ones skipped where they would not fit
(`_registry.MATERIALISED_BYTES_PER_LOGIT`). Dry run (CPU): N in {48, 80}, d = 256, fp32, the
providers that run on CPU; triton and inf_cl are recorded as skipped.

Inputs, providers and the timed call are `benchmarks/_registry.py`'s. Not pytest-benchmark: the
part runs under a time cap and must keep every finished case when it is killed, so the JSON is
rewritten after each case. Per case: one warm-up call (Triton compiles, allocators settle), then
as many timed calls as fit in `CASE_BUDGET_S` (3 s; 0.25 s dry; 1 to 10), the device synchronised inside each;
min and median kept. Peak memory (CUDA): `max_memory_allocated` over the first timed call minus
what was allocated before it (inputs excluded, gradients included).

`roofline_ratio` = min time / (passes x the GEMM's min time at the same N), passes from
LIMITS.md: 4 for InfoNCE, 6 for InfoNCE + KL.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from benchmarks._registry import SCALE, Case, device, dtype_for, environment, skip_reason, sync, timed_call
from benchmarks.gpu import write_json

__all__ = ["main", "shapes", "PROVIDERS", "PASSES"]

PROVIDERS = {
    "clip_infonce": ("triton", "inf_cl", "open_clip", "chunked", "naive"),
    "cliperase_loss": ("triton", "chunked", "naive"),
}
PASSES = {"clip_infonce": 4, "cliperase_loss": 6}  # GEMM passes over S (LIMITS.md)
CASE_BUDGET_S = {False: 3.0, True: 0.25}  # [dry]: timed calls per case, as many as fit, 1 to 10
GEMM_ROUNDS = 5


def shapes(dry: bool) -> tuple:
    """(Ns, d): the GPU subset, or the dry run's tiny shapes (d = 256: Inf-CL's head_dim)."""
    return ((48, 80), 256) if dry else ((16384, 65536), 1024)


def gemm_rate(n: int, d: int, dev: str, dtype: torch.dtype) -> Dict[str, float]:
    """Seconds and TFLOP/s of one (n x d) @ (d x n) product, 2 n^2 d FLOP: min of GEMM_ROUNDS."""
    gen = torch.Generator(device=dev).manual_seed(1)
    a = torch.randn(n, d, generator=gen, device=dev, dtype=torch.float32).to(dtype)
    b = torch.randn(n, d, generator=gen, device=dev, dtype=torch.float32).to(dtype)
    out = torch.empty(n, n, device=dev, dtype=dtype)
    times = []
    for i in range(GEMM_ROUNDS + 1):
        sync(dev)
        t0 = time.perf_counter()
        torch.matmul(a, b.T, out=out)
        sync(dev)
        if i:  # the first is the warm-up (cuBLAS heuristics, workspace)
            times.append(time.perf_counter() - t0)
    del a, b, out
    best = min(times)
    return {"n": n, "d": d, "flop": 2.0 * n * n * d, "seconds_min": best, "seconds_median": statistics.median(times),
            "tflops": 2.0 * n * n * d / best / 1e12, "rounds": GEMM_ROUNDS}


def measure(case: Case, dev: str, budget_s: float) -> Dict[str, object]:
    """Time one fwd+bwd case (see the module docstring); on CUDA also its peak extra memory."""
    setup, target = timed_call(case, dev)
    args, _ = setup()
    sync(dev)
    t0 = time.perf_counter()
    target(*args)
    warmup = time.perf_counter() - t0
    rounds = max(1, min(10, int(budget_s / max(warmup, 1e-6))))
    times: List[float] = []
    peak: Optional[int] = None
    for i in range(rounds):
        args, _ = setup()
        sync(dev)
        if i == 0 and dev == "cuda":
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        target(*args)
        times.append(time.perf_counter() - t0)
        if i == 0 and dev == "cuda":
            peak = torch.cuda.max_memory_allocated() - base
    return {"status": "ok", "warmup_s": warmup, "rounds": rounds, "seconds_min": min(times),
            "seconds_median": statistics.median(times), "peak_extra_bytes": peak,
            "peak_method": "torch.cuda.max_memory_allocated over one call minus before" if peak is not None
            else "not measured on CPU (dry run)"}


def _run_case(case: Case, dev: str, dry: bool, gemm: Dict[str, float]) -> Dict[str, object]:
    row: Dict[str, object] = {"loss": case.loss, "provider": case.provider, "mode": case.mode, "n": case.n, "d": case.d}
    reason = skip_reason(case, dev, any_shape=dry)
    if reason:
        return {**row, "status": "skipped", "reason": reason}
    try:
        row.update(measure(case, dev, CASE_BUDGET_S[dry]))
    except torch.cuda.OutOfMemoryError as exc:  # the skip rule's estimate was short: say so, go on
        row.update(status="oom", error=str(exc).splitlines()[0])
    except Exception as exc:  # noqa: BLE001 - one broken provider must not lose the others
        row.update(status="error", error=f"{type(exc).__name__}: {exc}"[:2000])
    finally:
        gc.collect()
        if dev == "cuda":
            torch.cuda.empty_cache()
    if row["status"] == "ok":
        row["roofline_s"] = PASSES[case.loss] * gemm["seconds_min"]
        row["roofline_ratio"] = row["seconds_min"] / row["roofline_s"]
    return row


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="result JSON, rewritten after every case")
    p.add_argument("--dry", action="store_true", help="tiny shapes on CPU (the kit's dry run)")
    args = p.parse_args(argv)
    dev = device()
    if dev == "cpu" and not args.dry:
        p.error("no CUDA device: pass --dry for the CPU dry run")
    ns, d = shapes(args.dry)
    dtype = dtype_for(dev)
    result = {"part": "kernels", "dry": args.dry, "device": dev, "dtype": str(dtype), "logit_scale": SCALE,
              "mode": "fwd+bwd", "environment": environment(), "passes": PASSES, "gemm": [], "cases": []}
    for n in ns:
        gemm = gemm_rate(n, d, dev, dtype)
        result["gemm"].append(gemm)
        write_json(args.out, result)
        for loss, providers in PROVIDERS.items():
            for provider in providers:
                result["cases"].append(_run_case(Case(loss, provider, "fwd+bwd", n, d), dev, args.dry, gemm))
                write_json(args.out, result)
    failed = [c for c in result["cases"] if c["status"] in ("error", "oom")]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
