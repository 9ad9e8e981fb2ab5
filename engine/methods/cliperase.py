"""CLIPErase (Yang et al., ACL 2025): a forgetting module, a retention module and a consistency
module (METHOD.md)."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Dict, List


from .. import checks
from ..lazy import lazy_import
from .base import Method, MethodOptions, register

if TYPE_CHECKING:
    from torch import Tensor

    from ..config import UnlearnConfig
    from .features import Features, Side

__all__ = ["CLIPErase", "ForgetModuleOptions", "FORGET_MODES", "retain_terms", "weight_problems"]

# The losses (and torch with them) load at the first step: registering the method and checking its
# options import neither.
kernels = lazy_import("cliperase.kernels")
# kernels.forget_similarity's modes, named here so that checking options loads no kernel (a test keeps
# the two equal).
FORGET_MODES = ("cosine", "dot", "hinge")


def weight_problems(options) -> List[str]:
    """Each `lambda_*` field of `options` must be a non-negative number."""
    return checks.collect(*(checks.nonneg_number(f.name, getattr(options, f.name))
                            for f in fields(options) if f.name.startswith("lambda_")))


@dataclass(frozen=True)
class ForgetModuleOptions(MethodOptions):
    """How forget pairs are pushed apart (CLIPErase's forgetting module, subgroup's forget stage)."""

    forget_mode: str = "cosine"  # "cosine", "dot" (raw features, one reading of the paper) or "hinge"
    forget_margin: float = 0.0  # hinge margin: pairs below it feel no push

    def problems(self, cfg: "UnlearnConfig") -> List[str]:
        return checks.collect(checks.one_of("forget_mode", self.forget_mode, FORGET_MODES),
                              checks.in_range("forget_margin", self.forget_margin, -1, 1), weight_problems(self))


def retain_terms(side: Side, f: Features, cfg: "UnlearnConfig"):
    """(retain InfoNCE, consistency KL) of the retain batch, from one pass over its similarities."""
    return kernels.cliperase_loss(*side.pairs(), side.teacher_img, side.teacher_txt, f.logit_scale,
                          teacher_logit_scale=f.teacher_logit_scale, impl=cfg.loss_impl, **side.columns(teacher=True))


@register
class CLIPErase(Method):
    name = "cliperase"
    summary = "CLIPErase: forget-pair similarity + retain InfoNCE + KL to the original"
    teacher_streams = ("retain",)

    @dataclass(frozen=True)
    class Options(ForgetModuleOptions):
        lambda_r: float = 1.0  # retention module weight (retain InfoNCE)
        lambda_f: float = 3.0  # forgetting module weight (forget-pair similarity)
        lambda_c: float = 3.0  # consistency module weight (KL to the original model)

    def objective(self, f: Features) -> Dict[str, Tensor]:
        o = self.options
        infonce, kl = retain_terms(f.retain, f, self.cfg)
        # "dot" reads the raw features as given; the other modes normalise.
        forget = kernels.forget_similarity(f.forget.img, f.forget.txt, mode=o.forget_mode, margin=o.forget_margin)
        loss = o.lambda_r * infonce + o.lambda_f * forget + o.lambda_c * kl
        return {"loss": loss, "retain_infonce": infonce, "forget_sim": forget, "consistency_kl": kl}
