"""The chunked backend's tile dtype (`ChunkedConfig.tile_dtype`): fp32 tiles on CPU by default,
input-dtype GEMMs (bf16/fp16 operands, fp32 accumulation) on CUDA; both modes against the
references with the rule of tests/kernel_checks.py, on CPU.
"""
import pytest
import torch

from cliperase.kernels import _contrastive
from cliperase.kernels._contrastive import ChunkedConfig, tile_dtype
from kernel_checks import LOSSES, SCALE, check_loss, loss_fn, loss_inputs, run_with_grads

LOW = {"fp16": torch.float16, "bf16": torch.bfloat16}
SHAPES = {"odd": (37, None, 45, 0), "local_global": (12, 40, 24, 16)}


@pytest.fixture
def input_tiles(monkeypatch):
    """Small uneven tiles whose GEMMs run in the input dtype, as on CUDA."""
    monkeypatch.setattr(_contrastive, "DEFAULT_CHUNKED_CONFIG", ChunkedConfig(16, 8, tile_dtype="input"))


def test_auto_is_input_dtype_on_cuda_and_fp32_elsewhere():
    assert tile_dtype("auto", torch.bfloat16, is_cuda=True) == torch.bfloat16
    assert tile_dtype("auto", torch.float16, is_cuda=True) == torch.float16
    assert tile_dtype("auto", torch.bfloat16, is_cuda=False) == torch.float32
    assert tile_dtype("fp32", torch.bfloat16, is_cuda=True) == torch.float32
    assert tile_dtype("input", torch.bfloat16, is_cuda=False) == torch.bfloat16
    assert ChunkedConfig().tile_dtype == "auto"


@pytest.mark.parametrize("dtype", LOW.values(), ids=LOW.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("name", LOSSES)
def test_input_dtype_tiles_match_ref(name, shape, dtype, input_tiles):
    n, big_n, _, _ = shape
    ids = torch.randint(0, 3, (big_n or n,), generator=torch.Generator().manual_seed(2))
    check_loss(name, "chunked", shape, dtype, caption_ids=ids)


@pytest.mark.parametrize("name", LOSSES)
def test_tile_dtype_changes_the_gemms(name, monkeypatch):
    """The setting takes effect: bf16 tiles round the logits, fp32 tiles do not, so only the
    fp32 mode reproduces the fp32 reference to fp32 accuracy on the same bf16 inputs (the fp32
    outputs: the losses and d/ds; embedding gradients come back rounded to bf16 in both)."""
    inputs, teacher = loss_inputs(SHAPES["odd"], torch.bfloat16)
    truth = run_with_grads(loss_fn(name, "ref32", teacher), inputs, SCALE)
    err = {}
    for mode in ("fp32", "input"):
        monkeypatch.setattr(_contrastive, "DEFAULT_CHUNKED_CONFIG", ChunkedConfig(16, 8, tile_dtype=mode))
        got = run_with_grads(loss_fn(name, "chunked", teacher), inputs, SCALE)
        pairs = [*zip(got.values, truth.values), (got.scale_grad, truth.scale_grad)]
        err[mode] = max((g - t).abs().max().item() for g, t in pairs)
    assert err["fp32"] < 1e-5 < err["input"], err


@pytest.mark.parametrize("bad, match", [
    (dict(tile_dtype="bf16"), "tile_dtype"),
    (dict(block_m=0), "block_m"),
    (dict(block_n=2.5), "block_n"),
])
def test_config_rejects_bad_fields(bad, match):
    with pytest.raises(ValueError, match=match):
        ChunkedConfig(**bad)
