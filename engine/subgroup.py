"""Targeted forgetting of image subgroups (Zhang et al. 2025, arXiv 2506.03117): the pieces of its
three stages, each usable alone.

1. Forget: `fisher_scores` ranks layers by relative Fisher information (squared gradients of the
   image-text similarity on the forget set over the same on the retain set); `trainable_only`
   freezes all but the top-k (`top_layers`).
2. Remind: retain-set training with distillation from the original, keeping an `Ema` of weights
   (engine/methods.py adds a guard that keeps the forgotten pairs forgotten meanwhile).
3. Restore: `soup` mixes `a * unlearned + (1 - a) * original`; `search_soup` picks the `a` with
   the strongest forgetting whose retain accuracy stays within a tolerance of the original's.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = ["layer_groups", "fisher_scores", "top_layers", "trainable_only", "Ema", "soup", "search_soup",
           "eligible_layers", "setup", "after_step", "finish"]

_INDEXED = re.compile(r"^(.*?\.\d+)(\.|$)")  # up to the first numbered child: resblocks.3, layer1.0


def layer_groups(model: nn.Module) -> "OrderedDict[str, List[str]]":
    """Parameter names grouped into layers: a numbered block (`visual.transformer.resblocks.3`,
    `visual.layer2.0`) is one layer; any other parameter is grouped by its owning module
    (`visual.conv1`, `token_embedding`, `text_projection`)."""
    groups: "OrderedDict[str, List[str]]" = OrderedDict()
    for name, _ in model.named_parameters():
        m = _INDEXED.match(name)
        key = m.group(1) if m else (name.rsplit(".", 1)[0] if "." in name else name)
        groups.setdefault(key, []).append(name)
    return groups


def _squared_grads(model: nn.Module, objective: Callable[[nn.Module, object], Tensor], batches: Iterable,
                   groups: Mapping[str, List[str]]) -> Dict[str, float]:
    params = dict(model.named_parameters())
    totals = {g: 0.0 for g in groups}
    for batch in batches:
        model.zero_grad(set_to_none=True)
        objective(model, batch).backward()
        for g, names in groups.items():
            totals[g] += sum(float(params[n].grad.pow(2).sum()) for n in names if params[n].grad is not None)
    model.zero_grad(set_to_none=True)
    return totals


def fisher_scores(model: nn.Module, objective: Callable[[nn.Module, object], Tensor], forget_batches: Iterable,
                  retain_batches: Iterable, *, groups: Optional[Mapping[str, List[str]]] = None,
                  eps: float = 1e-12, reduce: Optional[Callable[[Tensor], Tensor]] = None) -> Dict[str, float]:
    """Relative Fisher information per layer: `sum(grad^2 on forget) / sum(grad^2 on retain)`.

    `objective(model, batch)` returns the scalar whose gradients are measured, in the paper the
    mean image-text cosine similarity of the batch's pairs. A layer the forget set leans on and
    the retain set does not scores high. `eps` keeps layers unused by the retain set finite.
    `reduce` maps the (2, L) float64 tensor of forget / retain sums to the sums to use, e.g. an
    all-reduce over ranks so every rank scores (and chooses) alike. Parameters must require grad;
    the model's grads are left cleared.
    """
    groups = groups or layer_groups(model)
    f = _squared_grads(model, objective, forget_batches, groups)
    r = _squared_grads(model, objective, retain_batches, groups)
    if reduce is not None:
        sums = reduce(torch.tensor([[f[g] for g in groups], [r[g] for g in groups]], dtype=torch.float64))
        f, r = dict(zip(groups, sums[0].tolist())), dict(zip(groups, sums[1].tolist()))
    return {g: f[g] / (r[g] + eps) for g in groups}


def top_layers(scores: Mapping[str, float], k: int) -> List[str]:
    """The `k` highest-scoring layers, best first (ties: the earlier layer)."""
    if k <= 0:
        raise ValueError(f"k: expected a positive number of layers, got {k}")
    return sorted(scores, key=lambda name: -scores[name])[:k]  # stable sort: ties keep layer order


def trainable_only(model: nn.Module, layers: Sequence[str], groups: Optional[Mapping[str, List[str]]] = None) -> int:
    """Freeze every parameter outside `layers`; returns the number of trainable parameters."""
    groups = groups or layer_groups(model)
    unknown = [l for l in layers if l not in groups]
    if unknown:
        raise ValueError(f"layers: {unknown} are not layers of the model; layers: {list(groups)}")
    keep = {n for l in layers for n in groups[l]}
    count = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)
        count += p.numel() if name in keep else 0
    return count


class Ema:
    """Exponential moving average of a model's floating-point state: `avg = d * avg + (1 - d) * w`,
    kept in fp32 whatever the model's dtype. `names` limits it to those state-dict entries (the
    trained ones); `Ema.from_state` resumes one from its `state` (e.g. a checkpoint's)."""

    def __init__(self, model: nn.Module, decay: float = 0.999, names: Optional[Iterable[str]] = None):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay: expected a value in [0, 1), got {decay}")
        self.decay = decay
        keep = None if names is None else set(names)
        self.state = {k: v.detach().float().clone() for k, v in model.state_dict().items()
                      if v.is_floating_point() and (keep is None or k in keep)}

    @classmethod
    def from_state(cls, state: Dict[str, Tensor], decay: float) -> "Ema":
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay: expected a value in [0, 1), got {decay}")
        ema = cls.__new__(cls)
        ema.decay, ema.state = decay, state
        return ema

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for k, v in model.state_dict().items():
            if k in self.state:
                self.state[k].mul_(self.decay).add_(v.detach().float(), alpha=1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        model.load_state_dict(self.state, strict=False)


def soup(original: Mapping[str, Tensor], unlearned: Mapping[str, Tensor], a: float) -> Dict[str, Tensor]:
    """`a * unlearned + (1 - a) * original` for floating tensors; others from `unlearned`.

    Computed as `torch.lerp`, exact at the ends and wherever the two agree: `a = 0` gives the
    original bit for bit, `a = 1` the unlearned model, and weights that training left alone
    (frozen layers) stay exactly as they were for every `a`."""
    if set(original) != set(unlearned):
        raise ValueError(f"state dicts differ in keys: {sorted(set(original) ^ set(unlearned))[:5]}")
    out = {}
    for k, u in unlearned.items():
        o = original[k]
        out[k] = torch.lerp(o.float(), u.float(), float(a)).to(u.dtype) if u.is_floating_point() else u.clone()
    return out


def search_soup(original: Mapping[str, Tensor], unlearned: Mapping[str, Tensor],
                evaluate: Callable[[Dict[str, Tensor]], Tuple[float, float]], *, tolerance: float,
                alphas: Sequence[float] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)) -> Tuple[float, dict]:
    """Choose the soup weight `a` on a calibration split.

    `evaluate(state_dict) -> (forget_acc, retain_acc)`. Among the `alphas` whose retain accuracy
    is at least the original's minus `tolerance`, the one with the lowest forget accuracy wins
    (ties: the larger `a`). When none qualifies the answer is `a = 0`, the original model.
    Returns `(a, {"original": (f, r), "tried": {a: (f, r)}})`.
    """
    if not tolerance >= 0:
        raise ValueError(f"tolerance: expected a non-negative number, got {tolerance}")
    base_forget, base_retain = evaluate(dict(original))
    tried = {}
    best: Optional[Tuple[float, float]] = None  # (forget_acc, -a)
    for a in alphas:
        if not 0.0 < a <= 1.0:
            raise ValueError(f"alphas: each must be in (0, 1], got {a}")
        f, r = evaluate(soup(original, unlearned, a))
        tried[a] = (f, r)
        if r >= base_retain - tolerance and (best is None or (f, -a) < best):
            best = (f, -a)
    chosen = 0.0 if best is None else -best[1]
    return chosen, {"original": (base_forget, base_retain), "tried": tried}


# ---------------------------------------------------------------------------------------------
# The method's hooks (engine/methods.py declares the method and its objective; the engine calls
# these around its one loop). What they decide lives in `ctx.state`, which checkpoints keep:
#   "prompts": (C, d) the original's class-prompt embeddings of cfg.forget_classes, fixed;
#   "layers": the trained layers, best first; "fisher": {layer: score} of the eligible layers;
#   "ema": the remind stage's average of the trained weights (fp32).

class _NoCalibration(Exception):
    pass


def _templates(eval_data: str) -> List[str]:
    path = Path(eval_data) / "zeroshot_classification_templates.txt"
    lines = [x.strip() for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
    return lines or ["a photo of a {c}."]  # load_eval_set's default


def _pair_cosine(device: torch.device) -> Callable[[nn.Module, Tuple[Tensor, Tensor]], Tensor]:
    """The Fisher objective: mean cosine of a batch's image-caption pairs."""
    def objective(model: nn.Module, batch: Tuple[Tensor, Tensor]) -> Tensor:
        images, texts = batch
        return torch.cosine_similarity(model.encode_image(images.to(device)), model.encode_text(texts.to(device))).mean()
    return objective


def _all_reduce_sum(device: torch.device) -> Callable[[Tensor], Tensor]:
    def reduce(t: Tensor) -> Tensor:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()
                and torch.distributed.get_world_size() > 1):
            return t
        t = t.to(device)
        torch.distributed.all_reduce(t)
        return t.cpu()
    return reduce


def eligible_layers(groups: Mapping[str, List[str]], model: nn.Module, tower: str) -> "OrderedDict[str, List[str]]":
    """The layers the Fisher selection may choose: those with a trainable parameter, of the image
    tower (`visual.*`) for tower "image", of both towers for "all"; never the temperature."""
    params = dict(model.named_parameters())
    return OrderedDict((g, names) for g, names in groups.items()
                       if g != "logit_scale" and (tower == "all" or g.startswith("visual."))
                       and any(params[n].requires_grad for n in names))


def setup(ctx) -> None:
    """Every rank, before the optimizer exists: load `subgroup_original` into the teacher when
    given, embed the class prompts with the original, score layers by relative Fisher information
    on `subgroup_fisher_batches` forget and retain batches and freeze all but the top
    `subgroup_layers` (reused from `ctx.state` on resume)."""
    cfg, st, student = ctx.cfg, ctx.state, ctx.student
    _, forget_steps, remind_steps = cfg.subgroup_plan()
    if cfg.subgroup_original:
        from .models import load_model

        ctx.teacher.load_state_dict(load_model(cfg.model, cfg.subgroup_original, device=ctx.device).model.state_dict())
    # A resumed state was loaded onto the CPU: its tensors go where the model is.
    if "prompts" in st:
        st["prompts"] = st["prompts"].to(ctx.device)
    if "ema" in st:
        st["ema"] = {k: v.to(ctx.device) for k, v in st["ema"].items()}
    if "prompts" not in st:
        from .evaluate import zeroshot_classifier

        st["prompts"] = zeroshot_classifier(ctx.teacher, ctx.tokenizer, list(cfg.forget_classes),
                                            _templates(cfg.eval_data)).to(ctx.device)
    if not (forget_steps or remind_steps):
        return  # restore only: nothing is trained
    groups = layer_groups(student)
    if "layers" not in st:
        from itertools import islice

        candidates = eligible_layers(groups, student, cfg.subgroup_tower)
        n = cfg.subgroup_fisher_batches
        scores = fisher_scores(student, _pair_cosine(ctx.device), islice(ctx.batches("forget"), n),
                               islice(ctx.batches("retain"), n), groups=candidates, reduce=_all_reduce_sum(ctx.device))
        st["fisher"] = scores
        st["layers"] = top_layers(scores, min(cfg.subgroup_layers, len(scores)))
    scale_trained = student.logit_scale.requires_grad  # the temperature follows train_logit_scale, not the selection
    st["trainable_params"] = trainable_only(student, st["layers"], groups)
    student.logit_scale.requires_grad_(scale_trained)
    if remind_steps and not forget_steps and "ema" not in st:
        st["ema"] = Ema(student, cfg.subgroup_ema_decay, names=_trained_names(student)).state


def _trained_names(model: nn.Module) -> List[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad and n != "logit_scale"]


def after_step(ctx, step: int) -> None:
    """After optimizer step `step` (1-based): the EMA starts from the forget stage's last weights
    and averages every remind step."""
    cfg = ctx.cfg
    _, forget_steps, remind_steps = cfg.subgroup_plan()
    if not remind_steps or step < forget_steps:
        return
    if step == forget_steps or "ema" not in ctx.state:
        ctx.state["ema"] = Ema(ctx.student, cfg.subgroup_ema_decay, names=_trained_names(ctx.student)).state
    else:
        Ema.from_state(ctx.state["ema"], cfg.subgroup_ema_decay).update(ctx.student)


def finish(ctx, model: nn.Module) -> None:
    """Rank 0, on the trained fp32 model: copy the remind stage's EMA in, then (restore stage)
    replace the weights by the soup `a * model + (1 - a) * original` with `a` searched on
    `calibration_data` (default eval_data) by `search_soup`; record the choices in ctx.report."""
    cfg, st, rep = ctx.cfg, ctx.state, ctx.report
    stages, forget_steps, remind_steps = cfg.subgroup_plan()
    rep.update(stages=list(stages), forget_steps=forget_steps, remind_steps=remind_steps)
    if remind_steps:
        rep.update(guard=cfg.subgroup_guard, guard_margin=cfg.forget_margin)
    if "layers" in st:
        ranked = sorted(st["fisher"].items(), key=lambda kv: -kv[1])
        rep.update(layers=list(st["layers"]), trainable_params=int(st.get("trainable_params", 0)),
                   fisher_top=[{"layer": name, "score": score} for name, score in ranked[:10]],
                   fisher_layers_scored=len(ranked))
    if remind_steps and "ema" in st:
        Ema.from_state(st["ema"], cfg.subgroup_ema_decay).copy_to(model)
        rep["ema_decay"] = cfg.subgroup_ema_decay
    if "restore" not in stages:
        return
    device = next(model.parameters()).device
    original = {k: v.detach().to(device) for k, v in ctx.teacher.state_dict().items()}
    unlearned = {k: v.detach().clone() for k, v in model.state_dict().items()}
    calibration = cfg.calibration_data or cfg.eval_data

    def score(state: Dict[str, Tensor]) -> Tuple[float, float]:
        model.load_state_dict(state)
        zs = ctx.evaluate(model, calibration)["zeroshot"]
        if zs["forget_acc"] != zs["forget_acc"] or zs["retain_acc"] != zs["retain_acc"]:  # NaN: an empty part
            raise _NoCalibration(f"{calibration} has no images of the forget or the retain part")
        return zs["forget_acc"], zs["retain_acc"]

    try:
        a, info = search_soup(original, unlearned, score, tolerance=cfg.soup_tolerance)
    except _NoCalibration as exc:  # training is done: keep its result (a = 1) and say why
        model.load_state_dict(unlearned)
        rep["soup"] = {"a": 1.0, "skipped": str(exc), "calibration_data": calibration}
        return
    model.load_state_dict(soup(original, unlearned, a))
    model.eval()
    rep["soup"] = {
        "a": a, "tolerance": cfg.soup_tolerance, "calibration_data": calibration,
        "calibration_is_eval_data": calibration == cfg.eval_data,
        "original": {"forget_acc": info["original"][0], "retain_acc": info["original"][1]},
        "tried": [{"a": x, "forget_acc": f, "retain_acc": r} for x, (f, r) in info["tried"].items()],
    }
