"""Unlearning methods: each a small declaration of the data and teacher outputs it needs and a
function from embeddings to named losses. The trainer's loop is the same for all of them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from cliperase.kernels import clip_infonce, cliperase_loss, consistency_kl, forget_similarity

from .config import UnlearnConfig

__all__ = ["Features", "Method", "METHODS", "get_method"]


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


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    uses_forget: bool
    uses_retain: bool
    uses_teacher: bool  # the frozen original model's embeddings of the retain batch
    objective: Callable[[Features, UnlearnConfig], Dict[str, Tensor]]  # must return "loss"
    teacher_on_forget: bool = False  # the teacher's embeddings of the forget batch too


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
)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"method: unknown method {name!r}; available: {', '.join(METHODS)}")
    return METHODS[name]
