"""The reference losses against independent math: open_clip's ClipLoss and explicit loops."""
import math

import pytest
import torch
import torch.nn.functional as F

from cliperase.kernels import clip_infonce_ref, cliperase_loss_ref, consistency_kl_ref, forget_similarity

SHAPES = {"tiny": (3, 4), "odd": (37, 29), "one": (1, 5)}


def _emb(n, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_clip_infonce_matches_open_clip_value_and_grad(shape):
    import open_clip

    n, d = shape
    zi, zt = _emb(n, d, 0).requires_grad_(), _emb(n, d, 1).requires_grad_()
    ours = clip_infonce_ref(zi, zt, 7.5, upcast=False)
    ours.backward()
    gi, gt = zi.grad.clone(), zt.grad.clone()
    zi.grad = zt.grad = None
    theirs = open_clip.ClipLoss()(zi, zt, torch.tensor(7.5, dtype=torch.float64))
    theirs.backward()
    # The reference accumulates the cross-entropy in fp32 by contract: fp32 tolerances.
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    torch.testing.assert_close(gi, zi.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gt, zt.grad, rtol=1e-5, atol=1e-7)


def test_clip_infonce_local_rows_sum_to_global_loss():
    """Two 'ranks' each computing local rows against global columns average to the full loss."""
    zi, zt = _emb(10, 6, 2), _emb(10, 6, 3)
    full = clip_infonce_ref(zi, zt, 4.0)
    halves = [clip_infonce_ref(zi[o : o + 5], zt[o : o + 5], 4.0, zi_all=zi, zt_all=zt, row_offset=o) for o in (0, 5)]
    assert (halves[0] + halves[1]).item() / 2 == pytest.approx(full.item(), rel=1e-6)


def test_clip_infonce_masks_identical_captions():
    zi, zt = _emb(4, 3, 4), _emb(4, 3, 5)
    ids = torch.tensor([0, 0, 1, 2])
    got = clip_infonce_ref(zi, zt, 3.0, caption_ids=ids)
    s = 3.0 * zi.float() @ zt.float().T
    total = 0.0
    for logits in (s, s.T):
        for i in range(4):
            keep = [j for j in range(4) if j == i or ids[j] != ids[i]]
            total += -(logits[i, i] - torch.logsumexp(logits[i, keep], 0)).item()
    assert got.item() == pytest.approx(total / 8, rel=1e-5)


def _kl_loops(zi, zt, zi0, zt0, s, s0, ids=None):
    """KL(p0 || p) per row by explicit sums, both directions, averaged over rows; with `ids`,
    both softmaxes run over the columns j == i or ids[j] != ids[i] only."""
    def direction(a, b, a0, b0):
        total = 0.0
        for i in range(a.shape[0]):
            keep = [j for j in range(b.shape[0]) if ids is None or j == i or ids[j] != ids[i]]
            logits = [s * float(a[i] @ b[j]) for j in keep]
            logits0 = [s0 * float(a0[i] @ b0[j]) for j in keep]
            lse, lse0 = math.log(sum(map(math.exp, logits))), math.log(sum(map(math.exp, logits0)))
            total += sum(math.exp(l0 - lse0) * ((l0 - lse0) - (l - lse)) for l, l0 in zip(logits, logits0))
        return total / a.shape[0]

    return direction(zi, zt, zi0, zt0) + direction(zt, zi, zt0, zi0)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_consistency_kl_matches_hand_computed(shape):
    n, d = shape
    zi, zt, zi0, zt0 = (_emb(n, d, k) for k in range(4))
    got = consistency_kl_ref(zi, zt, zi0, zt0, 6.0, teacher_logit_scale=5.0)
    assert got.item() == pytest.approx(_kl_loops(zi, zt, zi0, zt0, 6.0, 5.0), rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("ids", [[0, 1, 0, 2, 1, 0, 0], [3] * 7], ids=["three", "all_same"])
def test_consistency_kl_masks_identical_captions(ids):
    zi, zt, zi0, zt0 = (_emb(7, 4, k) for k in range(30, 34))
    got = consistency_kl_ref(zi, zt, zi0, zt0, 6.0, teacher_logit_scale=5.0, caption_ids=torch.tensor(ids))
    assert got.item() == pytest.approx(_kl_loops(zi, zt, zi0, zt0, 6.0, 5.0, ids), rel=1e-6, abs=1e-9)
    if len(set(ids)) > 1:  # the mask matters
        assert abs(got.item() - _kl_loops(zi, zt, zi0, zt0, 6.0, 5.0)) > 1e-3


def test_masked_references_have_finite_gradients():
    """Every off-diagonal pair masked: each row keeps only its positive, losses and gradients 0
    (the -inf of masked pairs must not turn into nan, also for a trained teacher scale)."""
    zi, zt, zi0, zt0 = (_emb(5, 3, k).requires_grad_() for k in range(40, 44))
    s = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    infonce, kl = cliperase_loss_ref(zi, zt, zi0.detach(), zt0.detach(), s, teacher_logit_scale=s,
                                     caption_ids=torch.zeros(5, dtype=torch.long))
    (infonce + kl).backward()
    assert infonce.item() == pytest.approx(0.0, abs=1e-6) and kl.item() == pytest.approx(0.0, abs=1e-12)
    for g in (zi.grad, zt.grad, s.grad):
        assert torch.isfinite(g).all() and g.abs().max().item() < 1e-6


def test_consistency_kl_zero_for_identical_models_and_grad_is_p_minus_p0():
    zi, zt = _emb(6, 5, 7), _emb(6, 5, 8)
    assert consistency_kl_ref(zi, zt, zi, zt, 4.0).item() == pytest.approx(0.0, abs=1e-12)
    # d KL_row / d logits = p - p0 (per row, then averaged over rows)
    zi0 = _emb(6, 5, 9)
    logits = (4.0 * zi @ zt.T).requires_grad_()
    logits0 = 4.0 * zi0 @ zt.T
    kl = (torch.softmax(logits0, 1) * (torch.log_softmax(logits0, 1) - torch.log_softmax(logits, 1))).sum(1).mean()
    kl.backward()
    expected = (torch.softmax(logits, 1) - torch.softmax(logits0, 1)) / 6
    torch.testing.assert_close(logits.grad, expected.detach())


def test_cliperase_loss_ref_is_the_two_references():
    zi, zt, zi0, zt0 = (_emb(9, 7, k) for k in range(10, 14))
    infonce, kl = cliperase_loss_ref(zi, zt, zi0, zt0, 3.0)
    assert infonce.item() == pytest.approx(clip_infonce_ref(zi, zt, 3.0).item())
    assert kl.item() == pytest.approx(consistency_kl_ref(zi, zt, zi0, zt0, 3.0).item())


def test_forget_similarity_modes():
    img = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    txt = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    assert forget_similarity(img, txt).item() == pytest.approx((1.0 + 0.0) / 2)
    assert forget_similarity(img, txt, mode="dot").item() == pytest.approx((25.0 + 0.0) / 2)
    assert forget_similarity(img, txt, mode="hinge", margin=0.5).item() == pytest.approx((0.5 + 0.0) / 2)
    with pytest.raises(ValueError, match="mode"):
        forget_similarity(img, txt, mode="sine")


@pytest.mark.parametrize("bad, match", [
    (dict(zt=torch.zeros(3, 5)), "zt: expected shape"),
    (dict(zt=torch.zeros(4, 4, dtype=torch.float16)), "zt: expected dtype"),
    (dict(zi=torch.zeros(4)), "zi: expected a 2-D"),
    (dict(logit_scale=torch.ones(2)), "logit_scale"),
    (dict(row_offset=2), "row_offset"),
    (dict(zi_all=torch.zeros(6, 3)), "zi_all: expected shape"),
])
def test_bad_inputs_name_the_argument(bad, match):
    args = dict(zi=torch.zeros(4, 4), zt=torch.zeros(4, 4), logit_scale=1.0)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        clip_infonce_ref(args.pop("zi"), args.pop("zt"), args.pop("logit_scale"), **args)


@pytest.mark.parametrize("impl", ["ref", "chunked"])
def test_teacher_scale_gets_no_gradient(impl):
    """Without teacher_logit_scale the teacher uses a frozen copy of s: d KL / d s is the
    student side's alone, as with an explicit constant s0."""
    from cliperase.kernels import consistency_kl

    zi, zt, zi0, zt0 = (_emb(7, 5, k, torch.float32) for k in range(20, 24))
    s = torch.tensor(4.0, requires_grad=True)
    consistency_kl(zi, zt, zi0, zt0, s, impl=impl).backward()
    implicit = s.grad.clone()
    s.grad = None
    consistency_kl(zi, zt, zi0, zt0, s, teacher_logit_scale=4.0, impl=impl).backward()
    assert implicit.item() == pytest.approx(s.grad.item(), rel=1e-5)
    assert implicit.abs().item() > 1e-4, "the student side must still train s"
