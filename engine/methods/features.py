"""One step's embeddings as a method's objective reads them, built by one function."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import dist as D

__all__ = ["Side", "Features", "build_features"]


@dataclass
class Side:
    """One stream's embeddings in a step (forget or retain).

    Student features are raw (unnormalised, carrying gradient); the teacher's are normalised and
    carry none. Distributed, `*_all` is the global batch (every rank's rows in rank order,
    gathered with gradient) and this rank's rows sit at `Features.row_offset` of it; on one
    process `img_all is img` (and so on), which the losses read as their symmetric case.
    """

    img: Tensor  # (b, d) this rank's rows
    txt: Tensor  # (b, d)
    img_all: Tensor  # (world * b, d)
    txt_all: Tensor
    row_offset: int = 0
    teacher_img: Optional[Tensor] = None  # (b, d) normalised, when the method asks for this stream's teacher
    teacher_txt: Optional[Tensor] = None
    teacher_img_all: Optional[Tensor] = None  # (world * b, d)
    teacher_txt_all: Optional[Tensor] = None
    caption_ids: Optional[Tensor] = None  # (world * b,) int64, equal for identical captions (cfg.mask_duplicate_captions)

    def pairs(self) -> Tuple[Tensor, Tensor]:
        """The normalised local (image, text) rows."""
        return F.normalize(self.img, dim=-1), F.normalize(self.txt, dim=-1)

    def columns(self, *, teacher: bool = False) -> Dict[str, Any]:
        """Keyword arguments of the kernels' losses for these rows: the global columns (and, with
        `teacher`, the teacher's) and the row offset when distributed, the caption ids when masked."""
        kw: Dict[str, Any] = {} if self.caption_ids is None else {"caption_ids": self.caption_ids}
        if self.img_all is self.img:
            return kw
        kw.update(zi_all=F.normalize(self.img_all, dim=-1), zt_all=F.normalize(self.txt_all, dim=-1),
                  row_offset=self.row_offset)
        if teacher:
            kw.update(zi0_all=self.teacher_img_all, zt0_all=self.teacher_txt_all)
        return kw


@dataclass
class Features:
    """One step's embeddings, what a method's objective reads. A stream the method does not use
    is None."""

    forget: Optional[Side] = None
    retain: Optional[Side] = None
    logit_scale: Tensor | float = 1.0  # the student's multiplier s (exponentiated)
    teacher_logit_scale: Tensor | float | None = None  # the original model's s, frozen
    step: int = 0  # the optimizer step being computed, 0-based (methods with stages switch on it)
    state: Dict[str, Any] = field(default_factory=dict)  # the method's RunContext.state, read-only here


def _side(img: Tensor, txt: Tensor, teacher: Optional[Tuple[Tensor, Tensor]], tokens: Optional[Tensor]) -> Side:
    img, img_all, offset = D.gather_rows(img)
    txt, txt_all, _ = D.gather_rows(txt)
    side = Side(img, txt, img_all, txt_all, offset)
    if teacher is not None:
        side.teacher_img, side.teacher_txt = teacher
        side.teacher_img_all = D.gather_rows(teacher[0])[1]
        side.teacher_txt_all = D.gather_rows(teacher[1])[1]
    if tokens is not None:
        # Identical token rows are identical captions; numbered over the global batch so every
        # rank masks the same pairs.
        side.caption_ids = torch.unique(D.gather_rows(tokens)[1], dim=0, return_inverse=True)[1]
    return side


def build_features(rows: Mapping[str, int], img: Tensor, txt: Tensor, *, tokens: Tensor,
                   teacher: Mapping[str, Tuple[Tensor, Tensor]], logit_scale, teacher_logit_scale, step: int,
                   state: Dict[str, Any], mask_captions: bool) -> Features:
    """The step's Features from one forward over every stream's rows.

    `rows`: {stream: row count}, in the order the streams' rows were concatenated into `img` /
    `txt` (B, d) and `tokens` (B, context) int64 (read only when `mask_captions`);
    `teacher`: {stream: (img, txt)} normalised teacher rows of the streams the method asks for.
    Collective when distributed: every rank calls it with the same streams.
    """
    sides: Dict[str, Side] = {}
    start = 0
    for name, n in rows.items():
        sides[name] = _side(img[start:start + n], txt[start:start + n], teacher.get(name),
                            tokens[start:start + n] if mask_captions else None)
        start += n
    return Features(forget=sides.get("forget"), retain=sides.get("retain"), logit_scale=logit_scale,
                    teacher_logit_scale=teacher_logit_scale, step=step, state=state)


