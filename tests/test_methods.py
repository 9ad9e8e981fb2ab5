"""Each method's objective against values computed by hand from tiny embeddings."""
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from cliperase.engine import preflight
from cliperase.engine.config import UnlearnConfig, method_names
from cliperase.engine.methods import METHODS, Features, Side, get_method
from cliperase.engine.methods.subgroup import SubgroupOptions


def test_the_methods_forget_modes_are_the_kernels():
    from cliperase.engine.methods.cliperase import FORGET_MODES
    from cliperase.kernels import FORGET_MODES as KERNEL_MODES

    assert FORGET_MODES == KERNEL_MODES


def test_config_names_the_registered_methods_in_order():
    assert method_names() == ("cliperase", "ft", "ga", "graddiff", "neggrad+", "kl", "multidelete", "subgroup")


def _cfg(method: str, **keys) -> UnlearnConfig:
    return UnlearnConfig.from_dict({"method": method, **keys})


def _objective(method: str, f: Features, **keys) -> dict:
    return get_method(_cfg(method, **keys)).objective(f)


def _side(img, txt, teacher_img=None, teacher_txt=None) -> Side:
    """One process: the global columns are the local rows themselves."""
    return Side(img, txt, img, txt, 0, teacher_img, teacher_txt, teacher_img, teacher_txt)


def _with_grad(f: Features) -> Features:
    """A copy whose student rows are fresh leaves that require grad."""
    sides = {}
    for name in ("forget", "retain"):
        s = getattr(f, name)
        sides[name] = _side(s.img.clone().requires_grad_(), s.txt.clone().requires_grad_(), s.teacher_img, s.teacher_txt)
    return replace(f, **sides)


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
    return Features(forget=_side(fi, ft, F.normalize(fi, dim=1), F.normalize(ft, dim=1)), retain=_side(ri, rt, ti, tt),
                    logit_scale=2.0, teacher_logit_scale=2.0,
                    state={"prompts": torch.tensor([[1.0, 0.0]])})  # subgroup: one class prompt


def test_ft_ga_graddiff_neggrad(feats):
    lr = _infonce_by_hand(feats.retain.img, feats.retain.txt, 2.0)
    lf = _infonce_by_hand(feats.forget.img, feats.forget.txt, 2.0)
    assert _objective("ft", feats)["loss"].item() == pytest.approx(lr, rel=1e-5)
    assert _objective("ga", feats)["loss"].item() == pytest.approx(-lf, rel=1e-5)
    assert _objective("graddiff", feats)["loss"].item() == pytest.approx(lr - lf, rel=1e-5)
    assert _objective("neggrad+", feats, beta=0.75)["loss"].item() == pytest.approx(0.75 * lr - 0.25 * lf, rel=1e-5)


def test_cliperase_weights_its_three_modules(feats):
    out = _objective("cliperase", feats, lambda_r=1.0, lambda_f=3.0, lambda_c=2.0)
    # forget module: mean cosine of the matched forget pairs, (0.8 + 0.8) / 2.
    assert out["forget_sim"].item() == pytest.approx(0.8, rel=1e-6)
    assert out["retain_infonce"].item() == pytest.approx(_infonce_by_hand(feats.retain.img, feats.retain.txt, 2.0), rel=1e-5)
    assert out["loss"].item() == pytest.approx(out["retain_infonce"].item() + 3 * 0.8 + 2 * out["consistency_kl"].item(), rel=1e-5)
    assert out["consistency_kl"].item() > 0


def test_kl_method_is_ascent_plus_consistency(feats):
    out = _objective("kl", feats)
    lf = _infonce_by_hand(feats.forget.img, feats.forget.txt, 2.0)
    assert out["loss"].item() == pytest.approx(-lf + out["consistency_kl"].item(), rel=1e-5)


def test_multidelete_by_hand(feats):
    out = _objective("multidelete", feats, lambda_f=1.0, lambda_r=1.0)
    # Student cosines of the forget pairs: 0.8, 0.8. Teacher (same here) with the captions rolled
    # by one: image0 x caption1 = 0.0, image1 x caption0 = 0.6*0.8 + 0.8*0.6 = 0.96.
    assert out["forget_match"].item() == pytest.approx(((0.8 - 0.0) ** 2 + (0.8 - 0.96) ** 2) / 2, rel=1e-5)
    ri, rt = F.normalize(feats.retain.img, dim=1), F.normalize(feats.retain.txt, dim=1)
    mse = ((ri - feats.retain.teacher_img) ** 2).sum(1).mean() + ((rt - feats.retain.teacher_txt) ** 2).sum(1).mean()
    assert out["retain_embedding_mse"].item() == pytest.approx(mse.item(), rel=1e-5)
    assert "forget" in METHODS["multidelete"].teacher_streams


def test_every_method_gives_gradients_to_the_student(feats):
    for name in METHODS:
        f = _with_grad(feats)
        _objective(name, f)["loss"].backward()
        used = [t for t in (f.forget.img, f.retain.img) if t.grad is not None]
        assert used and all(torch.isfinite(t.grad).all() for t in used), name


def _kl_by_hand(img, txt, img0, txt0, s):
    """Row-mean KL(softmax(S0) || softmax(S)) over image rows plus the same over text rows, 2 x 2."""
    a, b = F.normalize(img, dim=1), F.normalize(txt, dim=1)
    total = 0.0
    for x, y, x0, y0 in ((a, b, img0, txt0), (b, a, txt0, img0)):
        for i in range(2):
            logits = [s * float(x[i] @ y[j]) for j in range(2)]
            logits0 = [s * float(x0[i] @ y0[j]) for j in range(2)]
            p = [math.exp(v) / sum(math.exp(w) for w in logits) for v in logits]
            p0 = [math.exp(v) / sum(math.exp(w) for w in logits0) for v in logits0]
            total += sum(p0[j] * math.log(p0[j] / p[j]) for j in range(2))
    return total / 2


def _at(feats, step, **state):
    return replace(feats, step=step, state={**feats.state, **state})


def test_subgroup_forget_stage_is_the_cosine_to_the_class_prompt(feats):
    cfg = _cfg("subgroup", steps=4, lambda_r=1.0, lambda_c=2.0, subgroup_forget_steps=2)  # forget: steps 0-1, remind: 2-3
    out = get_method(cfg).objective(_at(feats, 0))
    # Forget images (1, 0) and (0.6, 0.8) against the prompt (1, 0): cosines 1.0 and 0.6.
    assert out["loss"].item() == pytest.approx(0.8, rel=1e-6)
    assert out["forget_prompt_sim"].item() == pytest.approx(0.8, rel=1e-6)
    # Two classes: each image takes the prompt its original-model embedding is nearest to, here
    # (1, 0) for the first image and (0, 1) for the second (0.8 > 0.6): cosines 1.0 and 0.8.
    two = _at(feats, 1, prompts=torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert get_method(cfg).objective(two)["loss"].item() == pytest.approx(0.9, rel=1e-6)
    hinge = _objective("subgroup", _at(feats, 0), steps=4, forget_mode="hinge", forget_margin=0.7)
    assert hinge["loss"].item() == pytest.approx((0.3 + 0.0) / 2, rel=1e-6)


def test_subgroup_remind_stage_is_retain_infonce_plus_kl_plus_the_guard(feats):
    cfg = _cfg("subgroup", steps=4, lambda_r=0.5, lambda_c=2.0, subgroup_forget_steps=2, subgroup_guard=0.0)
    out = get_method(cfg).objective(_at(feats, 2))
    infonce = _infonce_by_hand(feats.retain.img, feats.retain.txt, 2.0)
    kl = _kl_by_hand(feats.retain.img, feats.retain.txt, feats.retain.teacher_img, feats.retain.teacher_txt, 2.0)
    assert out["retain_infonce"].item() == pytest.approx(infonce, rel=1e-5)
    assert out["consistency_kl"].item() == pytest.approx(kl, rel=1e-4)
    assert out["loss"].item() == pytest.approx(0.5 * infonce + 2.0 * kl, rel=1e-5), "guard 0: METHOD.md's remind"
    assert out["forget_prompt_sim"].item() == pytest.approx(0.8, rel=1e-6), "logged in both stages"
    # The guard: max(0, cos - forget_margin) of the forget images (cosines 1.0 and 0.6 to the prompt).
    guarded = get_method(cfg.replace(subgroup_guard=4.0, forget_margin=0.7)).objective(_at(feats, 2))
    assert guarded["forget_guard"].item() == pytest.approx((0.3 + 0.0) / 2, rel=1e-6)
    assert guarded["loss"].item() == pytest.approx(0.5 * infonce + 2.0 * kl + 4.0 * 0.15, rel=1e-5)
    # subgroup_forget_steps moves the switch (defaults: lambda_r 1, lambda_c 3, guard 3 at margin 0).
    early = _objective("subgroup", _at(feats, 1), steps=4, subgroup_forget_steps=1)
    assert early["loss"].item() == pytest.approx(infonce + 3.0 * kl + 3.0 * 0.8, rel=1e-5)


def _grads(feats, step, cfg):
    f = _with_grad(_at(feats, step))
    get_method(cfg).objective(f)["loss"].backward()
    return f.forget.img.grad, f.retain.img.grad


def test_subgroup_only_the_active_stage_carries_gradient(feats):
    cfg = _cfg("subgroup", steps=4, subgroup_forget_steps=2, subgroup_guard=0.0)
    fg, rg = _grads(feats, 0, cfg)
    assert fg.abs().sum() > 0 and rg is None
    fg, rg = _grads(feats, 3, cfg)
    assert fg is None and rg.abs().sum() > 0
    # The remind stage's guard reaches a forget image only above the margin: (0.6, 0.8), at cosine
    # 0.6 to the prompt, is pushed with margin 0.5 and left alone with 0.7.
    fg, rg = _grads(feats, 3, cfg.replace(subgroup_guard=1.0, forget_margin=0.5))
    assert fg[1].abs().sum() > 0 and rg.abs().sum() > 0
    fg, rg = _grads(feats, 3, cfg.replace(subgroup_guard=1.0, forget_margin=0.7))
    assert fg[1].abs().sum() == 0 and rg.abs().sum() > 0
    # One training stage takes every step; with none (restore only) the steps are no-ops.
    assert _grads(feats, 3, _cfg("subgroup", steps=4, subgroup_stages="forget,restore"))[1] is None
    assert _grads(feats, 0, _cfg("subgroup", steps=4, subgroup_stages="remind", subgroup_guard=0.0))[0] is None
    fg, rg = _grads(feats, 0, _cfg("subgroup", steps=4, subgroup_stages="restore"))
    assert fg.abs().sum() == 0 and rg.abs().sum() == 0


def test_config_refuses_zero3_for_full_parameter_methods():
    assert [n for n, m in METHODS.items() if m.needs_full_params] == ["subgroup"]
    problems = preflight.problems(UnlearnConfig(method="subgroup", zero_stage=3))
    assert any(p.startswith("zero_stage: method 'subgroup' reads whole parameters") for p in problems)
    assert not any(p.startswith("zero_stage") for p in preflight.problems(UnlearnConfig(method="subgroup", zero_stage=2)))
    assert not any(p.startswith("zero_stage") for p in preflight.problems(UnlearnConfig(method="cliperase", zero_stage=3)))


@pytest.mark.parametrize("fields, message", [
    ({"subgroup_stages": "forget,bogus"}, "subgroup_stages: expected"),
    ({"subgroup_stages": ""}, "subgroup_stages: expected"),
    ({"subgroup_stages": "forget,forget"}, "subgroup_stages: expected"),
    ({"subgroup_forget_steps": 100}, "subgroup_forget_steps: 100 leaves no remind steps"),
    ({"subgroup_forget_steps": 5, "subgroup_stages": "forget,restore"}, "subgroup_forget_steps: splits steps"),
    ({"subgroup_layers": 0}, "subgroup_layers: expected a positive integer"),
    ({"subgroup_tower": "text"}, "subgroup_tower: expected"),
    ({"subgroup_ema_decay": 1.0}, "subgroup_ema_decay: expected"),
    ({"subgroup_guard": -1.0}, "subgroup_guard: expected a non-negative number"),
    ({"subgroup_guard": float("nan")}, "subgroup_guard: expected a non-negative number"),
    ({"soup_tolerance": -0.1}, "soup_tolerance: expected"),
    ({"calibration_data": "/nonexistent/cal"}, "calibration_data: '/nonexistent/cal' is not a directory"),
    ({"forget_attributes": "colour"}, "forget_attributes: expected KEY=VALUE"),
    ({"method": "subgroup", "subgroup_stages": "restore", "weight_decay": 0.1}, "weight_decay: with subgroup_stages"),
    ({"method": "subgroup", "steps": 1}, "steps: the forget and remind stages need at least 2 steps"),
])
def test_subgroup_config_problems(fields, message):
    problems = preflight.problems(_cfg(**{"method": "subgroup", **fields}))
    assert any(p.startswith(message) for p in problems), problems


def test_subgroup_plan():
    assert SubgroupOptions().plan(60) == (("forget", "remind", "restore"), 10, 50)
    assert SubgroupOptions().plan(2)[1:] == (1, 1)
    assert SubgroupOptions(subgroup_forget_steps=2).plan(9)[1:] == (2, 7)
    assert SubgroupOptions(subgroup_stages="restore,forget").plan(9) == (("forget", "restore"), 9, 0)
    assert SubgroupOptions(subgroup_stages="remind").plan(9) == (("remind",), 0, 9)
    assert SubgroupOptions(subgroup_stages="restore").plan(9) == (("restore",), 0, 0)


def test_build_features_numbers_identical_captions_alike_within_each_stream():
    from cliperase.engine.methods import build_features

    tokens = torch.tensor([[5, 1], [6, 2], [5, 1], [7, 3], [6, 2], [7, 3], [8, 0]])  # forget rows 0-2, retain 3-6
    img, txt = torch.randn(7, 4), torch.randn(7, 4)
    kw = dict(tokens=tokens, teacher={}, logit_scale=1.0, teacher_logit_scale=1.0, step=0, state={})
    f = build_features({"forget": 3, "retain": 4}, img, txt, mask_captions=True, **kw)
    fo, re = f.forget.caption_ids.tolist(), f.retain.caption_ids.tolist()
    assert fo[0] == fo[2] and len({fo[0], fo[1]}) == 2
    assert re[0] == re[2] and len({re[0], re[1], re[3]}) == 3
    assert torch.equal(f.forget.img, img[:3]) and torch.equal(f.retain.txt, txt[3:])
    assert f.forget.img_all is f.forget.img, "one process: the columns are the rows (the symmetric loss path)"
    plain = build_features({"forget": 3, "retain": 4}, img, txt, mask_captions=False, **kw)
    assert plain.forget.caption_ids is None and plain.retain.caption_ids is None


def test_masking_duplicate_captions_reaches_every_contrastive_loss(feats):
    """With caption ids each method's InfoNCE and KL are the references' masked ones, and with
    duplicates they differ from the unmasked losses."""
    from cliperase.kernels import clip_infonce_ref, cliperase_loss_ref

    ids = torch.tensor([0, 0])  # both captions identical: the off-diagonal pair is no negative
    masked = replace(feats, forget=replace(feats.forget, caption_ids=ids), retain=replace(feats.retain, caption_ids=ids))
    r, fg = masked.retain, masked.forget
    infonce, kl = cliperase_loss_ref(*r.pairs(), r.teacher_img, r.teacher_txt, 2.0, teacher_logit_scale=2.0, caption_ids=ids)
    out = _objective("cliperase", masked, mask_duplicate_captions=True)
    assert out["retain_infonce"].item() == pytest.approx(infonce.item(), rel=1e-5)
    assert out["consistency_kl"].item() == pytest.approx(kl.item(), abs=1e-6)
    ga = _objective("ga", masked, mask_duplicate_captions=True)
    assert ga["forget_infonce"].item() == pytest.approx(clip_infonce_ref(*fg.pairs(), 2.0, caption_ids=ids).item(), rel=1e-5)
    assert out["retain_infonce"].item() != pytest.approx(_objective("cliperase", feats)["retain_infonce"].item(), rel=1e-3)
