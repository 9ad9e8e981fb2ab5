"""Ahead-of-time compilation of the Triton kernels for a GPU target, on a machine without one.

`compile_usage` compiles one kernel variant (for production widths: d a multiple of BLOCK_K) with one `Tile` for `GPUTarget("cuda", arch, 32)`
through `triton.compile(ASTSource(...))` and reads what the cubin needs: registers, stack bytes
(where ptxas puts spills) and local memory from `cuobjdump -res-usage` (Triton's wheel ships
ptxas and cuobjdump), shared memory from the compiled metadata. `CompiledKernel.n_regs` /
`n_spills` are only filled when the driver loads the binary, which needs a GPU.

The signature carries the divisibility-by-16 hints a real launch passes (`tt.divisibility`
on 16-byte-aligned pointers and on ints divisible by 16: strides, d, sizes): without them the
address arithmetic is not vectorised and the kernels spill. Used by `benchmarks/tile_sweep.py`
and `tests/test_triton_tiles.py`; imports Triton, so it must run in a process without
TRITON_INTERPRET (the interpreter's kernels cannot be compiled).
"""
from __future__ import annotations

import itertools
import os
import re
import subprocess
import tempfile
import time
from typing import Dict, Iterator, NamedTuple, Tuple

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import _triton_contrastive as K
from ._triton_tiles import Tile

__all__ = ["Usage", "compile_usage", "sub_variants", "flags_of", "can_compile", "toolchain", "shipped_jobs",
           "check_shipped"]

_FN = {"fwd": K._stats_fwd_kernel, "bwd": K._grad_logits_kernel}
_INPUT_PTRS = {"a_ptr", "b_ptr", "a0_ptr", "b0_ptr", "g_ptr"}  # in the input dtype


class Usage(NamedTuple):
    regs: int  # registers per thread
    stack: int  # stack frame bytes (spill stores land here); 0 when spill-free
    local: int  # local memory bytes
    smem: int  # dynamic shared memory bytes the launch requests
    seconds: float  # compile wall time (0 on a Triton cache hit)

    @property
    def spills(self) -> bool:
        return self.stack > 0 or self.local > 0


def flags_of(kernel: str, variant: str, has_ids: bool, col_stats: bool) -> Dict[str, bool]:
    """The constexpr flags of one compiled variant."""
    flags = dict(HAS_KL=variant != "infonce", HAS_IDS=has_ids, COL_STATS=col_stats)
    if kernel == "bwd":
        flags["TEACHER_GRAD"] = variant == "kl_teacher_grad"
    return flags


def sub_variants(kernel: str, variant: str) -> Iterator[Dict[str, bool]]:
    """Every flag combination one table entry serves (caption ids and column stats on/off),
    the heaviest (both on) first."""
    for has_ids, col_stats in itertools.product((True, False), repeat=2):
        yield flags_of(kernel, variant, has_ids, col_stats)


def _signature(fn, dtype: str, constexprs: Dict) -> Tuple[Dict[str, str], Dict]:
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        if name.endswith("_ptr"):
            sig[name] = "*" + (dtype if name in _INPUT_PTRS else "i32" if name == "ids_ptr" else "fp32")
        else:
            sig[name] = "i32"
        attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def compile_usage(kernel: str, arch: int, dtype: str, tile: Tile, flags: Dict[str, bool]) -> Usage:
    """Compile `kernel` ("fwd"/"bwd") with `tile` and `flags` for sm_`arch`; `dtype` "bf16"/"fp16".

    Raises triton's compilation errors as they come (e.g. an impossible tile).
    """
    fn = _FN[kernel]
    constexprs = dict(BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
                      INPUT_PRECISION="tf32", EVEN_K=True, **flags)
    sig, attrs = _signature(fn, dtype, constexprs)
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    start = time.perf_counter()
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=tile.num_warps, num_stages=tile.num_stages))
    seconds = time.perf_counter() - start
    res = _res_usage(compiled.asm["cubin"])
    return Usage(res["REG"], res["STACK"], res["LOCAL"], compiled.metadata.shared, seconds)


def _res_usage(cubin: bytes) -> Dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-res-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in out.splitlines() if "REG:" in ln)
    return {k: int(v) for k, v in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", line)}


def toolchain() -> Dict[str, str]:
    """Versions of what compiled: Triton, and the ptxas it ships."""
    out = subprocess.run([triton.knobs.nvidia.ptxas.path, "--version"], capture_output=True, text=True).stdout
    release = re.search(r"release [\d.]+, V[\d.]+", out)
    return {"triton": triton.__version__, "ptxas": release.group(0) if release else out.strip()[-40:]}


def can_compile() -> str:
    """'' when this machine can compile for sm_90, else the reason it cannot."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1 is set in this process (its kernels cannot be compiled)"
    try:
        compile_usage("fwd", 90, "bf16", Tile(16, 16, 16, 1, 1), flags_of("fwd", "infonce", False, False))
    except Exception as e:  # noqa: BLE001 - any toolchain failure is a reason to skip
        return f"cannot compile for sm_90 here: {type(e).__name__}: {str(e)[:200]}"
    return ""


def shipped_jobs():
    """(kernel, arch, dtype, tile, flags) of every compile the shipped table must pass, once each."""
    from ._triton_tiles import ARCHS, DTYPES, TILES, VARIANTS

    jobs = []
    for arch in ARCHS:
        for dtype in DTYPES:
            for kernel, variants in VARIANTS.items():
                for variant in variants:
                    tile = TILES[(arch, dtype, kernel, variant)]
                    for flags in sub_variants(kernel, variant):
                        job = (kernel, arch, dtype, tile, flags)
                        if job not in jobs:
                            jobs.append(job)
    return jobs


def _usage_record(job) -> Dict:
    kernel, arch, dtype, tile, flags = job
    u = compile_usage(kernel, arch, dtype, tile, flags)
    return dict(kernel=kernel, arch=arch, dtype=dtype, tile=tile.__dict__, flags=flags, **u._asdict(),
                spills=u.spills)


def check_shipped(jobs: int = 2) -> list:
    """Compile every shipped tile (`shipped_jobs`) in `jobs` processes; one record per compile."""
    import concurrent.futures as cf
    import multiprocessing

    todo = shipped_jobs()
    with cf.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_usage_record, todo))
