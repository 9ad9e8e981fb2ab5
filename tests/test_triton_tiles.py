"""The shipped Triton tiles: the table's coverage and fallbacks, and a spill check without a GPU.

`test_shipped_tiles_compile_without_spills` compiles every entry of `_triton_tiles.TILES` for
sm_80 and sm_90 (both input dtypes, every kernel variant, caption ids and column statistics on
and off) with Triton's ahead-of-time path and fails on any spill or shared memory over the
arch's limit, so a kernel change that makes a shipped tile spill is caught on a CPU machine.
It does so twice: with the installed Triton (constraints/cpu.txt) and with the GPU image's
(constraints/gpu.txt), which `make test` puts in .cache/triton-<version>: the tiles run there,
and the two versions' ptxas allocate registers differently (two tiles chosen with 3.8 alone
spilled with 3.6). The compiles run in child processes (`_triton_aot.Toolchain`) and are cached
by Triton on disk: a re-run with unchanged kernels takes seconds.
"""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from cliperase.kernels._triton_tiles import (
    ARCHS, DTYPES, FP32_TILE, SMEM_LIMIT, TILES, VARIANTS, Tile, smem_estimate, tile_for,
)

from benchmarks.tile_sweep import gpu_image_triton


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


@pytest.fixture(scope="module", params=["installed", "gpu_image"])
def compiled(request):
    """The records of every shipped compile and of the fallback compiles (`fallback_jobs`),
    with the installed Triton or the GPU image's."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    from cliperase.kernels._triton_aot import Toolchain, fallback_jobs, shipped_jobs

    path, want = None, None
    if request.param == "gpu_image":
        path = gpu_image_triton()
        want = path.name.removeprefix("triton-")
        if not (path / "triton").is_dir():
            pytest.skip(f"the GPU image's Triton is not in {path}: `make test` installs it there")
    with Toolchain(path) as tc:
        if tc.skip:
            pytest.skip(tc.skip)
        assert want in (None, tc.versions["triton"]), f"{path} holds Triton {tc.versions['triton']}, not {want}"
        shipped, fallback = shipped_jobs(), fallback_jobs()
        records = tc.compile(shipped + fallback)
        return dict(shipped=records[:len(shipped)], fallback=records[len(shipped):])


def test_shipped_tiles_compile_without_spills(compiled):
    compiled = compiled["shipped"]
    assert not [r for r in compiled if "error" in r], [r["error"] for r in compiled if "error" in r]
    assert len(compiled) == 4 * sum(len(v) for v in VARIANTS.values()) * len(ARCHS) * len(DTYPES)
    bad = [r for r in compiled if r["spills"] or r["smem"] > SMEM_LIMIT[r["arch"]]]
    lines = [f"sm_{r['arch']} {r['dtype']} {r['kernel']} {r['flags']} {r['tile']}: regs {r['regs']} "
             f"stack {r['stack']} local {r['local']} smem {r['smem']}" for r in bad]
    assert not bad, "shipped tiles that spill or exceed shared memory:\n" + "\n".join(lines)
    assert all(0 < r["regs"] <= 255 for r in compiled)


def test_fp32_and_uneven_width_launches_compile(compiled):
    """Off the table: fp32 inputs (the default precision) and widths BLOCK_K does not divide.
    Small spills are tolerated there (fp32 IEEE dots spill 8-136 stack bytes); errors are not."""
    records = compiled["fallback"]
    assert len(records) == 5 * len(ARCHS) * 4 and {r["dtype"] for r in records} == {"fp32", *DTYPES}
    assert all(not r["flags"]["EVEN_K"] for r in records)
    errors = [f"sm_{r['arch']} {r['dtype']} {r['kernel']} {r['flags']}: {r['error']}" for r in records if "error" in r]
    assert not errors, "\n".join(errors)


def test_worst_of_merges_toolchains_to_their_worst_figures():
    pytest.importorskip("triton")
    from cliperase.kernels._triton_aot import worst_of

    key = dict(kernel="fwd", arch=90, dtype="bf16", tile=Tile(128, 64, 64, 8, 3).__dict__, flags={"HAS_KL": True})
    new = dict(key, regs=200, stack=0, local=0, smem=147456, spills=False, seconds=1.0)
    old = dict(key, regs=255, stack=16, local=0, smem=147456, spills=True, seconds=2.0)
    failed = dict(key, error="CompilationError: out of resources")
    (m,) = worst_of({"3.8.0": [new], "3.6.0": [old]})
    assert (m["regs"], m["stack"], m["spills"], m["seconds"]) == (255, 16, True, 3.0)
    assert m["by_triton"]["3.8.0"]["regs"] == 200 and m["by_triton"]["3.6.0"]["stack"] == 16
    (clean,) = worst_of({"3.8.0": [new], "3.6.0": [dict(new, regs=210)]})
    assert not clean["spills"] and clean["regs"] == 210
    (err,) = worst_of({"3.8.0": [new], "3.6.0": [failed]})
    assert err["error"].startswith("triton 3.6.0: CompilationError")
    with pytest.raises(ValueError, match="different jobs"):
        worst_of({"3.8.0": [new], "3.6.0": [dict(old, arch=80)]})


class _FakeToolchain:
    """Stands in for `_triton_aot.Toolchain`: records with shared memory from `smem_estimate` and
    stack bytes from `stack(tile)`, without compiling."""

    def __init__(self, version, stack):
        self.versions, self.stack = {"triton": version}, stack

    def compile(self, jobs):
        return [dict(kernel=k, arch=a, dtype=dt, tile=t.__dict__, flags=f, regs=200, stack=self.stack(t), local=0,
                     smem=smem_estimate(t, DTYPES[dt], f["HAS_KL"], a), spills=self.stack(t) > 0, seconds=0.1)
                for k, a, dt, t, f in jobs]


def test_the_sweep_only_picks_tiles_spill_free_with_every_triton():
    pytest.importorskip("triton")
    from benchmarks.tile_sweep import CANDIDATES, reuse, sweep_group

    clean = _FakeToolchain("3.8.0", lambda t: 0)
    # The other release spills every tile of 128 x 128 elements or more.
    tight = _FakeToolchain("3.6.0", lambda t: 16 if t.block_m * t.block_n >= 128 * 128 else 0)
    alone = sweep_group([clean], "fwd", "kl", 90, "bf16", CANDIDATES)
    both = sweep_group([clean, tight], "fwd", "kl", 90, "bf16", CANDIDATES)
    assert reuse(Tile(**alone["chosen"]["tile"])) == max(reuse(t) for t in CANDIDATES)
    # 256 x 64 would be next, but its three stages of operands exceed sm_90's shared memory.
    assert Tile(**both["chosen"]["tile"]) == Tile(128, 64, 64, 8, 4)
    checked = [r for r in both["compiled"] if Tile(**r["tile"]) == Tile(128, 64, 64, 8, 4)]
    assert len(checked) == 4 and all(set(r["by_triton"]) == {"3.8.0", "3.6.0"} for r in checked)
    assert any(r["spills"] and r["by_triton"]["3.8.0"]["stack"] == 0 for r in both["compiled"])
