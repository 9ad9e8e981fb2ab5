"""Memory-lean InfoNCE + consistency KL: the one autograd Function behind the fast backends.

`clip_infonce`, `consistency_kl` and `cliperase_loss` are the same computation with one or both
terms switched on (the fused loss is the superset), so the "chunked" (plain torch) and "triton"
backends share this Function instead of keeping three copies of the bookkeeping.

Layout. A *pass* is one rows-against-columns similarity block `S = s * A @ B.T` (n x N) with its
frozen teacher `S0 = s0 * A0 @ B0.T`; the positive of row i sits at column `row_offset + i`.
- Symmetric mode (no global columns given, `row_offset == 0`): one pass `A = zi, B = zt`; its
  row statistics give image->text and its column statistics give text->image, so S is computed
  once per step (4 GEMM passes for InfoNCE, 6 with the KL, as in /work/shared/LIMITS.md).
- Local-vs-global mode: two passes, `zi` against `zt_all` and `zt` against `zi_all`, exactly the
  two (n x N) blocks open_clip's `local_loss` builds; gradients reach both the local rows and
  the global columns, which is what the gather-with-grad caller needs.

Statistics saved for backward, per row (and per column in symmetric mode), all fp32 O(N):
`lse = logsumexp_j S_ij`, and with the KL `lse0 = logsumexp_j S0_ij` and
`kl = sum_j p0_ij (S0_ij - S_ij) - lse0 + lse`. Backward recomputes S (and S0) tile by tile and
forms the gradient wrt the logits, `c_inf (p - onehot) + c_kl (p - p0)`, never an N x N matrix.

A backend provides two primitives (see `_ChunkedBackend`; the Triton one lives in
`_triton_contrastive.py` and is imported only when asked for; both use the layout types of
`_layout.py`):
- `stats(pass, s, s0, with_kl, col_stats)` -> `Stats` for the rows (and columns);
- `grads(pass, s, s0, rows, cols, coef, want_ds, want_ds0)` -> (dA, dB, ds, ds0), with
  `coef = [c_inf_row, c_kl_row, c_inf_col, c_kl_col]` a 4-element fp32 tensor (no host sync).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ._common import mm_f32
from ._layout import Pass, Stats

__all__ = ["contrastive_loss", "ChunkedConfig", "DEFAULT_CHUNKED_CONFIG", "TILE_DTYPES", "tile_dtype"]


TILE_DTYPES = ("auto", "input", "fp32")


@dataclass(frozen=True)
class ChunkedConfig:
    block_m: int = 1024  # rows per tile; a tile holds a few (block_m x block_n) fp32 buffers
    block_n: int = 1024  # columns per tile
    # Operands of the tile GEMMs (S, S0 and the two gradient GEMMs): "input" keeps the input
    # dtype (bf16/fp16 GEMMs with fp32 accumulation and fp32 output on CUDA), "fp32" upcasts;
    # "auto" is "input" on CUDA and "fp32" elsewhere (CPU bf16 GEMMs are slow and round their
    # output). Softmax statistics and gradient accumulators are fp32 in every mode.
    tile_dtype: str = "auto"

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ChunkedConfig.{name}: expected a positive int, got {value!r}")
        if self.tile_dtype not in TILE_DTYPES:
            raise ValueError(f"ChunkedConfig.tile_dtype: expected one of {list(TILE_DTYPES)}, got {self.tile_dtype!r}")


# What the public functions use; tests swap in small tiles to exercise the tiling at small N.
DEFAULT_CHUNKED_CONFIG = ChunkedConfig()


def tile_dtype(mode: str, dtype: torch.dtype, is_cuda: bool) -> torch.dtype:
    """The GEMM operand dtype of a `ChunkedConfig.tile_dtype` mode for inputs of `dtype`."""
    if mode == "fp32" or (mode == "auto" and not is_cuda):
        return torch.float32
    return dtype


_MASKED_LOGIT = -1e30  # far below any logit (|S| <= s <= 100) yet finite: see _ChunkedBackend._tile


def _merge(lse, lse0, q, t_lse, t_lse0, t_q):
    """Online merge of two partial (lse, lse0, q) triples; q = E_{p0}[S0 - S] over the part."""
    new_lse = torch.logaddexp(lse, t_lse)
    if lse0 is None:
        return new_lse, None, None
    new_lse0 = torch.logaddexp(lse0, t_lse0)
    # Rescale each part's teacher-weighted mean by its share of the teacher mass, like the LSE.
    q = q * torch.exp(lse0 - new_lse0) + t_q * torch.exp(t_lse0 - new_lse0)
    return new_lse, new_lse0, q


def _finish(lse, lse0, q) -> Stats:
    return Stats(lse, lse0, None if lse0 is None else q - lse0 + lse)


class _ChunkedBackend:
    """Plain-torch tiles: the CPU path and the fallback without Triton.

    GEMM operands in `config.tile_dtype`, everything else in fp32. Peak extra memory is a few
    (block_m x block_n) fp32 tiles plus fp32 gradient accumulators of the inputs' size; S is
    recomputed in backward.
    """

    def __init__(self, config: Optional[ChunkedConfig] = None):
        self.config = config or ChunkedConfig()

    def _dtype(self, t: Tensor) -> torch.dtype:
        return tile_dtype(self.config.tile_dtype, t.dtype, t.is_cuda)

    def _tile(self, p: Pass, s, s0, r0, r1, c0, c1, a, a0):
        b = p.b[c0:c1].to(a.dtype)
        dot = mm_f32(a, b.T)
        logits = s * dot
        dot0 = logits0 = None
        if p.a0 is not None:
            dot0 = mm_f32(a0, p.b0[c0:c1].to(a.dtype).T)
            logits0 = s0 * dot0
        if p.row_ids is not None:
            same = p.row_ids[r0:r1, None] == p.col_ids[None, c0:c1]
            rows = torch.arange(r0, r1, device=a.device)[:, None] + p.row_offset
            cols = torch.arange(c0, c1, device=a.device)[None, :]
            # Equal captions are false negatives (the positive itself stays), for the student
            # and the teacher alike. A finite fill: exp() of it is 0, and the KL's S0 - S and
            # log p0 - log p are 0 there instead of the nan of -inf - -inf, even in a tile
            # whose pairs are all masked.
            masked = same & (rows != cols)
            logits = logits.masked_fill(masked, _MASKED_LOGIT)
            if logits0 is not None:
                logits0 = logits0.masked_fill(masked, _MASKED_LOGIT)
        return b, dot, logits, dot0, logits0

    def stats(self, p: Pass, s, s0, with_kl: bool, col_stats: bool):
        n, big_n = p.a.shape[0], p.b.shape[0]
        bm, bn = self.config.block_m, self.config.block_n
        dev = p.a.device

        def init(size):
            lse = torch.full((size,), float("-inf"), device=dev)
            if not with_kl:
                return [lse, None, None]
            return [lse, torch.full((size,), float("-inf"), device=dev), torch.zeros(size, device=dev)]

        rows_out = init(n)
        cols_acc = init(big_n) if col_stats else None
        dt = self._dtype(p.a)
        for r0 in range(0, n, bm):
            r1 = min(r0 + bm, n)
            a = p.a[r0:r1].to(dt)
            a0 = p.a0[r0:r1].to(dt) if with_kl else None
            racc = init(r1 - r0)
            for c0 in range(0, big_n, bn):
                c1 = min(c0 + bn, big_n)
                _, _, logits, _, logits0 = self._tile(p, s, s0, r0, r1, c0, c1, a, a0)
                for dim, acc, sl in ((1, racc, slice(None)), (0, cols_acc, slice(c0, c1))):
                    if acc is None:
                        continue
                    t_lse = torch.logsumexp(logits, dim)
                    t_lse0 = t_q = None
                    if with_kl:
                        t_lse0 = torch.logsumexp(logits0, dim)
                        p0 = torch.exp(logits0 - t_lse0.unsqueeze(dim))
                        t_q = (p0 * (logits0 - logits)).sum(dim)
                    cur = [None if x is None else x[sl] for x in acc]
                    merged = _merge(*cur, t_lse, t_lse0, t_q)
                    for x, m in zip(acc, merged):
                        if x is not None:
                            x[sl] = m
            for x, part in zip(rows_out, racc):
                if x is not None:
                    x[r0:r1] = part
        rows = _finish(*rows_out)
        cols = _finish(*cols_acc) if col_stats else None
        return rows, cols

    def grads(self, p: Pass, s, s0, rows: Stats, cols: Optional[Stats], coef: Tensor, want_ds: bool, want_ds0: bool):
        n, big_n = p.a.shape[0], p.b.shape[0]
        bm, bn = self.config.block_m, self.config.block_n
        dev = p.a.device
        with_kl = p.a0 is not None
        ci_r, ck_r, ci_c, ck_c = coef.unbind()
        da = torch.zeros(p.a.shape, device=dev, dtype=torch.float32)
        db = torch.zeros(p.b.shape, device=dev, dtype=torch.float32)
        ds = torch.zeros((), device=dev)
        ds0 = torch.zeros((), device=dev)
        dt = self._dtype(p.a)
        for r0 in range(0, n, bm):
            r1 = min(r0 + bm, n)
            a = p.a[r0:r1].to(dt)
            a0 = p.a0[r0:r1].to(dt) if with_kl else None
            lse_r = rows.lse[r0:r1, None]
            for c0 in range(0, big_n, bn):
                c1 = min(c0 + bn, big_n)
                b, dot, logits, dot0, logits0 = self._tile(p, s, s0, r0, r1, c0, c1, a, a0)
                # In-place where possible: on CPU these (block_m x block_n) passes are memory-bound.
                g = torch.sub(logits, lse_r).exp_().mul_(ci_r + ck_r)
                h = None
                if with_kl:
                    lse0_r = rows.lse0[r0:r1, None]
                    prob0 = torch.sub(logits0, lse0_r).exp_()
                    g.sub_(prob0 * ck_r)
                    if want_ds0:
                        # d KL_i / d S0_ij = p0_ij (log p0_ij - log p_ij - KL_i)
                        h = ck_r * prob0 * ((logits0 - lse0_r) - (logits - lse_r) - rows.kl[r0:r1, None])
                if cols is not None:
                    lse_c = cols.lse[None, c0:c1]
                    g.add_(torch.sub(logits, lse_c).exp_().mul_(ci_c + ck_c))
                    if with_kl:
                        lse0_c = cols.lse0[None, c0:c1]
                        prob0_c = torch.sub(logits0, lse0_c).exp_()
                        g.sub_(prob0_c * ck_c)
                        if want_ds0:
                            h = h + ck_c * prob0_c * (
                                (logits0 - lse0_c) - (logits - lse_c) - cols.kl[None, c0:c1]
                            )
                # The positives inside this tile: column row_offset + i for row i.
                lo = max(r0, c0 - p.row_offset)
                hi = min(r1, c1 - p.row_offset)
                if lo < hi:
                    ii = torch.arange(lo - r0, hi - r0, device=dev)
                    jj = ii + (r0 + p.row_offset - c0)
                    g[ii, jj] -= ci_r + (ci_c if cols is not None else 0.0)
                if dt == torch.float32:
                    da[r0:r1].addmm_(g, b)
                    db[c0:c1].addmm_(g.T, a)
                else:
                    # Gradient GEMMs in the tile dtype too (G rounded once), summed in fp32.
                    g_low = g.to(dt)
                    da[r0:r1] += mm_f32(g_low, b)
                    db[c0:c1] += mm_f32(g_low.T, a)
                if h is not None:
                    ds0 = ds0 + (h * dot0).sum()
        if want_ds:
            # sum_ij G_ij a_i.b_j = sum_i a_i.(G B)_i: n*d terms instead of n*N, fewer roundings.
            ds = (da * p.a.float()).sum()
        return da, db, ds, ds0


class _ContrastiveLossFn(torch.autograd.Function):
    """(s, s0, zi, zt, zi_all, zt_all, zi0, zt0, zi0_all, zt0_all, ids, spec) -> (infonce, kl)."""

    @staticmethod
    def forward(ctx, s, s0, zi, zt, zi_all, zt_all, zi0, zt0, zi0_all, zt0_all, caption_ids, spec):
        backend, with_inf, with_kl, row_offset = spec
        passes, slots, symmetric = _passes(zi, zt, zi_all, zt_all, zi0, zt0, zi0_all, zt0_all, caption_ids, row_offset, with_kl)
        n = zi.shape[0]
        stats: List[Tuple[Stats, Optional[Stats]]] = []
        for p in passes:
            stats.append(backend.stats(p, s, s0, with_kl, symmetric))
        infonce = torch.zeros((), device=zi.device)
        kl = torch.zeros((), device=zi.device)
        for p, (rows, cols) in zip(passes, stats):
            for st in (rows, cols):
                if st is None:
                    continue
                if with_inf:
                    # Positive logits S_{i, row_offset+i} in fp32: O(n d), not worth a kernel.
                    pos = s * (p.a.float() * p.b[p.row_offset : p.row_offset + n].float()).sum(1)
                    infonce = infonce + 0.5 * (st.lse - pos).mean()
                if with_kl:
                    kl = kl + st.kl.mean()
        flat = [t for st in stats for side in st if side is not None for t in side if t is not None]
        ctx.save_for_backward(s, s0, zi, zt, zi_all, zt_all, zi0, zt0, zi0_all, zt0_all, caption_ids, *flat)
        ctx.spec = spec
        ctx.layout = [(side is not None, side is not None and side.lse0 is not None) for st in stats for side in st]
        return infonce, kl

    @staticmethod
    def backward(ctx, g_inf, g_kl):
        backend, with_inf, with_kl, row_offset = ctx.spec
        saved = ctx.saved_tensors
        s, s0, zi, zt, zi_all, zt_all, zi0, zt0, zi0_all, zt0_all, caption_ids = saved[:11]
        it = iter(saved[11:])
        sides = []
        for present, has_kl in ctx.layout:
            if not present:
                sides.append(None)
                continue
            lse = next(it)
            sides.append(Stats(lse, next(it), next(it)) if has_kl else Stats(lse, None, None))
        stats = [(sides[i], sides[i + 1]) for i in range(0, len(sides), 2)]
        passes, slots, symmetric = _passes(zi, zt, zi_all, zt_all, zi0, zt0, zi0_all, zt0_all, caption_ids, row_offset, with_kl)
        n = zi.shape[0]
        zero = torch.zeros((), device=zi.device)
        ci = 0.5 * g_inf if with_inf else zero
        ck = g_kl if with_kl else zero
        # The 1/n of the row means is applied after the GEMMs, keeping fp16 gradient tiles in range.
        coef = torch.stack([ci, ck, ci, ck]).float()
        want_ds = ctx.needs_input_grad[0]
        want_ds0 = with_kl and ctx.needs_input_grad[1]
        grads = {}
        ds = torch.zeros((), device=zi.device)
        ds0 = torch.zeros((), device=zi.device)
        for p, (a_slot, b_slot), (rows, cols) in zip(passes, slots, stats):
            da, db, pds, pds0 = backend.grads(p, s, s0, rows, cols, coef, want_ds, want_ds0)
            for slot, g in ((a_slot, da), (b_slot, db)):
                grads[slot] = g if slot not in grads else grads[slot] + g
            ds = ds + pds
            ds0 = ds0 + pds0
        # dL/dA = s/n * G @ B (likewise for B); dL/ds = sum G * (A B^T) / n.
        scale = s / n
        names = ("zi", "zt", "zi_all", "zt_all")
        tensors = (zi, zt, zi_all, zt_all)
        out = []
        for name, t in zip(names, tensors):
            # In place: at large N these (N, d) fp32 buffers are most of the chunked path's memory.
            out.append(None if name not in grads else grads.pop(name).mul_(scale).to(t.dtype))
        return (
            ds / n if want_ds else None,
            ds0 / n if want_ds0 else None,
            *out,
            None, None, None, None, None, None,
        )


def _passes(zi, zt, zi_all, zt_all, zi0, zt0, zi0_all, zt0_all, caption_ids, row_offset, with_kl):
    """The passes of one loss, the input slot each pass's A and B gradients belong to, and
    whether the single pass is symmetric (its columns are the text->image direction)."""
    symmetric = (
        row_offset == 0
        and (zi_all is None or zi_all is zi)
        and (zt_all is None or zt_all is zt)
        and (not with_kl or ((zi0_all is None or zi0_all is zi0) and (zt0_all is None or zt0_all is zt0)))
    )
    if not with_kl:
        zi0 = zt0 = zi0_all = zt0_all = None

    # Both directions mask with the same identities: rows are the local slice, columns global.
    r_ids = None if caption_ids is None else caption_ids[row_offset : row_offset + zi.shape[0]]
    c_ids = caption_ids

    if symmetric:
        return [Pass(zi, zt, zi0, zt0, 0, r_ids, c_ids)], [("zi", "zt")], True
    cols_t = zt if zt_all is None else zt_all
    cols_i = zi if zi_all is None else zi_all
    cols_t0 = None if not with_kl else (zt0 if zt0_all is None else zt0_all)
    cols_i0 = None if not with_kl else (zi0 if zi0_all is None else zi0_all)
    passes = [
        Pass(zi, cols_t, zi0, cols_t0, row_offset, r_ids, c_ids),
        Pass(zt, cols_i, zt0, cols_i0, row_offset, r_ids, c_ids),
    ]
    slots = [("zi", "zt" if zt_all is None else "zt_all"), ("zt", "zi" if zi_all is None else "zi_all")]
    return passes, slots, False


def contrastive_loss(
    zi: Tensor,
    zt: Tensor,
    s: Tensor,
    s0: Tensor,
    *,
    zi0: Optional[Tensor] = None,
    zt0: Optional[Tensor] = None,
    zi_all: Optional[Tensor] = None,
    zt_all: Optional[Tensor] = None,
    zi0_all: Optional[Tensor] = None,
    zt0_all: Optional[Tensor] = None,
    row_offset: int = 0,
    caption_ids: Optional[Tensor] = None,
    with_infonce: bool = True,
    with_kl: bool = False,
    backend: str = "chunked",
    config=None,
) -> Tuple[Tensor, Tensor]:
    """`(infonce, kl)` as the references define them; the disabled term is a 0-dim zero.

    Inputs are already validated by the public functions. `s`, `s0`: 0-dim fp32 scales
    (`s0` may be the same tensor as `s`, as in the reference, and then receives the teacher
    path's gradient too). `caption_ids`: None or (N,) int64, checked by the caller
    (`_common.check_caption_ids`). `backend`: "chunked" or "triton"; `config` a `ChunkedConfig`
    or a Triton `TritonConfig` (None: the defaults). Raises ValueError for an unknown backend.
    """
    if backend == "chunked":
        impl = _ChunkedBackend(config or DEFAULT_CHUNKED_CONFIG)
    elif backend == "triton":
        from . import _triton_contrastive  # lazy: importing the package must not import Triton

        impl = _triton_contrastive.TritonBackend(config)
    else:
        raise ValueError(f"backend: expected 'chunked' or 'triton', got {backend!r}")
    if with_kl:
        zi0, zt0, zi0_all, zt0_all = (None if t is None else t.detach() for t in (zi0, zt0, zi0_all, zt0_all))
    spec = (impl, with_infonce, with_kl, row_offset)
    return _ContrastiveLossFn.apply(s, s0, zi, zt, zi_all, zt_all, zi0, zt0, zi0_all, zt0_all, caption_ids, spec)
