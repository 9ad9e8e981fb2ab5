"""What one tile of each shipped Triton kernel costs, read from its SASS (no GPU needed).

For every shipped tile (`kernels/_triton_tiles.py`, sm_90, bf16, the heaviest flag combination:
caption ids and column statistics on) this compiles the kernel ahead of time, disassembles the
cubin (`cuobjdump -sass` from Triton's wheel) and splits the instructions into the K loop (the
innermost loop around the tensor-core instructions) and the rest, which per column tile is the
softmax epilogue: scaling, masks, exponentials, reductions, stores. From the counts:

- `mma_clk`: tensor-core cycles per tile, 2 * BM * BN * d * passes / (FLOP per clock per SM),
  the GEMMs of S (and S0);
- `epi_clk`: issue cycles of the epilogue, instructions x warps / 4 schedulers (one warp
  instruction per scheduler per clock), or the SFU's 16 exponentials per clock per SM when
  that is larger;
so `epi_clk / mma_clk` is the share the epilogue adds when it runs after its tile's GEMM (one
resident program per SM) instead of beside it. An estimate from static counts: the epilogue
runs once per tile, the K loop d / BLOCK_K times; latencies and L2 stalls are not modelled.

    make gpu-triton && .venv/bin/python benchmarks/kernel_sass.py --triton .cache/triton-3.6.0 \
        --json benchmarks/results/kernel-sass.json

`--triton DIR` compiles with the Triton package in DIR (the GPU image's: the code that will run)
instead of the installed one.
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

CLASSES = {
    "mma": ("HGMMA", "HMMA"),
    "sfu": ("MUFU",),
    "fp32": ("FADD", "FMUL", "FFMA", "FMNMX", "FSEL", "FSETP", "FCHK", "FSWZADD"),
    "int": ("IMAD", "IADD3", "ISETP", "LOP3", "SEL", "SHF", "LEA", "IABS", "VIADD", "IMNMX", "PRMT", "I2FP", "F2I"),
    "shuffle": ("SHFL",),
    "global": ("LDG", "STG", "LDGSTS", "UTMALDG", "UBLKCP", "RED", "ATOMG"),
    "shared": ("LDS", "STS", "LDSM", "STSM"),
    "sync": ("BAR", "WARPGROUP", "DEPBAR", "LDGDEPBAR", "SYNCS"),
    "spill": ("LDL", "STL"),
}
FLOP_PER_CLK_SM = 4096  # H100 SXM dense bf16: 989 TFLOP/s / (132 SMs x 1.83 GHz)
SFU_PER_CLK_SM = 16
D = 1024  # the production embedding width (ViT-H-14)
_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)[^;]*;")
_BRA = re.compile(r"BRA\s+0x([0-9a-f]+)")


def parse(sass: str) -> List[tuple]:
    """(address, opcode, text) of each instruction."""
    out = []
    for line in sass.splitlines():
        m = _LINE.search(line)
        if m:
            out.append((int(m.group(1), 16), m.group(2).split(".")[0], line))
    return out


def k_loop(instrs: List[tuple]) -> Optional[tuple]:
    """(start, end) addresses of the innermost backward-branch loop holding tensor-core ops."""
    loops = []
    for addr, op, text in instrs:
        m = _BRA.search(text) if op == "BRA" else None
        if m and int(m.group(1), 16) < addr:
            loops.append((int(m.group(1), 16), addr))
    with_mma = [(a, b) for a, b in loops
                if any(a <= x <= b and op in CLASSES["mma"] for x, op, _ in instrs)]
    return min(with_mma, key=lambda ab: ab[1] - ab[0]) if with_mma else None


def classify(instrs) -> Dict[str, int]:
    counts = collections.Counter()
    for _, op, _ in instrs:
        cls = next((c for c, ops in CLASSES.items() if op in ops), "other")
        counts[cls] += 1
    counts["total"] = len(instrs)
    return dict(counts)


def analyse(kernel: str, variant: str, tile, sass: str) -> Dict:
    instrs = parse(sass)
    loop = k_loop(instrs)
    body = [i for i in instrs if loop and loop[0] <= i[0] <= loop[1]]
    rest = [i for i in instrs if not (loop and loop[0] <= i[0] <= loop[1])]
    epi = classify(rest)
    gemms = 1 if variant == "infonce" else 2
    mma_clk = 2 * tile.block_m * tile.block_n * D * gemms / FLOP_PER_CLK_SM
    threads = 32 * tile.num_warps
    issue_clk = epi["total"] * tile.num_warps / 4
    sfu_clk = epi.get("sfu", 0) * threads / SFU_PER_CLK_SM
    epi_clk = max(issue_clk, sfu_clk)
    return dict(kernel=kernel, variant=variant, tile=tile.__dict__, k_loop=classify(body), epilogue=epi,
                mma_clk=round(mma_clk), epi_issue_clk=round(issue_clk), epi_sfu_clk=round(sfu_clk),
                epi_over_mma=round(epi_clk / mma_clk, 3))


def sass_of(kernel: str, variant: str, tile, arch: int = 90, dtype: str = "bf16") -> str:
    import triton

    from cliperase.kernels._triton_aot import compile_kernel, flags_of

    compiled = compile_kernel(kernel, arch, dtype, tile, flags_of(kernel, variant, True, True))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-sass", f.name],
                              capture_output=True, text=True, check=True).stdout


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--triton", type=Path, help="a folder holding another Triton package to compile with")
    args = ap.parse_args(argv)
    if args.triton:
        if "triton" in sys.modules or not (args.triton / "triton").is_dir():
            print(f"kernel_sass: no usable triton package in {args.triton}", file=sys.stderr)
            return 2
        sys.path.insert(0, str(args.triton.resolve()))
    from cliperase.kernels._triton_aot import toolchain
    from cliperase.kernels._triton_tiles import TILES, VARIANTS

    rows = []
    for kernel, variants in VARIANTS.items():
        for variant in variants:
            tile = TILES[(90, "bf16", kernel, variant)]
            r = analyse(kernel, variant, tile, sass_of(kernel, variant, tile))
            rows.append(r)
            print(f"{kernel} {variant:16s} {tile.block_m}x{tile.block_n}x{tile.block_k} w{tile.num_warps}: "
                  f"epilogue {r['epilogue']['total']} instr ({r['epilogue'].get('sfu', 0)} MUFU), "
                  f"k-loop {r['k_loop'].get('total', 0)} instr; mma {r['mma_clk']} clk, "
                  f"epilogue issue {r['epi_issue_clk']} / sfu {r['epi_sfu_clk']} clk: "
                  f"{r['epi_over_mma']:.2f} x mma", flush=True)
    if args.json:
        args.json.write_text(json.dumps(dict(
            command="benchmarks/kernel_sass.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            toolchain=toolchain(), arch="sm_90a", dtype="bf16", d=D, flags="HAS_IDS, COL_STATS",
            model=__doc__.split("\n\n")[1], rows=rows), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
