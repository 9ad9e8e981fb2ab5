"""Unlearning methods: each a small declaration of the data and teacher outputs it needs and a
function from embeddings to named losses. The trainer's loop is the same for all of them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cliperase.kernels import clip_infonce, cliperase_loss, consistency_kl, forget_similarity

from . import subgroup
from .config import UnlearnConfig

__all__ = ["Features", "RunContext", "Method", "METHODS", "get_method"]


@dataclass
class Features:
    """One step's embeddings. Raw features (unnormalised) of the student; the teacher's are
    normalised and carry no gradient. Absent parts are None."""

    forget_img: Optional[Tensor] = None  # (Bf, d)
    forget_txt: Optional[Tensor] = None
    retain_img: Optional[Tensor] = None  # (Br, d)
    retain_txt: Optional[Tensor] = None
    teacher_img: Optional[Tensor] = None  # (Br, d) teacher on the retain batch
    teacher_txt: Optional[Tensor] = None
    teacher_forget_img: Optional[Tensor] = None  # (Bf, d) teacher on the forget batch, when asked for
    teacher_forget_txt: Optional[Tensor] = None
    logit_scale: Tensor | float = 1.0  # the student's multiplier s (exponentiated)
    # Distributed: the global batch, every rank's rows in rank order (engine/distributed.py
    # gather_rows; the student's carry gradient), this rank's rows at row_offset of it. One
    # process: each *_all is the local tensor itself (or None) and row_offset is 0.
    forget_img_all: Optional[Tensor] = None  # (world * Bf, d)
    forget_txt_all: Optional[Tensor] = None
    retain_img_all: Optional[Tensor] = None  # (world * Br, d)
    retain_txt_all: Optional[Tensor] = None
    teacher_img_all: Optional[Tensor] = None  # (world * Br, d) normalised, no gradient
    teacher_txt_all: Optional[Tensor] = None
    row_offset: int = 0
    teacher_logit_scale: Tensor | float | None = None  # the original model's s, frozen
    step: int = 0  # the optimizer step being computed, 0-based (methods with stages switch on it)
    method_state: Dict[str, Any] = field(default_factory=dict)  # RunContext.state, read-only here


@dataclass
class RunContext:
    """What a method's hooks see of a run. Built by the engine (engine/api.py), one per rank.

    `state` is the method's own state (chosen layers, an EMA, prompt embeddings...): saved in
    every checkpoint and restored before `setup` runs again on resume, so a hook that finds its
    result in `state` need not recompute it. Tensors in it are saved as they are.
    """

    cfg: UnlearnConfig
    student: nn.Module  # the open_clip model being trained (plain module, full parameters)
    teacher: Optional[nn.Module]  # the frozen original, when the method uses one
    tokenizer: Callable
    device: torch.device
    # Fresh batch iterators of this rank's forget / retain data, separate from the training
    # streams (reading them does not move the training data position): `batches("forget")`.
    batches: Callable[[str], Iterator[Tuple[Tensor, Tensor]]]
    # Rank 0 only (None elsewhere): evaluate(model, eval_data) -> engine/evaluate.py's metrics dict.
    evaluate: Optional[Callable[..., dict]] = None
    state: Dict[str, Any] = field(default_factory=dict)
    report: Dict[str, Any] = field(default_factory=dict)  # entries for report.json, under "method_details"


@dataclass(frozen=True)
class Method:
    """An unlearning method: the data and teacher outputs it needs, its objective, and optional
    hooks around the engine's one training loop (none of them touch the loop itself).

    - `setup(ctx)`: every rank, before the optimizer is built (so it may freeze parameters with
      `requires_grad_(False)`; the optimizer then holds only the rest). Called again on resume.
    - `after_step(ctx, step)`: every rank, after each optimizer step (1-based), e.g. an EMA update.
    - `finish(ctx, model)`: rank 0, after training, on the consolidated fp32 model; may change
      its weights in place (a model soup) and record choices in `ctx.report`.
    `needs_full_params`: the hooks read whole parameters, so ZeRO-3 (which shards them) is refused.
    """

    name: str
    summary: str
    uses_forget: bool
    uses_retain: bool
    uses_teacher: bool  # the frozen original model's embeddings of the retain batch
    objective: Callable[[Features, UnlearnConfig], Dict[str, Tensor]]  # must return "loss"
    teacher_on_forget: bool = False  # the teacher's embeddings of the forget batch too
    setup: Optional[Callable[[RunContext], None]] = None
    after_step: Optional[Callable[[RunContext, int], None]] = None
    finish: Optional[Callable[[RunContext, nn.Module], None]] = None
    needs_full_params: bool = False


def _n(x: Tensor) -> Tensor:
    return F.normalize(x, dim=-1)


def _cols(f: Features, part: str, *, teacher: bool = False) -> dict:
    """Loss keyword arguments for local rows against the global batch's columns; {} on one
    process (then the losses take their symmetric single-batch path, unchanged)."""
    img, img_all = getattr(f, f"{part}_img"), getattr(f, f"{part}_img_all")
    if img_all is None or img_all is img:
        return {}
    kw = {"zi_all": _n(img_all), "zt_all": _n(getattr(f, f"{part}_txt_all")), "row_offset": f.row_offset}
    if teacher:
        kw.update(zi0_all=f.teacher_img_all, zt0_all=f.teacher_txt_all)
    return kw


def _cliperase(f: Features, cfg: UnlearnConfig) -> Dict[str, Tensor]:
    zi, zt = _n(f.retain_img), _n(f.retain_txt)
    infonce, kl = cliperase_loss(zi, zt, f.teacher_img, f.teacher_txt, f.logit_scale,
                                 teacher_logit_scale=f.teacher_logit_scale, impl=cfg.loss_impl,
                                 **_cols(f, "retain", teacher=True))
    # "dot" reads the raw features as given (one reading of the paper); the others normalise.
    forget = forget_similarity(f.forget_img, f.forget_txt, mode=cfg.forget_mode, margin=cfg.forget_margin)
    loss = cfg.lambda_r * infonce + cfg.lambda_f * forget + cfg.lambda_c * kl
    return {"loss": loss, "retain_infonce": infonce, "forget_sim": forget, "consistency_kl": kl}


def _retain_infonce(f: Features, cfg: UnlearnConfig) -> Tensor:
    return clip_infonce(_n(f.retain_img), _n(f.retain_txt), f.logit_scale, impl=cfg.loss_impl, **_cols(f, "retain"))


def _forget_infonce(f: Features, cfg: UnlearnConfig) -> Tensor:
    return clip_infonce(_n(f.forget_img), _n(f.forget_txt), f.logit_scale, impl=cfg.loss_impl, **_cols(f, "forget"))


def _ft(f: Features, cfg: UnlearnConfig) -> Dict[str, Tensor]:
    retain = _retain_infonce(f, cfg)
    return {"loss": retain, "retain_infonce": retain}


def _ga(f: Features, cfg: UnlearnConfig) -> Dict[str, Tensor]:
    forget = _forget_infonce(f, cfg)
    return {"loss": -forget, "forget_infonce": forget}


def _graddiff(f: Features, cfg: UnlearnConfig) -> Dict[str, Tensor]:
    retain, forget = _retain_infonce(f, cfg), _forget_infonce(f, cfg)
    return {"loss": retain - forget, "retain_infonce": retain, "forget_infonce": forget}


def _neggrad_plus(f: Features, cfg: UnlearnConfig) -> Dict[str, Tensor]:
    retain, forget = _retain_infonce(f, cfg), _forget_infonce(f, cfg)
    loss = cfg.beta * retain - (1 - cfg.beta) * forget
    return {"loss": loss, "retain_infonce": retain, "forget_infonce": forget}


def _kl(f: Features, cfg: UnlearnConfig) -> Dict[str, Tensor]:
    forget = _forget_infonce(f, cfg)
    kl = consistency_kl(_n(f.retain_img), _n(f.retain_txt), f.teacher_img, f.teacher_txt, f.logit_scale,
                        teacher_logit_scale=f.teacher_logit_scale, impl=cfg.loss_impl,
                        **_cols(f, "retain", teacher=True))
    return {"loss": -forget + kl, "forget_infonce": forget, "consistency_kl": kl}


def _multidelete(f: Features, cfg: UnlearnConfig) -> Dict[str, Tensor]:
    # Forget: each forget pair's similarity is pulled to what the original model gives that image
    # with another sample's caption (a roll is a derangement for batches of 2+): the pair is made
    # to look unmatched rather than driven to -1.
    cos = (_n(f.forget_img) * _n(f.forget_txt)).sum(dim=1)
    shuffled = (f.teacher_forget_img * f.teacher_forget_txt.roll(1, dims=0)).sum(dim=1)
    forget = ((cos - shuffled.detach()) ** 2).mean()
    # Retain: unimodal embeddings stay where the original model put them (squared distance).
    retain = ((_n(f.retain_img) - f.teacher_img) ** 2).sum(1).mean() + ((_n(f.retain_txt) - f.teacher_txt) ** 2).sum(1).mean()
    loss = cfg.lambda_f * forget + cfg.lambda_r * retain
    return {"loss": loss, "forget_match": forget, "retain_embedding_mse": retain}


def _subgroup(f: Features, cfg: UnlearnConfig) -> Dict[str, Tensor]:
    # Stage 1, forget (the first cfg.subgroup_plan() forget steps): each forget image's cosine to
    # its class prompt (the original's embedding of forget_classes x the eval templates, fixed in
    # method_state; several classes: the one the original's image embedding is nearest), shaped
    # by forget_mode/margin. Stage 2, remind: lambda_r * retain InfoNCE + lambda_c * KL to the
    # original + subgroup_guard * max(0, that cosine - forget_margin). Without the guard the remind
    # stage teaches the subgroup back from its siblings (blue circles remind the model what a red
    # circle is; benchmarks/results/compare-subgroup.md). Every term is logged every step; only
    # the stage's own carry gradient.
    _, forget_steps, remind_steps = cfg.subgroup_plan()
    stage = "forget" if f.step < forget_steps else "remind" if f.step < forget_steps + remind_steps else "none"
    prompts = f.method_state["prompts"]  # (C, d) normalised
    if len(prompts) == 1:
        target = prompts.expand(len(f.forget_img), -1)
    else:
        target = prompts[(f.teacher_forget_img @ prompts.T).argmax(dim=1)]
    grad = torch.is_grad_enabled()
    with torch.set_grad_enabled(stage == "forget" and grad):
        forget = forget_similarity(f.forget_img, target, mode=cfg.forget_mode, margin=cfg.forget_margin)
    with torch.set_grad_enabled(stage == "remind" and grad):
        infonce, kl = cliperase_loss(_n(f.retain_img), _n(f.retain_txt), f.teacher_img, f.teacher_txt, f.logit_scale,
                                     teacher_logit_scale=f.teacher_logit_scale, impl=cfg.loss_impl,
                                     **_cols(f, "retain", teacher=True))
    with torch.set_grad_enabled(stage == "remind" and grad and cfg.subgroup_guard > 0):
        guard = forget_similarity(f.forget_img, target, mode="hinge", margin=cfg.forget_margin)
    if stage == "forget":
        loss = forget
    elif stage == "remind":
        loss = cfg.lambda_r * infonce + cfg.lambda_c * kl
        if cfg.subgroup_guard > 0:
            loss = loss + cfg.subgroup_guard * guard
    else:  # restore only: no-op steps (zero gradients) so the engine's loop runs unchanged
        loss = 0.0 * (f.forget_img.sum() + f.retain_img.sum())
    return {"loss": loss, "forget_prompt_sim": forget.detach(), "retain_infonce": infonce.detach(),
            "consistency_kl": kl.detach(), "forget_guard": guard.detach()}


METHODS: Dict[str, Method] = {m.name: m for m in (
    Method("cliperase", "CLIPErase: forget-pair similarity + retain InfoNCE + KL to the original",
           uses_forget=True, uses_retain=True, uses_teacher=True, objective=_cliperase),
    Method("ft", "fine-tune on the retain set with the CLIP loss",
           uses_forget=False, uses_retain=True, uses_teacher=False, objective=_ft),
    Method("ga", "gradient ascent on the CLIP loss of the forget set",
           uses_forget=True, uses_retain=False, uses_teacher=False, objective=_ga),
    Method("graddiff", "retain CLIP loss minus forget CLIP loss",
           uses_forget=True, uses_retain=True, uses_teacher=False, objective=_graddiff),
    Method("neggrad+", "beta * retain CLIP loss - (1 - beta) * forget CLIP loss",
           uses_forget=True, uses_retain=True, uses_teacher=False, objective=_neggrad_plus),
    Method("kl", "gradient ascent on the forget CLIP loss + KL to the original on the retain set",
           uses_forget=True, uses_retain=True, uses_teacher=True, objective=_kl),
    Method("multidelete", "forget pairs matched to the original's shuffled-caption similarity + "
           "retain embeddings kept (MultiDelete-style)",
           uses_forget=True, uses_retain=True, uses_teacher=True, objective=_multidelete, teacher_on_forget=True),
    Method("subgroup", "subgroup forgetting (Zhang et al. 2025): top-k Fisher layers pushed off the class prompt, "
           "then retain InfoNCE + KL + a guard on the forgotten pairs with an EMA, then a soup with the original "
           "chosen on a calibration split",
           uses_forget=True, uses_retain=True, uses_teacher=True, objective=_subgroup, teacher_on_forget=True,
           setup=subgroup.setup, after_step=subgroup.after_step, finish=subgroup.finish, needs_full_params=True),
)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"method: unknown method {name!r}; available: {', '.join(METHODS)}")
    return METHODS[name]
