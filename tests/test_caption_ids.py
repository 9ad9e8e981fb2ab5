"""Caption-id masking on every public loss and backend, against the materialised references.

An off-diagonal pair (i, j) with equal caption ids is not a negative: it is left out of the
student's and the teacher's softmax, in both directions. Ids are drawn from 3 values, so most
rows lose most of their negatives; `all_same` masks every off-diagonal pair (each row keeps only
its positive: InfoNCE and KL are 0 with zero gradient). Values and gradients (random upstream
weights) against `*_ref(upcast=True)` with the rule of tests/kernel_checks.py.
"""
import pytest
import torch

from kernel_checks import (  # noqa: F401
    CPU_DTYPES, LOSSES, TRAINED, check_loss, device_for_triton, loss_fn, loss_inputs,
    needs_triton, run_with_grads, SCALE, small_tiles,
)

# name: (n local rows, N global columns or None, d, row_offset); odd sizes, several tiles; d=32
# is a multiple of the interpreter's BLOCK_K (Triton's unmasked EVEN_K loads), d=19 is not.
CAPTION_SHAPES = {
    "sym_odd": (29, None, 19, 0),
    "local_global": (12, 40, 32, 16),
    "local_last_rank": (13, 41, 37, 28),
}
IDS = {"three": lambda n, g: torch.randint(0, 3, (n,), generator=g), "all_same": lambda n, g: torch.zeros(n, dtype=torch.long)}
# KL losses: the default frozen teacher scale (a detached copy of s) and a trained one (s itself,
# the kernels' TEACHER_GRAD variant).
TEACHER_SCALES = {"frozen": None, "trained": TRAINED}


def _ids(shape, kind, device="cpu"):
    n, big_n, _, _ = shape
    return IDS[kind](big_n or n, torch.Generator().manual_seed(5)).to(device)


def _cases(losses=LOSSES):
    return list(_case_iter(losses))


def _case_iter(losses):
    for name in losses:
        for scale in (TEACHER_SCALES if name != "clip_infonce" else {"frozen": None}):
            yield pytest.param(name, TEACHER_SCALES[scale], id=f"{name}-{scale}")


def _extra(name, ids, teacher_scale):
    extra = dict(caption_ids=ids)
    if name != "clip_infonce" and teacher_scale is not None:
        extra["teacher_logit_scale"] = teacher_scale
    return extra


# Duplicates in every dtype; every pair masked (a layout question, not a precision one) in fp32.
KINDS = {f"three-{k}": ("three", v) for k, v in CPU_DTYPES.items()}
KINDS["all_same-fp32"] = ("all_same", torch.float32)


@pytest.mark.parametrize("kind, dtype", KINDS.values(), ids=KINDS.keys())
@pytest.mark.parametrize("shape", CAPTION_SHAPES.values(), ids=CAPTION_SHAPES.keys())
@pytest.mark.parametrize("name, teacher_scale", _cases())
def test_chunked_caption_ids(name, teacher_scale, shape, dtype, kind, small_tiles):
    ids = _ids(shape, kind)
    truth = check_loss(name, "chunked", shape, dtype, **_extra(name, ids, teacher_scale))
    if kind == "all_same":
        assert all(v.abs().item() < 1e-5 for v in truth.values), "every row keeps only its positive"


# The interpreter is slow: each kernel variant once (the KL's frozen teacher scale through
# consistency_kl, the trained one through the fused loss), all-masked rows in fp32 only.
TRITON_CASES = [c for c in _cases() if c.id in ("clip_infonce-frozen", "consistency_kl-frozen", "cliperase_loss-trained")]
TRITON_KINDS = {k: KINDS[k] for k in ("three-fp32", "three-fp16", "all_same-fp32")}


@needs_triton
@pytest.mark.parametrize("kind, dtype", TRITON_KINDS.values(), ids=TRITON_KINDS.keys())
@pytest.mark.parametrize("shape", ["sym_odd", "local_global"])
@pytest.mark.parametrize("name, teacher_scale", TRITON_CASES)
def test_triton_caption_ids(name, teacher_scale, shape, dtype, kind):
    device = device_for_triton()
    shape = CAPTION_SHAPES[shape]
    check_loss(name, "triton", shape, dtype, device=device, **_extra(name, _ids(shape, kind, device), teacher_scale))


@pytest.mark.parametrize("name", LOSSES)
def test_masking_changes_the_loss(name):
    """The ids reach the loss: with them, values and gradients differ from the unmasked ones."""
    shape = CAPTION_SHAPES["local_global"]
    inputs, teacher = loss_inputs(shape, torch.float32)
    ids = _ids(shape, "three")
    for impl in ("ref32", "chunked"):
        plain = run_with_grads(loss_fn(name, impl, teacher), inputs, SCALE)
        masked = run_with_grads(loss_fn(name, impl, teacher, caption_ids=ids), inputs, SCALE)
        assert (plain.values[-1] - masked.values[-1]).abs().item() > 1e-3, impl
        assert (plain.grads[0] - masked.grads[0]).abs().max().item() > 1e-4, impl


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("bad, match", [
    (torch.zeros(39, dtype=torch.long), "length N_global=40"),
    (torch.zeros(40, 1, dtype=torch.long), "1-D"),
    (torch.zeros(40), "integer tensor"),
    ([0] * 40, "torch.Tensor"),
])
def test_rejects_bad_caption_ids(name, bad, match):
    inputs, teacher = loss_inputs(CAPTION_SHAPES["local_global"], torch.float32)
    for impl in ("ref32", "chunked"):
        with pytest.raises(ValueError, match=match):
            loss_fn(name, impl, teacher, caption_ids=bad)(*inputs, torch.tensor(SCALE))


@needs_triton
def test_triton_dense_ids_keep_every_equality():
    """The Triton backend compares int32 ranks: same equalities as the int64 ids, any values."""
    from cliperase.kernels._triton_contrastive import _dense_ids

    ids = torch.tensor([2**40, -7, 2**40, 5, -7, 2**40 + 1, 5, 0])
    ranks = _dense_ids(ids)
    assert ranks.dtype == torch.int32 and ranks.min().item() == 0 and ranks.max().item() == 4
    assert torch.equal(ranks[:, None] == ranks[None, :], ids[:, None] == ids[None, :])
