"""clip_infonce: chunked and Triton against the materialised reference, values and gradients.

CPU tier: chunked at every shape and dtype (small tiles, so several tiles, uneven ones included),
chunked at N=2500 with its default tiles, Triton in the interpreter at small sizes (fp32/fp16;
the interpreter computes bf16 wrongly). GPU tier: Triton at the production shape in bf16.
Caption-id masking is tested for all three losses in test_caption_ids.py.
"""

import pytest
import torch

from cliperase.kernels import clip_infonce, clip_infonce_ref
from kernel_checks import (  # noqa: F401
    CPU_DTYPES, GPU_SHAPES, INTERPRETER_DTYPES, SCALE, SHAPES, TRITON_SHAPES, assert_fast_close, embeddings, needs_triton,
    run_with_grads, small_tiles,
)


def _inputs(shape, dtype, seed=0, device="cpu"):
    n, big_n, d, off = shape
    gen = torch.Generator().manual_seed(seed)
    rows = big_n or n
    zi_all = embeddings(rows, d, dtype, gen, device)
    zt_all = embeddings(rows, d, dtype, gen, device)
    if big_n is None:
        return [zi_all, zt_all], {}
    return [zi_all[off : off + n], zt_all[off : off + n], zi_all, zt_all], {"row_offset": off}


def _loss(impl, kw, **extra):
    """A closure over (zi, zt[, zi_all, zt_all], logit_scale) for `run_with_grads`."""
    def fn(*args):
        *z, s = args
        if len(z) == 4:
            extra_kw = dict(zi_all=z[2], zt_all=z[3], **kw, **extra)
        else:
            extra_kw = dict(**kw, **extra)
        if impl in ("ref32", "ref_low"):
            return clip_infonce_ref(z[0], z[1], s, upcast=impl == "ref32", **extra_kw)
        return clip_infonce(z[0], z[1], s, impl=impl, **extra_kw)

    return fn


def _check(impl, shape, dtype, device="cpu", **extra):
    inputs, kw = _inputs(shape, dtype, device=device)
    truth = run_with_grads(_loss("ref32", kw, **extra), inputs, SCALE)
    low = run_with_grads(_loss("ref_low", kw, **extra), inputs, SCALE)
    fast = run_with_grads(_loss(impl, kw, **extra), inputs, SCALE)
    assert_fast_close(fast, low, truth, dtype, what=f"{impl} {shape} {dtype}")


@pytest.mark.parametrize("dtype", CPU_DTYPES.values(), ids=CPU_DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_chunked_matches_ref(shape, dtype, small_tiles):
    _check("chunked", shape, dtype)


@pytest.mark.parametrize("shape", [(2500, None, 32, 0), (512, 2048, 32, 1024)], ids=["N2500", "local512_of_2048"])
def test_chunked_large_n_default_tiles(shape):
    # Default 1024-wide tiles: N=2500 leaves an uneven last tile in both directions.
    _check("chunked", shape, torch.float32)


def test_chunked_saves_no_n_by_n(small_tiles):
    """Autograd keeps O(N d + N) bytes for the chunked path, not the O(N^2) of the reference."""
    n, d = 256, 8
    gen = torch.Generator().manual_seed(0)
    zi, zt = (embeddings(n, d, torch.float32, gen).requires_grad_(True) for _ in range(2))
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        clip_infonce(zi, zt, SCALE, impl="chunked")
    assert sum(saved) < 4 * n * d * 4 + 64 * n
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        clip_infonce_ref(zi, zt, SCALE)
    assert sum(saved) >= n * n * 4  # the reference does keep an n x n matrix: the check can fail


def test_logit_scale_gradient_matches_finite_difference():
    inputs, kw = _inputs(SHAPES["local_global"], torch.float32)
    zi, zt, zi_all, zt_all = inputs
    s = torch.tensor(SCALE, requires_grad=True)
    clip_infonce(zi, zt, s, zi_all=zi_all, zt_all=zt_all, impl="chunked", **kw).backward()
    eps = 1e-2
    with torch.no_grad():
        hi = clip_infonce(zi, zt, SCALE + eps, zi_all=zi_all, zt_all=zt_all, impl="chunked", **kw)
        lo = clip_infonce(zi, zt, SCALE - eps, zi_all=zi_all, zt_all=zt_all, impl="chunked", **kw)
    assert s.grad.item() == pytest.approx(((hi - lo) / (2 * eps)).item(), rel=1e-3, abs=1e-4)


def test_rejects_bad_arguments():
    gen = torch.Generator().manual_seed(0)
    zi, zt = embeddings(4, 8, torch.float32, gen), embeddings(4, 8, torch.float32, gen)
    with pytest.raises(ValueError, match="impl"):
        clip_infonce(zi, zt, SCALE, impl="fused")
    with pytest.raises(ValueError, match="caption_ids"):
        clip_infonce(zi, zt, SCALE, caption_ids=torch.zeros(5, dtype=torch.long), impl="chunked")
    with pytest.raises(ValueError, match="zt"):
        clip_infonce(zi, zt[:3], SCALE, impl="chunked")
    with pytest.raises(ValueError, match="row_offset"):
        clip_infonce(zi, zt, SCALE, zi_all=zi, zt_all=zt, row_offset=1, impl="chunked")


@needs_triton
@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES.values(), ids=INTERPRETER_DTYPES.keys())
@pytest.mark.parametrize("shape", TRITON_SHAPES)
def test_triton_matches_ref(shape, dtype):
    _check("triton", SHAPES[shape], dtype, device="cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", GPU_SHAPES.values(), ids=GPU_SHAPES.keys())
def test_triton_gpu_production(shape, dtype):
    _check("triton", shape, dtype, device="cuda")
