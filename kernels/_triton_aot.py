"""Ahead-of-time compilation of the Triton kernels for a GPU target, on a machine without one.

`compile_usage` compiles one kernel variant (for production widths: d a multiple of BLOCK_K) with one `Tile` for `GPUTarget("cuda", arch, 32)`
through `triton.compile(ASTSource(...))` and reads what the cubin needs: registers, stack bytes
(where ptxas puts spills) and local memory from `cuobjdump -res-usage` (Triton's wheel ships
ptxas and cuobjdump), shared memory from the compiled metadata. `CompiledKernel.n_regs` /
`n_spills` are only filled when the driver loads the binary, which needs a GPU.

The signature carries the divisibility-by-16 hints a real launch passes (`tt.divisibility`
on 16-byte-aligned pointers and on ints divisible by 16: strides, d, sizes): without them the
address arithmetic is not vectorised and the kernels spill. Used by `benchmarks/tile_sweep.py`
and `tests/test_triton_tiles.py` through `Toolchain`, which runs the compiles in a child process:
the interpreter's kernels (TRITON_INTERPRET=1) cannot be compiled, and one process cannot hold
two Triton versions. The shipped tiles must be spill-free with every Triton they will meet:
this machine's (constraints/cpu.txt) and the GPU image's (constraints/gpu.txt); the two
versions' ptxas allocate registers differently.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import _triton_contrastive as K
from ._triton_tiles import Tile

__all__ = ["Usage", "Job", "Toolchain", "compile_kernel", "compile_usage", "compile_record", "sub_variants", "flags_of",
           "can_compile", "toolchain", "shipped_jobs", "fallback_jobs", "worst_of"]

# (kernel, arch, dtype, tile, flags): one compile.
Job = Tuple[str, int, str, Tile, Dict[str, bool]]

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


def compile_kernel(kernel: str, arch: int, dtype: str, tile: Tile, flags: Dict):
    """Compile `kernel` ("fwd"/"bwd") with `tile` and `flags` for sm_`arch`; `dtype` "bf16",
    "fp16" or "fp32". `flags` are constexprs: the variant's (`flags_of`), and optionally
    INPUT_PRECISION ("tf32" unless given; fp32 inputs may take "ieee") and EVEN_K (True unless
    given: a width d that BLOCK_K divides, as every production width is). Returns Triton's
    CompiledKernel (its cubin in `.asm["cubin"]`).

    Raises triton's compilation errors as they come (e.g. an impossible tile).
    """
    fn = _FN[kernel]
    constexprs = dict(BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
                      INPUT_PRECISION="tf32", EVEN_K=True)
    constexprs.update(flags)
    sig, attrs = _signature(fn, dtype, constexprs)
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=tile.num_warps, num_stages=tile.num_stages))


def compile_usage(kernel: str, arch: int, dtype: str, tile: Tile, flags: Dict) -> Usage:
    """`compile_kernel`, and what its cubin needs (`Usage`)."""
    start = time.perf_counter()
    compiled = compile_kernel(kernel, arch, dtype, tile, flags)
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


def shipped_jobs() -> List[Job]:
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


def fallback_jobs() -> List[Job]:
    """The compiles a launch makes off the table, heaviest flags, every arch and variant: fp32
    inputs (`FP32_TILE`, IEEE and TF32 dots: the default `--precision fp32` on CUDA) and 16-bit
    inputs of a width BLOCK_K does not divide (EVEN_K off: masked operand loads). Not tuned, so
    a spill is allowed there; a compile error is not."""
    from ._triton_tiles import ARCHS, DTYPES, FP32_TILE, TILES, VARIANTS

    jobs = []
    for arch in ARCHS:
        for kernel, variants in VARIANTS.items():
            for variant in variants:
                heavy = dict(flags_of(kernel, variant, True, True), EVEN_K=False)
                jobs += [(kernel, arch, "fp32", FP32_TILE, dict(heavy, INPUT_PRECISION=p)) for p in ("ieee", "tf32")]
                jobs += [(kernel, arch, dt, TILES[(arch, dt, kernel, variant)], heavy) for dt in DTYPES]
    return jobs


def compile_record(job: Job) -> Dict:
    """One compile as a JSON-able record; a failed compile (an impossible tile) is recorded, not raised."""
    kernel, arch, dtype, tile, flags = job
    rec = dict(kernel=kernel, arch=arch, dtype=dtype, tile=tile.__dict__, flags=flags)
    try:
        u = compile_usage(kernel, arch, dtype, tile, flags)
    except Exception as e:  # noqa: BLE001 - an impossible tile is a result, not a crash
        return dict(rec, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    return dict(rec, regs=u.regs, stack=u.stack, local=u.local, smem=u.smem, spills=u.spills,
                seconds=round(u.seconds, 2))


def worst_of(per_toolchain: Dict[str, List[Dict]]) -> List[Dict]:
    """Merge the records of the same jobs compiled by several toolchains (keyed by Triton
    version): the most registers, stack, local and shared memory of any, `spills` if any spilled,
    an `error` if any failed, and each toolchain's own figures under `by_triton`."""
    lists = list(per_toolchain.values())
    merged = []
    for recs in zip(*lists):
        first = recs[0]
        key = {k: first[k] for k in ("kernel", "arch", "dtype", "tile", "flags")}
        if any({k: r[k] for k in key} != key for r in recs):
            raise ValueError(f"toolchains compiled different jobs: {[{k: r[k] for k in key} for r in recs]}")
        errors = [f"triton {v}: {r['error']}" for v, r in zip(per_toolchain, recs) if "error" in r]
        if errors:
            merged.append(dict(key, error="; ".join(errors)))
            continue
        out = dict(key, **{k: max(r[k] for r in recs) for k in ("regs", "stack", "local", "smem")})
        out.update(spills=any(r["spills"] for r in recs), seconds=round(sum(r["seconds"] for r in recs), 2),
                   by_triton={v: {k: r[k] for k in ("regs", "stack", "local", "smem")}
                              for v, r in zip(per_toolchain, recs)})
        merged.append(out)
    return merged


class Toolchain:
    """A Triton install that compiles jobs in a child process of its own: the installed one
    (`path=None`) or a package folder put first on PYTHONPATH, e.g. the GPU image's Triton from
    `pip install --no-deps --target DIR triton==X`. `skip` is why it cannot compile for sm_90
    here ('' when it can); `versions` is what compiles (Triton, ptxas)."""

    def __init__(self, path: Optional[Path] = None, processes: int = 2):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        if path is not None:
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(path), env.get("PYTHONPATH", "")) if p)
        self.path = path
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _SERVE, str(processes)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        hello = self._read()
        self.skip, self.versions = hello["skip"], hello["versions"]

    def compile(self, jobs: Sequence[Job]) -> List[Dict]:
        """`compile_record` of each job, in order."""
        wire = [[k, a, dt, t.__dict__, f] for k, a, dt, t, f in jobs]
        self._proc.stdin.write(json.dumps(wire) + "\n")
        self._proc.stdin.flush()
        return self._read()["records"]

    def _read(self) -> Dict:
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the compile process (Triton from {self.path or 'the installed package'}) "
                               f"exited with {self._proc.wait()}; its stderr is above")
        return json.loads(line)

    def close(self) -> None:
        self._proc.stdin.close()
        self._proc.wait()

    def __enter__(self) -> "Toolchain":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# The child's command: by import, not `-m`, so the functions its pool pickles live in this module.
_SERVE = "import sys; from cliperase.kernels._triton_aot import _serve; _serve(int(sys.argv[1]))"


def _serve(processes: int) -> None:
    """The child of `Toolchain`: one JSON line of jobs in, one JSON line of records out."""
    import concurrent.futures as cf
    import multiprocessing

    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever Triton or ptxas print goes to stderr, never into the replies

    def send(obj) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    reason = can_compile()
    send(dict(skip=reason, versions=toolchain() if not reason else {"triton": triton.__version__}))
    with cf.ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        for line in sys.stdin:
            jobs = [(k, a, dt, Tile(**t), f) for k, a, dt, t, f in json.loads(line)]
            send(dict(records=list(pool.map(compile_record, jobs))))

