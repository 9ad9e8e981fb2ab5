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

from ._common import as_scale, check_columns, check_pair, resolve_impl
from ._contrastive import contrastive_loss

__all__ = ["consistency_kl", "consistency_kl_ref"]


def _row_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    logp = torch.log_softmax(student_logits, dim=1)
    logp0 = torch.log_softmax(teacher_logits, dim=1)
    return (logp0.exp() * (logp0 - logp)).sum(dim=1)


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
        upcast: compute in fp32 (True) or in the input dtype.
    Returns:
        0-dim fp32 tensor: row-mean KL of image->text plus row-mean KL of text->image.
    """
    zi_all, zt_all, zi0_all, zt0_all = _check(zi, zt, zi0, zt0, zi_all, zt_all, zi0_all, zt0_all, row_offset)
    s = as_scale(logit_scale, zi)
    s0 = s.detach() if teacher_logit_scale is None else as_scale(teacher_logit_scale, zi)
    tensors = (zi, zt, zi_all, zt_all, zi0, zt0, zi0_all, zt0_all)
    if upcast:
        tensors = tuple(t.float() for t in tensors)
    zi, zt, zi_all, zt_all, zi0, zt0, zi0_all, zt0_all = tensors
    zi0, zt0, zi0_all, zt0_all = (t.detach() for t in (zi0, zt0, zi0_all, zt0_all))
    dt = zi.dtype
    kl_i2t = _row_kl((s.to(dt) * zi) @ zt_all.T, (s0.to(dt) * zi0) @ zt0_all.T)
    kl_t2i = _row_kl((s.to(dt) * zt) @ zi_all.T, (s0.to(dt) * zt0) @ zi0_all.T)
    return kl_i2t.float().mean() + kl_t2i.float().mean()


def _check(zi, zt, zi0, zt0, zi_all, zt_all, zi0_all, zt0_all, row_offset):
    """Every backend's argument checks; returns the global columns (the local rows when None)."""
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
    return g_i, g_t, g_i0, g_t0


def _fast(backend: str, with_infonce: bool):
    def run(zi, zt, zi0, zt0, logit_scale, *, zi_all=None, zt_all=None, zi0_all=None, zt0_all=None,
            row_offset=0, teacher_logit_scale=None):
        _check(zi, zt, zi0, zt0, zi_all, zt_all, zi0_all, zt0_all, row_offset)
        s = as_scale(logit_scale, zi)
        s0 = s.detach() if teacher_logit_scale is None else as_scale(teacher_logit_scale, zi)
        infonce, kl = contrastive_loss(
            zi, zt, s, s0, zi0=zi0, zt0=zt0, zi_all=zi_all, zt_all=zt_all, zi0_all=zi0_all,
            zt0_all=zt0_all, row_offset=row_offset, with_infonce=with_infonce, with_kl=True,
            backend=backend,
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
    impl: Optional[str] = None,
) -> Tensor:
    """Consistency KL; arguments as `consistency_kl_ref`, `impl` as in `clip_infonce`.

    Returns a 0-dim fp32 tensor. Gradients reach the student tensors and `logit_scale`; the
    teacher (embeddings and `s0`, a detached copy of `s` when not given) gets none.
    Raises ValueError for malformed shapes, dtypes, devices or row offsets.
    """
    choice = resolve_impl(impl, (zi, zt), tuple(_IMPLS))
    return _IMPLS[choice](
        zi, zt, zi0, zt0, logit_scale,
        zi_all=zi_all, zt_all=zt_all, zi0_all=zi0_all, zt0_all=zt0_all,
        row_offset=row_offset, teacher_logit_scale=teacher_logit_scale,
    )
