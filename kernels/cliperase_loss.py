"""The two retain-batch terms of CLIPErase together: InfoNCE and consistency KL.

Both read the same student similarity matrix, so a fused backend computes them in one pass over
the student tiles; the reference simply calls the two references.
"""
from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor

from ._common import resolve_impl
from .clip_infonce import clip_infonce_ref
from .consistency_kl import _fast, consistency_kl_ref

__all__ = ["cliperase_loss", "cliperase_loss_ref"]


def cliperase_loss_ref(
    zi: Tensor,
    zt: Tensor,
    zi0: Tensor,
    zt0: Tensor,
    logit_scale,
    *,
    zi_all: Optional[Tensor] = None,
    zt_all: Optional[Tensor] = None,
    zi0_all: Optional[Tensor] = None,
    zt0_all: Optional[Tensor] = None,
    row_offset: int = 0,
    teacher_logit_scale=None,
    caption_ids: Optional[Tensor] = None,
    upcast: bool = True,
) -> Tuple[Tensor, Tensor]:
    """Returns `(infonce, kl)`, each exactly as `clip_infonce_ref` / `consistency_kl_ref`
    (the same `caption_ids` mask for both)."""
    infonce = clip_infonce_ref(
        zi, zt, logit_scale, zi_all=zi_all, zt_all=zt_all, row_offset=row_offset,
        caption_ids=caption_ids, upcast=upcast,
    )
    kl = consistency_kl_ref(
        zi, zt, zi0, zt0, logit_scale,
        zi_all=zi_all, zt_all=zt_all, zi0_all=zi0_all, zt0_all=zt0_all,
        row_offset=row_offset, teacher_logit_scale=teacher_logit_scale, caption_ids=caption_ids,
        upcast=upcast,
    )
    return infonce, kl


_IMPLS = {"ref": cliperase_loss_ref, "chunked": _fast("chunked", True), "triton": _fast("triton", True)}


def cliperase_loss(
    zi: Tensor,
    zt: Tensor,
    zi0: Tensor,
    zt0: Tensor,
    logit_scale,
    *,
    zi_all: Optional[Tensor] = None,
    zt_all: Optional[Tensor] = None,
    zi0_all: Optional[Tensor] = None,
    zt0_all: Optional[Tensor] = None,
    row_offset: int = 0,
    teacher_logit_scale=None,
    caption_ids: Optional[Tensor] = None,
    impl: Optional[str] = None,
) -> Tuple[Tensor, Tensor]:
    """Retain InfoNCE and consistency KL of one retain batch, `(infonce, kl)`.

    Arguments as `consistency_kl_ref`; `impl` as in `clip_infonce`. The fast backends compute
    both terms from one set of student tiles (6 GEMM passes in the symmetric case instead of
    4 + 6 for two separate calls). Returns two 0-dim fp32 tensors.
    Raises ValueError for malformed shapes, dtypes, devices, row offsets or `caption_ids`.
    """
    choice = resolve_impl(impl, (zi, zt), tuple(_IMPLS))
    return _IMPLS[choice](
        zi, zt, zi0, zt0, logit_scale,
        zi_all=zi_all, zt_all=zt_all, zi0_all=zi0_all, zt0_all=zt0_all,
        row_offset=row_offset, teacher_logit_scale=teacher_logit_scale, caption_ids=caption_ids,
    )
