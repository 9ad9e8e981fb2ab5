"""The CLIP-loss baselines: fine-tuning on the retain set, gradient ascent on the forget set, and
their differences (METHOD.md, Baselines)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List


from .. import checks
from ..lazy import lazy_import
from .base import Method, MethodOptions, register

if TYPE_CHECKING:
    from torch import Tensor

    from ..config import UnlearnConfig
    from .features import Features, Side

__all__ = ["FineTune", "GradientAscent", "GradDiff", "NegGradPlus", "infonce"]

# The losses (and torch with them) load at the first step: registering the method and checking its
# options import neither.
kernels = lazy_import("cliperase.kernels")


def infonce(side: Side, f: Features, cfg: "UnlearnConfig") -> Tensor:
    """The symmetric CLIP loss of one stream's batch (local rows against the global columns)."""
    return kernels.clip_infonce(*side.pairs(), f.logit_scale, impl=cfg.loss_impl, **side.columns())


@register
class FineTune(Method):
    name = "ft"
    summary = "fine-tune on the retain set with the CLIP loss"
    streams = ("retain",)

    def objective(self, f: Features) -> Dict[str, Tensor]:
        retain = infonce(f.retain, f, self.cfg)
        return {"loss": retain, "retain_infonce": retain}


@register
class GradientAscent(Method):
    name = "ga"
    summary = "gradient ascent on the CLIP loss of the forget set"
    streams = ("forget",)

    def objective(self, f: Features) -> Dict[str, Tensor]:
        forget = infonce(f.forget, f, self.cfg)
        return {"loss": -forget, "forget_infonce": forget}


@register
class GradDiff(Method):
    name = "graddiff"
    summary = "retain CLIP loss minus forget CLIP loss"

    def objective(self, f: Features) -> Dict[str, Tensor]:
        retain, forget = infonce(f.retain, f, self.cfg), infonce(f.forget, f, self.cfg)
        return {"loss": retain - forget, "retain_infonce": retain, "forget_infonce": forget}


@register
class NegGradPlus(Method):
    name = "neggrad+"
    summary = "beta * retain CLIP loss - (1 - beta) * forget CLIP loss"

    @dataclass(frozen=True)
    class Options(MethodOptions):
        beta: float = 0.9  # beta * retain loss - (1 - beta) * forget loss

        def problems(self, cfg: "UnlearnConfig") -> List[str]:
            return checks.collect(checks.in_range("beta", self.beta, 0, 1))

    def objective(self, f: Features) -> Dict[str, Tensor]:
        retain, forget = infonce(f.retain, f, self.cfg), infonce(f.forget, f, self.cfg)
        beta = self.options.beta
        return {"loss": beta * retain - (1 - beta) * forget, "retain_infonce": retain, "forget_infonce": forget}
