"""Launch tiles of the Triton kernels, by (GPU architecture, input dtype, kernel, variant).

The table is chosen ahead of time, on a machine without a GPU, from compiled metadata
(registers, stack/spill bytes, shared memory) by `benchmarks/tile_sweep.py`; its output is in
`benchmarks/results/tile-sweep.json`, and `tests/test_triton_tiles.py` compiles every entry
for sm_80 and sm_90 and fails on a spill. Kept free of Triton imports so that the table and
its lookup are importable (and testable) anywhere.

Kernels: "fwd" (`_stats_fwd_kernel`) and "bwd" (`_grad_logits_kernel`). Variants: "infonce"
(student logits only), "kl" (with the teacher logits, frozen teacher scale) and, in backward,
"kl_teacher_grad" (the teacher scale trained too: the TEACHER_GRAD reduction). One entry serves
a variant with and without caption ids and column statistics; the test compiles all four.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

__all__ = ["Tile", "TILES", "KERNELS", "VARIANTS", "ARCHS", "DTYPES", "SMEM_LIMIT", "FP32_TILE",
           "variant_name", "tile_for", "smem_estimate"]


@dataclass(frozen=True)
class Tile:
    """One kernel launch's tile and schedule."""

    block_m: int  # rows per program
    block_n: int  # columns per tile
    block_k: int  # slice of d per tl.dot step
    num_warps: int
    num_stages: int  # software-pipelining depth of the operand loads (shared-memory buffers)


KERNELS = ("fwd", "bwd")
VARIANTS = {"fwd": ("infonce", "kl"), "bwd": ("infonce", "kl", "kl_teacher_grad")}
ARCHS = (80, 90)  # compute capability x 10 the table is chosen for
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Largest dynamic shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin): A100, H100.
SMEM_LIMIT = {80: 166912, 90: 232448}

# (arch, dtype, kernel, variant) -> Tile, as printed by benchmarks/tile_sweep.py (the run in
# benchmarks/results/tile-sweep.json): spill-free with this machine's Triton and the GPU image's.
# The comment is the most registers of the four flag combinations and both Tritons, and the
# shared memory the launch requests.
TILES: Dict[Tuple[int, str, str, str], Tile] = {
    (80, "bf16", "fwd", "infonce"): Tile(128, 128, 64, 8, 4),  # 226 regs, 96 KB
    (80, "bf16", "fwd", "kl"): Tile(128, 64, 64, 8, 4),  # 255 regs, 144 KB
    (80, "bf16", "bwd", "infonce"): Tile(128, 128, 64, 8, 4),  # 197 regs, 96 KB
    (80, "bf16", "bwd", "kl"): Tile(128, 64, 64, 8, 4),  # 202 regs, 144 KB
    (80, "bf16", "bwd", "kl_teacher_grad"): Tile(128, 64, 64, 8, 4),  # 255 regs, 144 KB
    (80, "fp16", "fwd", "infonce"): Tile(128, 128, 64, 8, 4),  # 226 regs, 96 KB
    (80, "fp16", "fwd", "kl"): Tile(128, 64, 64, 8, 4),  # 255 regs, 144 KB
    (80, "fp16", "bwd", "infonce"): Tile(128, 128, 64, 8, 4),  # 197 regs, 96 KB
    (80, "fp16", "bwd", "kl"): Tile(128, 64, 64, 8, 4),  # 202 regs, 144 KB
    (80, "fp16", "bwd", "kl_teacher_grad"): Tile(128, 64, 64, 8, 4),  # 255 regs, 144 KB
    (90, "bf16", "fwd", "infonce"): Tile(128, 256, 64, 8, 2),  # 255 regs, 96 KB
    (90, "bf16", "fwd", "kl"): Tile(128, 64, 64, 8, 3),  # 255 regs, 144 KB
    (90, "bf16", "bwd", "infonce"): Tile(128, 128, 64, 8, 4),  # 213 regs, 128 KB
    (90, "bf16", "bwd", "kl"): Tile(128, 64, 64, 8, 4),  # 212 regs, 192 KB
    (90, "bf16", "bwd", "kl_teacher_grad"): Tile(64, 64, 64, 4, 3),  # 255 regs, 96 KB
    (90, "fp16", "fwd", "infonce"): Tile(128, 128, 64, 8, 4),  # 211 regs, 128 KB
    (90, "fp16", "fwd", "kl"): Tile(128, 64, 64, 8, 3),  # 255 regs, 144 KB
    (90, "fp16", "bwd", "infonce"): Tile(128, 128, 64, 8, 4),  # 213 regs, 128 KB
    (90, "fp16", "bwd", "kl"): Tile(128, 64, 64, 8, 4),  # 212 regs, 192 KB
    (90, "fp16", "bwd", "kl_teacher_grad"): Tile(128, 64, 64, 8, 4),  # 255 regs, 192 KB
}

# fp32 inputs (TF32 or IEEE dots) are not a production dtype and are not swept: a small tile
# whose operands take as much shared memory per stage as a 16-bit 64 x 64 x 64 one.
FP32_TILE = Tile(64, 64, 32, 4, 2)


def variant_name(with_kl: bool, teacher_grad: bool = False) -> str:
    if not with_kl:
        return "infonce"
    return "kl_teacher_grad" if teacher_grad else "kl"


def smem_estimate(tile: Tile, dtype: torch.dtype, with_kl: bool, arch: int) -> int:
    """Shared memory a launch requests: the operand buffers, buffers x (rows + columns) x
    block_k (twice with the teacher), or one (block_m, block_n) tile in the input dtype (the
    backward's layout change before its store), whichever is larger.

    Triton keeps `num_stages` buffers on sm_90 and `num_stages - 1` on sm_80's cp.async
    pipeline (what the compiled kernels request: tests/test_triton_tiles.py checks it)."""
    elem = torch.empty((), dtype=dtype).element_size()
    buffers = tile.num_stages if arch >= 90 else max(1, tile.num_stages - 1)
    operands = buffers * (tile.block_m + tile.block_n) * tile.block_k * elem * (2 if with_kl else 1)
    return max(operands, tile.block_m * tile.block_n * elem)


def tile_for(kernel: str, capability: Tuple[int, int], dtype: torch.dtype, variant: str,
             smem_optin: Optional[int] = None) -> Tile:
    """The shipped tile for a device of `capability` (major, minor) and inputs of `dtype`.

    Architectures other than sm_80 / sm_90 use the nearest table below (>= 9: sm_90, else
    sm_80); when the device's shared memory per block (`smem_optin`) is smaller than the
    tile needs (sm_86/89/120 have ~99 KB), pipelining stages are dropped until it fits.
    """
    if kernel not in VARIANTS or variant not in VARIANTS[kernel]:
        raise ValueError(f"kernel/variant: expected one of {VARIANTS}, got {kernel!r}/{variant!r}")
    with_kl = variant != "infonce"
    names = {v: k for k, v in DTYPES.items()}
    arch = 90 if capability[0] >= 9 else 80
    tile = TILES[(arch, names[dtype], kernel, variant)] if dtype in names else FP32_TILE
    limit = smem_optin or SMEM_LIMIT[arch]
    while tile.num_stages > 2 and smem_estimate(tile, dtype, with_kl, arch) > limit:
        tile = Tile(tile.block_m, tile.block_n, tile.block_k, tile.num_warps, tile.num_stages - 1)
    if smem_estimate(tile, dtype, with_kl, arch) > limit:
        tile = FP32_TILE
    return tile
