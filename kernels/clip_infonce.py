"""Symmetric CLIP InfoNCE (CLIPErase's retention module) over in-batch similarities.

`S = s * Zi @ Zt.T` for local rows against global columns, the distributed layout of open_clip's
`--local-loss --gather-with-grad`: rank r holds rows `row_offset .. row_offset + n` of the global
batch, and its positives sit at column `row_offset + i`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import as_scale, check_caption_ids, check_columns, check_pair, false_negatives, resolve_impl
from ._contrastive import contrastive_loss

__all__ = ["clip_infonce", "clip_infonce_ref"]


def clip_infonce_ref(
    zi: Tensor,
    zt: Tensor,
    logit_scale,
    *,
    zi_all: Optional[Tensor] = None,
    zt_all: Optional[Tensor] = None,
    row_offset: int = 0,
    caption_ids: Optional[Tensor] = None,
    upcast: bool = True,
) -> Tensor:
    """Materialised reference: the test oracle and the small-batch CPU path.

    Args:
        zi, zt: (n, d) normalised image / text embeddings of the local rows.
        logit_scale: the multiplier `s` (already exponentiated), float or scalar tensor.
        zi_all, zt_all: (N, d) global columns with `zi_all[row_offset:row_offset+n] == zi`;
            default: the local rows (single process).
        caption_ids: optional (N,) integer caption identities over the global batch; a pair
            (i, j) with equal ids that is not i's positive is masked out of the negatives of
            both directions.
        upcast: compute in fp32 (True) or in the input dtype.
    Returns:
        0-dim fp32 tensor: mean over local rows of `(CE(S, diag) + CE(S_t2i, diag)) / 2`.
    """
    check_pair("zi", zi, "zt", zt)
    zi_all = check_columns(zi, "zi_all", zi_all, row_offset)
    zt_all = check_columns(zt, "zt_all", zt_all, row_offset)
    caption_ids = check_caption_ids(caption_ids, (zt_all, zi_all))
    s = as_scale(logit_scale, zi)
    if upcast:
        zi, zt, zi_all, zt_all = (t.float() for t in (zi, zt, zi_all, zt_all))
    n = zi.shape[0]
    labels = torch.arange(n, device=zi.device) + row_offset
    logits_i2t = (s.to(zi.dtype) * zi) @ zt_all.T
    logits_t2i = (s.to(zt.dtype) * zt) @ zi_all.T
    masked = false_negatives(caption_ids, row_offset, n)
    if masked is not None:
        # Identical captions (class-name captions) are false negatives: drop them, keep the positive.
        logits_i2t = logits_i2t.masked_fill(masked, float("-inf"))
        logits_t2i = logits_t2i.masked_fill(masked, float("-inf"))
    loss = (F.cross_entropy(logits_i2t.float(), labels) + F.cross_entropy(logits_t2i.float(), labels)) / 2
    return loss


def _fast(backend: str):
    def run(zi, zt, logit_scale, *, zi_all=None, zt_all=None, row_offset=0, caption_ids=None):
        check_pair("zi", zi, "zt", zt)
        cols_i = check_columns(zi, "zi_all", zi_all, row_offset)
        cols_t = check_columns(zt, "zt_all", zt_all, row_offset)
        caption_ids = check_caption_ids(caption_ids, (cols_t, cols_i))
        s = as_scale(logit_scale, zi)
        infonce, _ = contrastive_loss(
            zi, zt, s, s, zi_all=zi_all, zt_all=zt_all, row_offset=row_offset,
            caption_ids=caption_ids, with_infonce=True, with_kl=False, backend=backend,
        )
        return infonce

    return run


_IMPLS = {"ref": clip_infonce_ref, "chunked": _fast("chunked"), "triton": _fast("triton")}


def clip_infonce(
    zi: Tensor,
    zt: Tensor,
    logit_scale,
    *,
    zi_all: Optional[Tensor] = None,
    zt_all: Optional[Tensor] = None,
    row_offset: int = 0,
    caption_ids: Optional[Tensor] = None,
    impl: Optional[str] = None,
) -> Tensor:
    """Symmetric CLIP InfoNCE; arguments as `clip_infonce_ref`.

    `impl`: "ref" (materialised), "chunked" (plain torch, never N x N), "triton" (fused GPU
    kernel; CUDA tensors, or CPU ones under TRITON_INTERPRET=1 for tests); default: see
    `_common.resolve_impl` (chunked on CPU; on CUDA Triton when `TRITON_DEFAULT_ON_CUDA` is set
    and Triton imports, else chunked). "chunked" and "triton" save only per-row (and
    per-column) log-sum-exps and recompute the logits in backward. Every backend takes
    `caption_ids`. Raises ValueError for malformed shapes, dtypes, devices, row offsets or `caption_ids`, or
    for impl="triton" on CPU tensors without the Triton interpreter.
    """
    choice = resolve_impl(impl, (zi, zt), tuple(_IMPLS))
    return _IMPLS[choice](
        zi, zt, logit_scale, zi_all=zi_all, zt_all=zt_all, row_offset=row_offset, caption_ids=caption_ids
    )
