"""GPU tier of the kernels at scale: bf16, caption ids, N >= 16,384, several backward stripes.

`pytest -m gpu tests/test_kernels_gpu.py` on a CUDA machine. Each case runs Triton and the
chunked path on the same inputs against the fp32 reference (the rule of tests/kernel_checks.py),
with caption ids drawn from 64 values (~N/64 masked pairs per row) and a backward column stripe
small enough for 4+ stripes per pass, so the per-stripe accumulation of dA and the stripe
offsets are exercised. The same code runs in the CPU tier at small N under the Triton
interpreter (fp16: the interpreter computes bf16 wrongly), so it is known to execute.
"""
import dataclasses

import pytest
import torch

from cliperase.kernels import _contrastive
from kernel_checks import (
    LOSSES, SCALE, TRAINED, assert_fast_close, device_for_triton, loss_fn, loss_inputs, needs_triton,
    run_with_grads,
)

GPU_CASES = {
    "n16384_symmetric": (16384, None, 1024, 0),
    "n16384_rank3_of_4": (4096, 16384, 1024, 12288),
}
GPU_STRIPE_COLS = 4096  # 4 stripes per pass at N = 16,384
ID_VALUES = 64
# The interpreter stand-ins: the same layouts at N <= 48, stripes of 16 columns.
CPU_CASES = {"n40_symmetric": (40, None, 24, 0), "n40_rank3_of_4": (10, 40, 24, 30)}
CPU_STRIPE_COLS = 16


class _LaunchCounter:
    """Wraps a Triton kernel and counts its launches (`kernel[grid](...)`)."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.fixture
def stripes(monkeypatch):
    """Set the backward stripe width of both Triton configs; returns the launch counter."""
    from cliperase.kernels import _triton_contrastive as T

    def apply(cols: int) -> _LaunchCounter:
        for name in ("DEFAULT_TRITON_CONFIG", "INTERPRETER_CONFIG"):
            monkeypatch.setattr(T, name, dataclasses.replace(getattr(T, name), stripe_cols=cols))
        counter = _LaunchCounter(T._grad_logits_kernel)
        monkeypatch.setattr(T, "_grad_logits_kernel", counter)
        return counter

    return apply


def check_triton_and_chunked(name, shape, dtype, device, stripe_cols, stripes):
    """Triton and chunked against the fp32 reference on the same bf16/fp16 inputs with caption
    ids; asserts the backward ran more than one stripe per pass."""
    n, big_n, _, _ = shape
    ids = torch.randint(0, ID_VALUES, (big_n or n,), generator=torch.Generator().manual_seed(7)).to(device)
    extra = dict(caption_ids=ids)
    if name != "clip_infonce":
        extra["teacher_logit_scale"] = TRAINED  # the heaviest backward variant
    inputs, teacher = loss_inputs(shape, dtype, device=device, seed=11)
    truth = run_with_grads(loss_fn(name, "ref32", teacher, **extra), inputs, SCALE)
    low = run_with_grads(loss_fn(name, "ref_low", teacher, **extra), inputs, SCALE)
    chunked = run_with_grads(loss_fn(name, "chunked", teacher, **extra), inputs, SCALE)
    counter = stripes(stripe_cols)
    triton_res = run_with_grads(loss_fn(name, "triton", teacher, **extra), inputs, SCALE)
    passes = 1 if big_n is None else 2
    assert counter.launches >= 2 * passes, f"{counter.launches} backward launches: expected 2+ stripes per pass"
    assert_fast_close(chunked, low, truth, dtype, what=f"chunked {name} {shape}")
    assert_fast_close(triton_res, low, truth, dtype, what=f"triton {name} {shape}")
    # Both on the same inputs: their difference is within their two errors (reported on failure).
    for t, c, ref in zip(triton_res.values, chunked.values, truth.values):
        assert (t - c).abs().item() <= (t - ref).abs().item() + (c - ref).abs().item() + 1e-6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", GPU_CASES.values(), ids=GPU_CASES.keys())
@pytest.mark.parametrize("name", LOSSES)
def test_gpu_bf16_caption_ids_many_stripes(name, shape, stripes):
    assert _contrastive.DEFAULT_CHUNKED_CONFIG.tile_dtype == "auto"  # bf16 GEMMs on CUDA
    check_triton_and_chunked(name, shape, torch.bfloat16, "cuda", GPU_STRIPE_COLS, stripes)


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA machine runs the real sizes (-m gpu)")
@pytest.mark.parametrize("shape", CPU_CASES.values(), ids=CPU_CASES.keys())
@pytest.mark.parametrize("name", LOSSES)
def test_gpu_tier_code_runs_in_the_interpreter(name, shape, stripes):
    check_triton_and_chunked(name, shape, torch.float16, device_for_triton(), CPU_STRIPE_COLS, stripes)
