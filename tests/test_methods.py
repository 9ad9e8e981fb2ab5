"""Each method's objective against values computed by hand from tiny embeddings."""
import math

import pytest
import torch
import torch.nn.functional as F

from cliperase.engine.config import METHOD_NAMES, UnlearnConfig
from cliperase.engine.methods import METHODS, Features


def test_config_names_every_method_and_only_those():
    assert tuple(METHODS) == METHOD_NAMES


def _infonce_by_hand(img, txt, s):
    """Symmetric CLIP loss with explicit sums over a 2 x 2 batch."""
    a, b = F.normalize(img, dim=1), F.normalize(txt, dim=1)
    total = 0.0
    for x, y in ((a, b), (b, a)):
        for i in range(2):
            logits = [s * float(x[i] @ y[j]) for j in range(2)]
            total += -(logits[i] - math.log(sum(math.exp(v) for v in logits)))
    return total / 4


@pytest.fixture
def feats():
    fi = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    ft = torch.tensor([[0.8, 0.6], [0.0, 1.0]])
    ri = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    rt = torch.tensor([[2.0, 1.0], [1.0, -2.0]])
    ti = F.normalize(torch.tensor([[1.0, 0.9], [1.0, -1.1]]), dim=1)
    tt = F.normalize(torch.tensor([[2.0, 1.1], [1.0, -1.9]]), dim=1)
    return Features(forget_img=fi, forget_txt=ft, retain_img=ri, retain_txt=rt, teacher_img=ti, teacher_txt=tt,
                    teacher_forget_img=F.normalize(fi, dim=1), teacher_forget_txt=F.normalize(ft, dim=1),
                    logit_scale=2.0, teacher_logit_scale=2.0)


def test_ft_ga_graddiff_neggrad(feats):
    cfg = UnlearnConfig(beta=0.75)
    lr = _infonce_by_hand(feats.retain_img, feats.retain_txt, 2.0)
    lf = _infonce_by_hand(feats.forget_img, feats.forget_txt, 2.0)
    assert METHODS["ft"].objective(feats, cfg)["loss"].item() == pytest.approx(lr, rel=1e-5)
    assert METHODS["ga"].objective(feats, cfg)["loss"].item() == pytest.approx(-lf, rel=1e-5)
    assert METHODS["graddiff"].objective(feats, cfg)["loss"].item() == pytest.approx(lr - lf, rel=1e-5)
    assert METHODS["neggrad+"].objective(feats, cfg)["loss"].item() == pytest.approx(0.75 * lr - 0.25 * lf, rel=1e-5)


def test_cliperase_weights_its_three_modules(feats):
    cfg = UnlearnConfig(lambda_r=1.0, lambda_f=3.0, lambda_c=2.0)
    out = METHODS["cliperase"].objective(feats, cfg)
    # forget module: mean cosine of the matched forget pairs, (0.8 + 0.8) / 2.
    assert out["forget_sim"].item() == pytest.approx(0.8, rel=1e-6)
    assert out["retain_infonce"].item() == pytest.approx(_infonce_by_hand(feats.retain_img, feats.retain_txt, 2.0), rel=1e-5)
    assert out["loss"].item() == pytest.approx(out["retain_infonce"].item() + 3 * 0.8 + 2 * out["consistency_kl"].item(), rel=1e-5)
    assert out["consistency_kl"].item() > 0


def test_kl_method_is_ascent_plus_consistency(feats):
    out = METHODS["kl"].objective(feats, UnlearnConfig())
    lf = _infonce_by_hand(feats.forget_img, feats.forget_txt, 2.0)
    assert out["loss"].item() == pytest.approx(-lf + out["consistency_kl"].item(), rel=1e-5)


def test_multidelete_by_hand(feats):
    out = METHODS["multidelete"].objective(feats, UnlearnConfig(lambda_f=1.0, lambda_r=1.0))
    # Student cosines of the forget pairs: 0.8, 0.8. Teacher (same here) with the captions rolled
    # by one: image0 x caption1 = 0.0, image1 x caption0 = 0.6*0.8 + 0.8*0.6 = 0.96.
    assert out["forget_match"].item() == pytest.approx(((0.8 - 0.0) ** 2 + (0.8 - 0.96) ** 2) / 2, rel=1e-5)
    ri, rt = F.normalize(feats.retain_img, dim=1), F.normalize(feats.retain_txt, dim=1)
    mse = ((ri - feats.teacher_img) ** 2).sum(1).mean() + ((rt - feats.teacher_txt) ** 2).sum(1).mean()
    assert out["retain_embedding_mse"].item() == pytest.approx(mse.item(), rel=1e-5)
    assert METHODS["multidelete"].teacher_on_forget


def test_every_method_gives_gradients_to_the_student(feats):
    for name, method in METHODS.items():
        f = Features(**{k: (v.clone().requires_grad_() if isinstance(v, torch.Tensor) and not k.startswith("teacher") else v)
                        for k, v in vars(feats).items()})
        method.objective(f, UnlearnConfig())["loss"].backward()
        used = [t for t in (f.forget_img, f.retain_img) if t.grad is not None]
        assert used and all(torch.isfinite(t.grad).all() for t in used), name
