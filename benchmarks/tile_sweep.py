"""Choose the Triton kernels' launch tiles from compiled metadata, without a GPU.

For every (arch, dtype, kernel, variant) this compiles candidate tiles ahead of time
(`kernels/_triton_aot.py`: `triton.compile` for `GPUTarget("cuda", arch, 32)` with the
divisibility hints of a real launch) and reads registers, stack (spill) bytes and shared memory.
A candidate qualifies when it is spill-free, within the arch's shared memory, for every flag
combination the table entry serves (caption ids and column statistics on and off), with every
Triton given: the installed one and the GPU image's (`--triton`, by default .cache/triton-<the
version constraints/gpu.txt pins>, which `make gpu-triton` installs): their ptxas differ. Among the
qualifying ones the pick is, in order (an estimate from the kernel design, not a measurement):
1. operand reuse `BM*BN/(BM+BN)` FLOP per byte loaded: the kernels stream both operands from
   L2, and at 128 x 128 they already need ~64 B/clk/SM at the tensor-core rate;
2. programs per SM (capped at 2): a second resident program runs its GEMM while the first
   runs its exponentials and reductions;
3. the larger BLOCK_K, then more pipelining stages (up to 4), then fewer registers.
Candidates are compiled level by level of (1), best first; the sweep stops at the first level
with a qualifying candidate, so the output lists what was compiled, not the whole grid.

    make gpu-triton && .venv/bin/python benchmarks/tile_sweep.py --jobs 2 --json benchmarks/results/tile-sweep.json

prints one line per compile and, at the end, the `TILES` literal for kernels/_triton_tiles.py.
Needs no GPU; run it in a shell without TRITON_INTERPRET.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from cliperase.kernels._triton_tiles import ARCHS, DTYPES, SMEM_LIMIT, VARIANTS, Tile

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: `benchmarks` is then not importable by itself
    sys.path.insert(0, str(REPO))

REGS_PER_SM = 65536
MAX_PROGRAMS = 2  # occupancy beyond 2 programs per SM is not credited (see the docstring)

# (block_m, block_n, block_k, num_warps, num_stages) candidates; warps follow the tile size.
CANDIDATES = [
    Tile(*t) for t in [
        (256, 128, 64, 8, 2), (128, 256, 64, 8, 2),
        (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 32, 8, 4), (128, 128, 64, 4, 3),
        (256, 64, 64, 8, 3),
        (128, 64, 64, 8, 3), (128, 64, 64, 8, 4), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3),
        (64, 64, 64, 4, 3), (64, 64, 32, 4, 2),
    ]
]


def reuse(t: Tile) -> float:
    return t.block_m * t.block_n / (t.block_m + t.block_n)


def programs_per_sm(tile: Tile, regs: int, smem: int, arch: int) -> int:
    regs_alloc = -(-regs // 8) * 8  # registers are allocated per thread in units of 8
    by_regs = REGS_PER_SM // max(1, regs_alloc * 32 * tile.num_warps)
    by_smem = (SMEM_LIMIT[arch] + 1024) // max(1, smem) if smem else MAX_PROGRAMS
    return min(by_regs, by_smem)


def rank_key(tile: Tile, regs: int, smem: int, arch: int) -> Tuple:
    return (reuse(tile), min(programs_per_sm(tile, regs, smem, arch), MAX_PROGRAMS), tile.block_k,
            min(tile.num_stages, 4), -regs)


def compile_all(toolchains: Sequence, jobs: List) -> List[Dict]:
    """Each job compiled by every toolchain, merged to the worst figures (`_triton_aot.worst_of`)."""
    from cliperase.kernels._triton_aot import worst_of

    return worst_of({tc.versions["triton"]: tc.compile(jobs) for tc in toolchains})


def _ok(rec, arch) -> bool:
    return "error" not in rec and not rec["spills"] and rec["smem"] <= SMEM_LIMIT[arch]


def _show(rec) -> None:
    t = rec["tile"]
    flags = ",".join(k for k, v in rec["flags"].items() if v) or "-"
    what = rec.get("error") or (f"regs {rec['regs']:3d} stack {rec['stack']:4d} smem {rec['smem']:6d} "
                                f"{rec['seconds']:5.1f}s")
    print(f"sm_{rec['arch']} {rec['dtype']} {rec['kernel']} {flags:34s} "
          f"{t['block_m']}x{t['block_n']}x{t['block_k']} w{t['num_warps']} s{t['num_stages']}: {what}", flush=True)


def sweep_group(toolchains, kernel: str, variant: str, arch: int, dtype: str, candidates: List[Tile]) -> Dict:
    """Compile level by level; return the group's records and the chosen tile (or None)."""
    from cliperase.kernels._triton_aot import flags_of, sub_variants

    heavy = flags_of(kernel, variant, True, True)
    records, chosen = [], None
    for level in sorted({reuse(t) for t in candidates}, reverse=True):
        tiles = [t for t in candidates if reuse(t) == level]
        results = compile_all(toolchains, [(kernel, arch, dtype, t, heavy) for t in tiles])
        for r in results:
            _show(r)
        records += results
        ranked = sorted((r for r in results if _ok(r, arch)),
                        key=lambda r: rank_key(Tile(**r["tile"]), r["regs"], r["smem"], arch), reverse=True)
        for best in ranked:
            tile = Tile(**best["tile"])
            rest = [f for f in sub_variants(kernel, variant) if f != heavy]
            checks = compile_all(toolchains, [(kernel, arch, dtype, tile, f) for f in rest])
            for r in checks:
                _show(r)
            records += checks
            if all(_ok(r, arch) for r in checks):
                chosen = dict(tile=tile.__dict__, regs=max(r["regs"] for r in [best, *checks]),
                              smem=max(r["smem"] for r in [best, *checks]),
                              programs_per_sm=programs_per_sm(tile, best["regs"], best["smem"], arch))
                break
        if chosen:
            break
    return dict(kernel=kernel, variant=variant, arch=arch, dtype=dtype, chosen=chosen, compiled=records)


def table_literal(groups: List[Dict]) -> str:
    lines = ["TILES: Dict[Tuple[int, str, str, str], Tile] = {"]
    for g in groups:
        if g["chosen"]:
            t = Tile(**g["chosen"]["tile"])
            lines.append(f'    ({g["arch"]}, "{g["dtype"]}", "{g["kernel"]}", "{g["variant"]}"): '
                         f"Tile({t.block_m}, {t.block_n}, {t.block_k}, {t.num_warps}, {t.num_stages}),"
                         f'  # {g["chosen"]["regs"]} regs, {g["chosen"]["smem"] // 1024} KB')
    lines.append("}")
    return "\n".join(lines)


def triton_dir(version: str) -> Path:
    """Where a Triton release is installed beside the venv (`pip install --no-deps --target`)."""
    return REPO / ".cache" / f"triton-{version}"


def gpu_image_triton() -> Path:
    """Where `make gpu-triton` installs the Triton constraints/gpu.txt pins."""
    from benchmarks.gpu.wheels import pins

    return triton_dir(pins()["triton"])


def kernel_source_hash() -> str:
    """sha256 of the kernels' source file: which kernels a record was compiled from."""
    import hashlib

    from cliperase.kernels import _triton_tiles

    path = Path(_triton_tiles.__file__).with_name("_triton_contrastive.py")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=ARCHS)
    ap.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--kernel", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--jobs", type=int, default=2, help="compile processes per Triton")
    ap.add_argument("--triton", type=Path, action="append",
                    help="another Triton package folder to qualify against (repeatable; default: the GPU image's)")
    ap.add_argument("--json", type=Path, help="write every compile's record here")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("tile_sweep: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)", file=sys.stderr)
        return 2
    from cliperase.kernels._triton_aot import Toolchain

    others = args.triton or [gpu_image_triton()]
    missing = [p for p in others if not (p / "triton").is_dir()]
    if missing:
        print(f"tile_sweep: no triton package in {', '.join(map(str, missing))} (make gpu-triton installs "
              "the GPU image's)", file=sys.stderr)
        return 2
    start = time.time()
    groups = []
    toolchains = [Toolchain(None, args.jobs)] + [Toolchain(p, args.jobs) for p in others]
    try:
        skips = [f"{tc.path or 'installed'}: {tc.skip}" for tc in toolchains if tc.skip]
        if skips:
            print("tile_sweep: cannot compile for sm_90 with " + "; ".join(skips), file=sys.stderr)
            return 2
        for arch in args.arch:
            for dtype in args.dtype:
                for kernel in args.kernel:
                    for variant in VARIANTS[kernel]:
                        groups.append(sweep_group(toolchains, kernel, variant, arch, dtype, CANDIDATES))
    finally:
        for tc in toolchains:
            tc.close()
    literal = table_literal(groups)
    print(literal)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(
            command="benchmarks/tile_sweep.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            machine=dict(node=platform.node(), processor=platform.processor() or platform.machine(),
                         cpus=os.cpu_count(), python=platform.python_version()),
            toolchains=[tc.versions for tc in toolchains], wall_seconds=round(time.time() - start, 1),
            kernel_source_sha256=kernel_source_hash(),
            rule=__doc__.split("\n\n")[0], table=literal, groups=groups,
        ), indent=1) + "\n")
    return 0 if all(g["chosen"] for g in groups) else 1


if __name__ == "__main__":
    sys.exit(main())
