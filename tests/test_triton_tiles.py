"""The shipped Triton tiles: the table's coverage and fallbacks, and a spill check without a GPU.

`test_shipped_tiles_compile_without_spills` compiles every entry of `_triton_tiles.TILES` for
sm_80 and sm_90 (both input dtypes, every kernel variant, caption ids and column statistics on
and off) with Triton's ahead-of-time path and fails on any spill or shared memory over the
arch's limit, so a kernel change that makes a shipped tile spill is caught on a CPU machine.
The compiles run in fresh processes (this session has TRITON_INTERPRET=1, whose kernels cannot
be compiled) and are cached by Triton on disk: a re-run with unchanged kernels takes seconds.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cliperase.kernels._triton_tiles import (
    ARCHS, DTYPES, FP32_TILE, SMEM_LIMIT, TILES, VARIANTS, Tile, smem_estimate, tile_for,
)

_CHECK = (
    "import json, sys\n"
    "from cliperase.kernels._triton_aot import can_compile, check_shipped\n"
    "reason = can_compile()\n"
    "print(json.dumps({'skip': reason} if reason else {'records': check_shipped(2)}))\n"
)


def test_table_covers_every_arch_dtype_and_variant():
    want = {(a, dt, k, v) for a in ARCHS for dt in DTYPES for k, vs in VARIANTS.items() for v in vs}
    assert set(TILES) == want
    assert all(isinstance(t, Tile) for t in TILES.values())


@pytest.mark.parametrize("capability, arch", [((9, 0), 90), ((10, 0), 90), ((8, 0), 80), ((7, 5), 80)])
def test_tile_for_picks_the_nearest_arch(capability, arch):
    for kernel, variants in VARIANTS.items():
        for variant in variants:
            assert tile_for(kernel, capability, torch.bfloat16, variant) == TILES[(arch, "bf16", kernel, variant)]


def test_tile_for_fits_a_smaller_shared_memory():
    """sm_86/89 allow ~99 KB per block: stages are dropped until the operand buffers fit."""
    limit = 101376
    dropped = 0
    for kernel, variants in VARIANTS.items():
        for variant in variants:
            tile = tile_for(kernel, (8, 6), torch.float16, variant, smem_optin=limit)
            assert smem_estimate(tile, torch.float16, variant != "infonce", 80) <= limit
            shipped = TILES[(80, "fp16", kernel, variant)]
            assert tile in {shipped, FP32_TILE} or (
                tile.num_stages < shipped.num_stages and tile.block_m == shipped.block_m)
            dropped += tile != shipped
    assert dropped, "some sm_80 tile needs more than 99 KB: the fallback must have been exercised"


def test_smem_estimate_matches_the_compiled_kernels():
    """Against what the sweep's compiled kernels requested (benchmarks/results/tile-sweep.json):
    never below it (the sm_86/89 fallback relies on that), and exact for the shipped tiles."""
    sweep = json.loads((Path(__file__).parent.parent / "benchmarks/results/tile-sweep.json").read_text())
    checked = 0
    for group in sweep["groups"]:
        shipped = Tile(**group["chosen"]["tile"])
        for rec in group["compiled"]:
            if "error" in rec:
                continue
            tile = Tile(**rec["tile"])
            est = smem_estimate(tile, DTYPES[rec["dtype"]], rec["flags"]["HAS_KL"], rec["arch"])
            assert est >= rec["smem"] - 1024, rec  # sm_90 adds ~1 KB of barriers
            if tile == shipped:
                assert est <= rec["smem"] + 1024, rec
                checked += 1
    assert checked == 4 * len(sweep["groups"])


def test_tile_for_fp32_and_bad_names():
    assert tile_for("fwd", (9, 0), torch.float32, "kl") == FP32_TILE
    with pytest.raises(ValueError, match="variant"):
        tile_for("fwd", (9, 0), torch.bfloat16, "kl_teacher_grad")  # a backward-only variant


@pytest.fixture(scope="module")
def compiled():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _CHECK], env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in out:
        pytest.skip(out["skip"])
    return out["records"]


def test_shipped_tiles_compile_without_spills(compiled):
    assert len(compiled) == 4 * sum(len(v) for v in VARIANTS.values()) * len(ARCHS) * len(DTYPES)
    bad = [r for r in compiled if r["spills"] or r["smem"] > SMEM_LIMIT[r["arch"]]]
    lines = [f"sm_{r['arch']} {r['dtype']} {r['kernel']} {r['flags']} {r['tile']}: regs {r['regs']} "
             f"stack {r['stack']} local {r['local']} smem {r['smem']}" for r in bad]
    assert not bad, "shipped tiles that spill or exceed shared memory:\n" + "\n".join(lines)
    assert all(0 < r["regs"] <= 255 for r in compiled)
