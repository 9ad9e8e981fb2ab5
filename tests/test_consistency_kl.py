"""consistency_kl: chunked and Triton against the materialised reference, values and gradients.

Gradients are checked for the student rows and columns and for `logit_scale`, with the default
teacher scale (a detached copy of `s`), a separate frozen `teacher_logit_scale`, and a trained
one (`s` itself, which then also receives the teacher logits' gradient: the kernels'
TEACHER_GRAD variant).
"""

import pytest
import torch

from cliperase.kernels import consistency_kl, consistency_kl_ref
from kernel_checks import (  # noqa: F401
    CPU_DTYPES, GPU_SHAPES, INTERPRETER_DTYPES, SCALE, SHAPES, TRITON_SHAPES, assert_fast_close, embeddings, needs_triton,
    TRAINED, run_with_grads, small_tiles,
)

TEACHER_SCALES = {"shared": None, "frozen": 11.0, "trained": TRAINED}


def _inputs(shape, dtype, device="cpu", seed=0):
    """Student tensors (the leaves that get gradients) and the teacher keyword arguments."""
    n, big_n, d, off = shape
    gen = torch.Generator().manual_seed(seed)
    rows = big_n or n
    zi_all, zt_all = embeddings(rows, d, dtype, gen, device), embeddings(rows, d, dtype, gen, device)
    # The teacher is a perturbed copy of the student, as after a few unlearning steps.
    zi0_all = torch.nn.functional.normalize(zi_all.float() + 0.3 * embeddings(rows, d, torch.float32, gen, device), dim=1).to(dtype)
    zt0_all = torch.nn.functional.normalize(zt_all.float() + 0.3 * embeddings(rows, d, torch.float32, gen, device), dim=1).to(dtype)
    if big_n is None:
        return [zi_all, zt_all], dict(zi0=zi0_all, zt0=zt0_all)
    teacher = dict(zi0=zi0_all[off : off + n], zt0=zt0_all[off : off + n], zi0_all=zi0_all, zt0_all=zt0_all, row_offset=off)
    return [zi_all[off : off + n], zt_all[off : off + n], zi_all, zt_all], teacher


def _loss(impl, teacher, teacher_scale):
    def fn(*args):
        *z, s = args
        kw = dict(teacher)
        zi0, zt0 = kw.pop("zi0"), kw.pop("zt0")
        if len(z) == 4:
            kw.update(zi_all=z[2], zt_all=z[3])
        kw["teacher_logit_scale"] = s if teacher_scale == TRAINED else teacher_scale
        if impl in ("ref32", "ref_low"):
            return consistency_kl_ref(z[0], z[1], zi0, zt0, s, upcast=impl == "ref32", **kw)
        return consistency_kl(z[0], z[1], zi0, zt0, s, impl=impl, **kw)

    return fn


def _check(impl, shape, dtype, teacher_scale=None, device="cpu"):
    inputs, teacher = _inputs(shape, dtype, device=device)
    truth = run_with_grads(_loss("ref32", teacher, teacher_scale), inputs, SCALE)
    low = run_with_grads(_loss("ref_low", teacher, teacher_scale), inputs, SCALE)
    fast = run_with_grads(_loss(impl, teacher, teacher_scale), inputs, SCALE)
    assert truth.values[0].item() > 0  # a non-trivial KL, or the comparison proves little
    assert_fast_close(fast, low, truth, dtype, what=f"{impl} {shape} {dtype}")


@pytest.mark.parametrize("teacher_scale", TEACHER_SCALES.values(), ids=TEACHER_SCALES.keys())
@pytest.mark.parametrize("dtype", CPU_DTYPES.values(), ids=CPU_DTYPES.keys())
@pytest.mark.parametrize("shape", [k for k in SHAPES if k != "batch1"])
def test_chunked_matches_ref(shape, dtype, teacher_scale, small_tiles):
    _check("chunked", SHAPES[shape], dtype, teacher_scale)


def test_batch1_is_zero(small_tiles):
    # One row and one column: both softmaxes are [1], the KL is exactly 0 with zero gradient.
    inputs, teacher = _inputs(SHAPES["batch1"], torch.float32)
    res = run_with_grads(_loss("chunked", teacher, None), inputs, SCALE)
    assert res.values[0].abs().item() < 1e-6
    assert all(g.abs().max().item() < 1e-6 for g in res.grads)


def test_chunked_large_n_default_tiles():
    _check("chunked", (2100, None, 32, 0), torch.float32)


def test_teacher_gets_no_gradient():
    inputs, teacher = _inputs(SHAPES["local_global"], torch.float32)
    teacher = {k: (v.clone().requires_grad_(True) if torch.is_tensor(v) else v) for k, v in teacher.items()}
    zi, zt, zi_all, zt_all = (t.clone().requires_grad_(True) for t in inputs)
    consistency_kl(zi, zt, logit_scale=SCALE, zi_all=zi_all, zt_all=zt_all, impl="chunked", **teacher).backward()
    assert zi.grad is not None and zi_all.grad is not None
    assert all(v.grad is None for v in teacher.values() if torch.is_tensor(v))


def test_rejects_teacher_shape_mismatch():
    inputs, teacher = _inputs(SHAPES["local_global"], torch.float32)
    teacher["zi0_all"] = teacher["zi0_all"][:-1]
    with pytest.raises(ValueError, match="zi0_all"):
        consistency_kl(inputs[0], inputs[1], logit_scale=SCALE, zi_all=inputs[2], zt_all=inputs[3], impl="chunked", **teacher)


@needs_triton
@pytest.mark.parametrize("teacher_scale", TEACHER_SCALES.values(), ids=TEACHER_SCALES.keys())
@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES.values(), ids=INTERPRETER_DTYPES.keys())
@pytest.mark.parametrize("shape", [k for k in TRITON_SHAPES if k != "batch1"])
def test_triton_matches_ref(shape, dtype, teacher_scale):
    _check("triton", SHAPES[shape], dtype, teacher_scale, device="cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", GPU_SHAPES.values(), ids=GPU_SHAPES.keys())
def test_triton_gpu_production(shape, dtype):
    _check("triton", shape, dtype, device="cuda")
