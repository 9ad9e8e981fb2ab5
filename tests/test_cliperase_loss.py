"""cliperase_loss: the fused (InfoNCE, KL) pair against the references, and the package surface.

The two outputs get independent random upstream weights, so a gradient routed to the wrong term
shows up. Also: importing the package does not import Triton, and the default backend on CPU.
"""
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from cliperase.kernels import cliperase_loss, cliperase_loss_ref
from cliperase.kernels._common import resolve_impl, triton_available
from kernel_checks import (  # noqa: F401
    CPU_DTYPES, GPU_SHAPES, INTERPRETER_DTYPES, SCALE, SHAPES, TRITON_SHAPES, assert_fast_close, embeddings, needs_triton,
    run_with_grads, small_tiles,
)


def _inputs(shape, dtype, device="cpu", seed=0):
    n, big_n, d, off = shape
    gen = torch.Generator().manual_seed(seed)
    rows = big_n or n
    zi_all, zt_all = embeddings(rows, d, dtype, gen, device), embeddings(rows, d, dtype, gen, device)
    noise = [embeddings(rows, d, torch.float32, gen, device) for _ in range(2)]
    zi0_all = torch.nn.functional.normalize(zi_all.float() + 0.3 * noise[0], dim=1).to(dtype)
    zt0_all = torch.nn.functional.normalize(zt_all.float() + 0.3 * noise[1], dim=1).to(dtype)
    if big_n is None:
        return [zi_all, zt_all], dict(zi0=zi0_all, zt0=zt0_all)
    teacher = dict(zi0=zi0_all[off : off + n], zt0=zt0_all[off : off + n], zi0_all=zi0_all, zt0_all=zt0_all, row_offset=off)
    return [zi_all[off : off + n], zt_all[off : off + n], zi_all, zt_all], teacher


def _loss(impl, teacher):
    def fn(*args):
        *z, s = args
        kw = dict(teacher)
        zi0, zt0 = kw.pop("zi0"), kw.pop("zt0")
        if len(z) == 4:
            kw.update(zi_all=z[2], zt_all=z[3])
        if impl in ("ref32", "ref_low"):
            return cliperase_loss_ref(z[0], z[1], zi0, zt0, s, upcast=impl == "ref32", **kw)
        return cliperase_loss(z[0], z[1], zi0, zt0, s, impl=impl, **kw)

    return fn


def _check(impl, shape, dtype, device="cpu"):
    inputs, teacher = _inputs(shape, dtype, device=device)
    truth = run_with_grads(_loss("ref32", teacher), inputs, SCALE)
    low = run_with_grads(_loss("ref_low", teacher), inputs, SCALE)
    fast = run_with_grads(_loss(impl, teacher), inputs, SCALE)
    assert len(fast.values) == 2
    assert_fast_close(fast, low, truth, dtype, what=f"{impl} {shape} {dtype}")


@pytest.mark.parametrize("dtype", CPU_DTYPES.values(), ids=CPU_DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_chunked_matches_ref(shape, dtype, small_tiles):
    _check("chunked", shape, dtype)


def test_chunked_large_n_default_tiles():
    _check("chunked", (2100, None, 32, 0), torch.float32)


@needs_triton
@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES.values(), ids=INTERPRETER_DTYPES.keys())
@pytest.mark.parametrize("shape", TRITON_SHAPES)
def test_triton_matches_ref(shape, dtype):
    _check("triton", SHAPES[shape], dtype, device="cuda" if torch.cuda.is_available() else "cpu")


def test_import_does_not_import_triton():
    # A fresh interpreter: this test session may already have imported Triton.
    code = "import sys, cliperase.kernels; sys.exit('triton' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_default_impl_on_cpu_is_chunked():
    t = torch.zeros(2, 2)
    assert resolve_impl(None, (t, t), ("ref", "chunked", "triton")) == "chunked"
    assert resolve_impl("ref", (t, t), ("ref", "chunked", "triton")) == "ref"


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_default_impl_on_cuda_is_triton():
    # resolve_impl reads only `is_cuda`: stand-ins for CUDA tensors on a machine without one.
    cuda = SimpleNamespace(is_cuda=True)
    assert resolve_impl(None, (cuda, cuda), ("ref", "chunked", "triton")) == "triton"
    assert resolve_impl(None, (cuda, torch.zeros(1)), ("ref", "chunked", "triton")) == "chunked"


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-tensor error; CUDA tensors are fine")
def test_triton_on_cpu_says_what_to_do(monkeypatch):
    from cliperase.kernels import _triton_contrastive

    # As in a session without TRITON_INTERPRET: compiled kernels cannot take CPU tensors.
    monkeypatch.setattr(_triton_contrastive, "_interpreted", lambda: False)
    inputs, teacher = _inputs(SHAPES["tiny"], torch.float32)
    with pytest.raises(ValueError, match="impl='chunked'"):
        cliperase_loss(*inputs, teacher["zi0"], teacher["zt0"], SCALE, impl="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", GPU_SHAPES.values(), ids=GPU_SHAPES.keys())
def test_triton_gpu_production(shape, dtype):
    _check("triton", shape, dtype, device="cuda")
