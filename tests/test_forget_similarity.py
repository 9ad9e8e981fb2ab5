"""forget_similarity: each mode against its formula, and argument checks."""
import pytest
import torch
import torch.nn.functional as F

from cliperase.kernels import FORGET_MODES, forget_similarity


def _pair(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(7, 13, generator=gen).to(dtype), torch.randn(7, 13, generator=gen).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_modes_match_formulas(dtype):
    img, txt = _pair(dtype)
    cos = F.cosine_similarity(img.float(), txt.float(), dim=1)
    assert forget_similarity(img, txt, mode="cosine").item() == pytest.approx(cos.mean().item(), abs=1e-6)
    assert forget_similarity(img, txt, mode="dot").item() == pytest.approx((img.float() * txt.float()).sum(1).mean().item(), abs=1e-5)
    hinge = forget_similarity(img, txt, mode="hinge", margin=0.1)
    assert hinge.item() == pytest.approx(torch.clamp(cos - 0.1, min=0).mean().item(), abs=1e-6)
    assert hinge.dtype == torch.float32 and hinge.dim() == 0


def test_gradient_pushes_pairs_apart():
    img, txt = (t.requires_grad_(True) for t in _pair())
    before = forget_similarity(img, txt)
    before.backward()
    with torch.no_grad():
        after = forget_similarity(img - 0.1 * img.grad, txt - 0.1 * txt.grad)
    assert after < before


def test_rejects_bad_arguments():
    img, txt = _pair()
    with pytest.raises(ValueError, match=str(list(FORGET_MODES)).replace("[", r"\[").replace("]", r"\]")):
        forget_similarity(img, txt, mode="l2")
    with pytest.raises(ValueError, match="margin"):
        forget_similarity(img, txt, mode="hinge", margin=2.0)
    with pytest.raises(ValueError, match="txt"):
        forget_similarity(img, txt[:, :5])
