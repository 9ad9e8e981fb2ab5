"""CLIPErase's consistency module: KL(teacher || student) of the in-batch similarity softmax.

Both directions, each averaged over its (local) rows:

    KL(softmax(S0) || softmax(S)) + KL(softmax(S0.T) || softmax(S.T))

with `S = s * Zi @ Zt.T` (student) and `S0 = s0 * Zi0 @ Zt0.T` (the frozen original model on the
same batch). The gradient wrt the student logits is `p - p0`; the teacher gets none.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._common import as_scale, check_caption_ids, check_columns, check_pair, false_negatives, resolve_impl
from ._contrastive import contrastive_loss

__all__ = ["consistency_kl", "consistency_kl_ref"]


def _row_kl(student_logits: Tensor, teacher_logits: Tensor, masked: Optional[Tensor]) -> Tensor:
    """Per-row KL(softmax(teacher) || softmax(student)), both softmaxes over the unmasked pairs."""
    if masked is not None:
        student_logits = student_logits.masked_fill(masked, float("-inf"))
        teacher_logits = teacher_logits.masked_fill(masked, float("-inf"))
    logp = torch.log_softmax(student_logits, dim=1)
    logp0 = torch.log_softmax(teacher_logits, dim=1)
    diff = logp0 - logp
    if masked is not None:
        # A masked pair has p0 = 0 and contributes nothing; -inf - -inf would make it nan.
        diff = diff.masked_fill(masked, 0.0)
    return (logp0.exp() * diff).sum(dim=1)


def consistency_kl_ref(
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
) -> Tensor:
    """Materialised reference: the test oracle and the small-batch CPU path.

    Args:
        zi, zt: (n, d) normalised student embeddings of the local rows.
        zi0, zt0: (n, d) normalised teacher embeddings of the same samples (no gradient).
        logit_scale: student multiplier `s` (already exponentiated).
        zi_all, zt_all, zi0_all, zt0_all: (N, d) global columns; default the local rows.
        row_offset: index of the first local row in the global batch.
        teacher_logit_scale: `s0`; default a detached copy of `logit_scale` (the teacher is frozen).
        caption_ids: optional (N,) integer caption identities over the global batch; a pair
            (i, j) with equal ids that is not i's positive is left out of both softmaxes, the
            student's and the teacher's, in both directions.
        upcast: compute in fp32 (True) or in the input dtype.
    Returns:
        0-dim fp32 tensor: row-mean KL of image->text plus row-mean KL of text->image.
    """
    zi_all, zt_all, zi0_all, zt0_all, caption_ids = _check(
        zi, zt, zi0, zt0, zi_all, zt_all, zi0_all, zt0_all, row_offset, caption_ids
    )
    s = as_scale(logit_scale, zi)
    s0 = s.detach() if teacher_logit_scale is None else as_scale(teacher_logit_scale, zi)
    tensors = (zi, zt, zi_all, zt_all, zi0, zt0, zi0_all, zt0_all)
    if upcast:
        tensors = tuple(t.float() for t in tensors)
    zi, zt, zi_all, zt_all, zi0, zt0, zi0_all, zt0_all = tensors
    zi0, zt0, zi0_all, zt0_all = (t.detach() for t in (zi0, zt0, zi0_all, zt0_all))
    dt = zi.dtype
    masked = false_negatives(caption_ids, row_offset, zi.shape[0])
    kl_i2t = _row_kl((s.to(dt) * zi) @ zt_all.T, (s0.to(dt) * zi0) @ zt0_all.T, masked)
    kl_t2i = _row_kl((s.to(dt) * zt) @ zi_all.T, (s0.to(dt) * zt0) @ zi0_all.T, masked)
    return kl_i2t.float().mean() + kl_t2i.float().mean()


def _check(zi, zt, zi0, zt0, zi_all, zt_all, zi0_all, zt0_all, row_offset, caption_ids):
    """Every backend's argument checks; returns the global columns (the local rows when None)
    and the caption ids as int64 (or None)."""
    check_pair("zi", zi, "zt", zt)
    check_pair("zi", zi, "zi0", zi0)
    check_pair("zi", zi, "zt0", zt0)
    g_i = check_columns(zi, "zi_all", zi_all, row_offset)
    g_t = check_columns(zt, "zt_all", zt_all, row_offset)
    g_i0 = check_columns(zi0, "zi0_all", zi0_all, row_offset)
    g_t0 = check_columns(zt0, "zt0_all", zt0_all, row_offset)
    if g_i0.shape != g_i.shape or g_t0.shape != g_t.shape:
        raise ValueError(
            f"zi0_all/zt0_all: expected the student's global shape {tuple(g_i.shape)}, "
            f"got {tuple(g_i0.shape)} and {tuple(g_t0.shape)}"
        )
    return g_i, g_t, g_i0, g_t0, check_caption_ids(caption_ids, (g_t, g_i))


def _fast(backend: str, with_infonce: bool):
    def run(zi, zt, zi0, zt0, logit_scale, *, zi_all=None, zt_all=None, zi0_all=None, zt0_all=None,
            row_offset=0, teacher_logit_scale=None, caption_ids=None):
        *_, ids = _check(zi, zt, zi0, zt0, zi_all, zt_all, zi0_all, zt0_all, row_offset, caption_ids)
        s = as_scale(logit_scale, zi)
        s0 = s.detach() if teacher_logit_scale is None else as_scale(teacher_logit_scale, zi)
        infonce, kl = contrastive_loss(
            zi, zt, s, s0, zi0=zi0, zt0=zt0, zi_all=zi_all, zt_all=zt_all, zi0_all=zi0_all,
            zt0_all=zt0_all, row_offset=row_offset, caption_ids=ids, with_infonce=with_infonce,
            with_kl=True, backend=backend,
        )
        return (infonce, kl) if with_infonce else kl

    return run


_IMPLS = {"ref": consistency_kl_ref, "chunked": _fast("chunked", False), "triton": _fast("triton", False)}


def consistency_kl(
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
) -> Tensor:
    """Consistency KL; arguments as `consistency_kl_ref`, `impl` as in `clip_infonce`.

    Returns a 0-dim fp32 tensor. Gradients reach the student tensors and `logit_scale`; the
    teacher embeddings get none; `s0` is a detached copy of `s` when not given, and a given
    `teacher_logit_scale` that requires grad gets the teacher logits' gradient.
    Raises ValueError for malformed shapes, dtypes, devices, row offsets or `caption_ids`.
    """
    choice = resolve_impl(impl, (zi, zt), tuple(_IMPLS))
    return _IMPLS[choice](
        zi, zt, zi0, zt0, logit_scale,
        zi_all=zi_all, zt_all=zt_all, zi0_all=zi0_all, zt0_all=zt0_all,
        row_offset=row_offset, teacher_logit_scale=teacher_logit_scale, caption_ids=caption_ids,
    )
