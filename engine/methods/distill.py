"""Baselines that compare with the original model: KL (gradient ascent + consistency) and
MultiDelete-style embedding matching (METHOD.md, Baselines)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List


from ..lazy import lazy_import
from .base import Method, MethodOptions, register
from .cliperase import weight_problems
from .contrastive import infonce

if TYPE_CHECKING:
    from torch import Tensor

    from ..config import UnlearnConfig
    from .features import Features, Side

__all__ = ["KL", "MultiDelete"]

# The losses (and torch with them) load at the first step: registering the method and checking its
# options import neither.
kernels = lazy_import("cliperase.kernels")


@register
class KL(Method):
    name = "kl"
    summary = "gradient ascent on the forget CLIP loss + KL to the original on the retain set"
    teacher_streams = ("retain",)

    def objective(self, f: Features) -> Dict[str, Tensor]:
        forget = infonce(f.forget, f, self.cfg)
        r = f.retain
        kl = kernels.consistency_kl(*r.pairs(), r.teacher_img, r.teacher_txt, f.logit_scale,
                            teacher_logit_scale=f.teacher_logit_scale, impl=self.cfg.loss_impl,
                            **r.columns(teacher=True))
        return {"loss": -forget + kl, "forget_infonce": forget, "consistency_kl": kl}


@register
class MultiDelete(Method):
    name = "multidelete"
    summary = ("forget pairs matched to the original's shuffled-caption similarity + "
               "retain embeddings kept (MultiDelete-style)")
    teacher_streams = ("forget", "retain")

    @dataclass(frozen=True)
    class Options(MethodOptions):
        lambda_r: float = 1.0  # weight of the retain embeddings' distance to the original's
        lambda_f: float = 3.0  # weight of the forget pairs' match to the shuffled-caption similarity

        def problems(self, cfg: "UnlearnConfig") -> List[str]:
            return weight_problems(self)

    def objective(self, f: Features) -> Dict[str, Tensor]:
        # Forget: each forget pair's similarity is pulled to what the original model gives that image
        # with another sample's caption (a roll is a derangement for batches of 2+): the pair is made
        # to look unmatched rather than driven to -1.
        fi, ft = f.forget.pairs()
        cos = (fi * ft).sum(dim=1)
        shuffled = (f.forget.teacher_img * f.forget.teacher_txt.roll(1, dims=0)).sum(dim=1)
        forget = ((cos - shuffled.detach()) ** 2).mean()
        # Retain: unimodal embeddings stay where the original model put them (squared distance).
        ri, rt = f.retain.pairs()
        retain = ((ri - f.retain.teacher_img) ** 2).sum(1).mean() + ((rt - f.retain.teacher_txt) ** 2).sum(1).mean()
        o = self.options
        return {"loss": o.lambda_f * forget + o.lambda_r * retain, "forget_match": forget,
                "retain_embedding_mse": retain}
