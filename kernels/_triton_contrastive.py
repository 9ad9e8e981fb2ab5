"""Triton kernels for InfoNCE + consistency KL (the "triton" backend of `_contrastive.py`).

Imported lazily (only when impl="triton" is asked for), so importing `cliperase.kernels` never
imports Triton. Under `TRITON_INTERPRET=1` (set before this module is imported) the kernels
run on CPU tensors; the interpreter computes bf16 wrongly, so test fp32/fp16 there.

Forward, `_stats_fwd_kernel`: grid (row blocks, column splits). Each program streams the column
tiles of its split, computing the student tile S (and the teacher tile S0) with a K loop over d,
and keeps online row statistics in registers: running max / sum for the LSE and, with the KL,
the teacher's running max / sum and the teacher-weighted `sum_j p0_ij (S0_ij - S_ij)`, all
rescaled when the running max moves. It writes one partial `(lse, lse0, q)` per (split, row),
and in symmetric mode one per (row block, column) for the text->image direction; the host
merges the partials (O(N * N / BLOCK) floats, a small fraction of N x N).

Backward, `_grad_logits_kernel`: grid over (row blocks, column blocks) of a column stripe.
Each program recomputes S (and S0), forms the gradient wrt the logits
`c_inf (p - onehot) + c_kl (p - p0)` for rows (and columns in symmetric mode) from the saved
LSEs and stores it for the stripe (with the teacher logits' term for the gradient wrt `s0` reduced
per tile; the gradient wrt `s` is `sum(A * (G @ B))` on the host). The two gradient GEMMs per stripe (`G @ B`, `G.T @ A`) are left to cuBLAS: with
d up to 1280 a program cannot hold a (BLOCK_M x d) gradient accumulator in registers, and
splitting d would recompute S d / BLOCK_D times. The stripe width bounds the extra memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._layout import Pass, Stats

__all__ = ["TritonBackend", "TritonConfig"]


@triton.jit
def _stats_fwd_kernel(
    a_ptr,  # (n, d) student rows
    b_ptr,  # (N, d) student columns
    a0_ptr,  # (n, d) teacher rows (read when HAS_KL)
    b0_ptr,  # (N, d) teacher columns (read when HAS_KL)
    ids_ptr,  # (N,) int64 caption ids (read when HAS_IDS)
    scale_ptr,  # (2,) fp32: s, s0
    row_lse_ptr,  # (splits, n) fp32 out
    row_lse0_ptr,  # (splits, n) fp32 out (HAS_KL)
    row_q_ptr,  # (splits, n) fp32 out (HAS_KL)
    col_lse_ptr,  # (row_blocks, N) fp32 out (COL_STATS)
    col_lse0_ptr,  # (row_blocks, N) fp32 out (COL_STATS and HAS_KL)
    col_q_ptr,  # (row_blocks, N) fp32 out (COL_STATS and HAS_KL)
    stride_a,
    stride_b,
    stride_a0,
    stride_b0,
    n,
    N,
    d,
    row_offset,
    cols_per_split,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_KL: tl.constexpr,
    HAS_IDS: tl.constexpr,
    COL_STATS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < n
    s = tl.load(scale_ptr)
    s0 = tl.load(scale_ptr + 1)
    neg_inf = float("-inf")
    m_i = tl.full((BLOCK_M,), neg_inf, tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    m0_i = tl.full((BLOCK_M,), neg_inf, tl.float32)
    l0_i = tl.zeros((BLOCK_M,), tl.float32)
    q_i = tl.zeros((BLOCK_M,), tl.float32)
    if HAS_IDS:
        row_ids = tl.load(ids_ptr + row_offset + rows, mask=row_ok, other=-1)
    col_start = pid_s * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, N)
    for c0 in range(col_start, col_end, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < col_end
        dot = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        dot0 = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, d, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < d
            a = tl.load(a_ptr + rows[:, None] * stride_a + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptr + cols[:, None] * stride_b + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            dot = tl.dot(a, tl.trans(b), dot, input_precision=INPUT_PRECISION)
            if HAS_KL:
                a0 = tl.load(a0_ptr + rows[:, None] * stride_a0 + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                b0 = tl.load(b0_ptr + cols[:, None] * stride_b0 + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
                dot0 = tl.dot(a0, tl.trans(b0), dot0, input_precision=INPUT_PRECISION)
        logits = dot * s
        valid = row_ok[:, None] & col_ok[None, :]
        if HAS_IDS:
            col_ids = tl.load(ids_ptr + cols, mask=col_ok, other=-2)
            same = (row_ids[:, None] == col_ids[None, :]) & (cols[None, :] != rows[:, None] + row_offset)
            valid = valid & ~same
        masked = tl.where(valid, logits, neg_inf)
        # Online row LSE; a row whose columns are all masked so far keeps max -inf, so the
        # shift uses 0 there to avoid exp(-inf - -inf) = nan.
        m_new = tl.maximum(m_i, tl.max(masked, 1))
        m_shift = tl.where(m_new == neg_inf, 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_shift) + tl.sum(tl.exp(masked - m_shift[:, None]), 1)
        m_i = m_new
        if HAS_KL:
            logits0 = dot0 * s0
            masked0 = tl.where(valid, logits0, neg_inf)
            m0_new = tl.maximum(m0_i, tl.max(masked0, 1))
            m0_shift = tl.where(m0_new == neg_inf, 0.0, m0_new)
            alpha0 = tl.exp(m0_i - m0_shift)
            e0 = tl.exp(masked0 - m0_shift[:, None])
            l0_i = l0_i * alpha0 + tl.sum(e0, 1)
            q_i = q_i * alpha0 + tl.sum(tl.where(valid, e0 * (logits0 - logits), 0.0), 1)
            m0_i = m0_new
        if COL_STATS:
            cm = tl.max(masked, 0)
            cm_shift = tl.where(cm == neg_inf, 0.0, cm)
            c_lse, _ = _partial_lse(cm_shift, tl.sum(tl.exp(masked - cm_shift[None, :]), 0))
            tl.store(col_lse_ptr + pid_m * N + cols, c_lse, mask=col_ok)
            if HAS_KL:
                cm0 = tl.max(masked0, 0)
                cm0_shift = tl.where(cm0 == neg_inf, 0.0, cm0)
                ce0 = tl.exp(masked0 - cm0_shift[None, :])
                c_lse0, cl0 = _partial_lse(cm0_shift, tl.sum(ce0, 0))
                cq = tl.sum(tl.where(valid, ce0 * (logits0 - logits), 0.0), 0) / cl0
                tl.store(col_lse0_ptr + pid_m * N + cols, c_lse0, mask=col_ok)
                tl.store(col_q_ptr + pid_m * N + cols, cq, mask=col_ok)
    m_shift = tl.where(m_i == neg_inf, 0.0, m_i)
    lse, _ = _partial_lse(m_shift, l_i)
    tl.store(row_lse_ptr + pid_s * n + rows, lse, mask=row_ok)
    if HAS_KL:
        m0_shift = tl.where(m0_i == neg_inf, 0.0, m0_i)
        lse0, l0_safe = _partial_lse(m0_shift, l0_i)
        tl.store(row_lse0_ptr + pid_s * n + rows, lse0, mask=row_ok)
        tl.store(row_q_ptr + pid_s * n + rows, q_i / l0_safe, mask=row_ok)


@triton.jit
def _partial_lse(m_shift, l):
    """(lse, l or 1) of a partial sum `l = sum exp(x - m_shift)` that may be empty (l = 0).

    A row (column) whose pairs in this part are all masked, and a padding row, have l = 0:
    their lse is -inf (merged away by the host) and q's divisor 1, not the nan of 0 / 0;
    log() never sees 0 (the interpreter would warn).
    """
    has = l > 0
    l_safe = tl.where(has, l, 1.0)
    return tl.where(has, m_shift + tl.log(l_safe), float("-inf")), l_safe


@triton.jit
def _grad_logits_kernel(
    a_ptr,  # (n, d) student rows
    b_ptr,  # (N, d) student columns
    a0_ptr,  # (n, d) teacher rows (HAS_KL)
    b0_ptr,  # (N, d) teacher columns (HAS_KL)
    ids_ptr,  # (N,) int64 caption ids (HAS_IDS)
    scale_ptr,  # (2,) fp32: s, s0
    coef_ptr,  # (4,) fp32: c_inf_row, c_kl_row, c_inf_col, c_kl_col
    row_lse_ptr,  # (n,) fp32
    row_lse0_ptr,  # (n,) fp32 (HAS_KL)
    row_kl_ptr,  # (n,) fp32 (TEACHER_GRAD)
    col_lse_ptr,  # (N,) fp32 (COL_STATS)
    col_lse0_ptr,  # (N,) fp32 (COL_STATS and HAS_KL)
    col_kl_ptr,  # (N,) fp32 (COL_STATS and TEACHER_GRAD)
    g_ptr,  # (n, stripe) out, gradient wrt the logits of this column stripe
    ds0_ptr,  # (row_blocks * col_blocks,) fp32 out: partial sums of H * (A0 B0^T) (TEACHER_GRAD)
    stride_a,
    stride_b,
    stride_a0,
    stride_b0,
    stride_g,
    n,
    N,
    d,
    row_offset,
    col_base,
    stripe,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_KL: tl.constexpr,
    HAS_IDS: tl.constexpr,
    COL_STATS: tl.constexpr,
    TEACHER_GRAD: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    local_cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    cols = col_base + local_cols
    row_ok = rows < n
    col_ok = (local_cols < stripe) & (cols < N)
    s = tl.load(scale_ptr)
    s0 = tl.load(scale_ptr + 1)
    dot = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    dot0 = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, d, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < d
        a = tl.load(a_ptr + rows[:, None] * stride_a + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + cols[:, None] * stride_b + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        dot = tl.dot(a, tl.trans(b), dot, input_precision=INPUT_PRECISION)
        if HAS_KL:
            a0 = tl.load(a0_ptr + rows[:, None] * stride_a0 + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b0 = tl.load(b0_ptr + cols[:, None] * stride_b0 + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            dot0 = tl.dot(a0, tl.trans(b0), dot0, input_precision=INPUT_PRECISION)
    logits = dot * s
    valid = row_ok[:, None] & col_ok[None, :]
    if HAS_IDS:
        row_ids = tl.load(ids_ptr + row_offset + rows, mask=row_ok, other=-1)
        col_ids = tl.load(ids_ptr + cols, mask=col_ok, other=-2)
        same = (row_ids[:, None] == col_ids[None, :]) & (cols[None, :] != rows[:, None] + row_offset)
        valid = valid & (same == 0)
    onehot = (cols[None, :] == rows[:, None] + row_offset) & valid
    c_inf_r = tl.load(coef_ptr)
    c_kl_r = tl.load(coef_ptr + 1)
    c_inf_c = tl.load(coef_ptr + 2)
    c_kl_c = tl.load(coef_ptr + 3)
    lse_r = tl.load(row_lse_ptr + rows, mask=row_ok, other=0.0)
    log_p = logits - lse_r[:, None]
    g = (c_inf_r + c_kl_r) * tl.exp(log_p) - tl.where(onehot, c_inf_r, 0.0)
    h = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    if HAS_KL:
        logits0 = dot0 * s0
        lse0_r = tl.load(row_lse0_ptr + rows, mask=row_ok, other=0.0)
        log_p0 = logits0 - lse0_r[:, None]
        p0 = tl.exp(log_p0)
        g -= c_kl_r * p0
        if TEACHER_GRAD:
            kl_r = tl.load(row_kl_ptr + rows, mask=row_ok, other=0.0)
            h += c_kl_r * p0 * (log_p0 - log_p - kl_r[:, None])
    if COL_STATS:
        lse_c = tl.load(col_lse_ptr + cols, mask=col_ok, other=0.0)
        log_pc = logits - lse_c[None, :]
        g += (c_inf_c + c_kl_c) * tl.exp(log_pc) - tl.where(onehot, c_inf_c, 0.0)
        if HAS_KL:
            lse0_c = tl.load(col_lse0_ptr + cols, mask=col_ok, other=0.0)
            log_p0c = logits0 - lse0_c[None, :]
            p0c = tl.exp(log_p0c)
            g -= c_kl_c * p0c
            if TEACHER_GRAD:
                kl_c = tl.load(col_kl_ptr + cols, mask=col_ok, other=0.0)
                h += c_kl_c * p0c * (log_p0c - log_pc - kl_c[None, :])
    # Masked pairs (padding, equal captions) carry no gradient.
    g = tl.where(valid, g, 0.0)
    tl.store(
        g_ptr + rows[:, None] * stride_g + local_cols[None, :],
        g.to(g_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )
    if TEACHER_GRAD:
        h = tl.where(valid, h, 0.0)
        tl.store(ds0_ptr + pid_m * tl.num_programs(1) + pid_n, tl.sum(tl.sum(h * dot0, 1), 0))


@dataclass(frozen=True)
class TritonConfig:
    block_m: int = 128  # rows per program (GPU defaults; untuned, see benchmarks/README.md)
    block_n: int = 128  # columns per inner tile; 64 is used with the KL (two fp32 accumulators)
    block_k: int = 64  # slice of d per tl.dot step
    num_warps: int = 8
    num_stages: int = 3
    min_programs: int = 0  # forward grid target; 0 = 4 x the GPU's SM count
    stripe_bytes: int = 1 << 29  # backward: memory for one stripe of logit gradients
    stripe_cols: int = 0  # backward: fixed stripe width (0 = from stripe_bytes)


# Small tiles for the interpreter: it runs each program in numpy, one after another, and tests
# want several tiles, splits and stripes at N <= 48.
_INTERPRETER_CONFIG = TritonConfig(
    block_m=16, block_n=16, block_k=16, num_warps=1, num_stages=1, min_programs=4, stripe_cols=32
)


def _interpreted() -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - layout of older Triton releases
        return False
    return isinstance(_stats_fwd_kernel, InterpretedFunction)


def _rowmajor(t: Optional[Tensor]) -> Optional[Tensor]:
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _precision(t: Tensor) -> str:
    # Follow torch's own matmul setting for fp32 so the kernel matches the reference's GEMMs.
    if t.dtype == torch.float32 and not (t.is_cuda and torch.backends.cuda.matmul.allow_tf32):
        return "ieee"
    return "tf32"


class TritonBackend:
    """The Triton primitives of `_contrastive._ContrastiveLossFn`."""

    def __init__(self, config: Optional[TritonConfig] = None):
        self.config = config

    def _config(self, t: Tensor, with_kl: bool) -> TritonConfig:
        if not t.is_cuda and not _interpreted():
            raise ValueError(
                f"impl='triton': expected CUDA tensors, got {t.device}; on CPU use impl='chunked' "
                "(or set TRITON_INTERPRET=1 before cliperase.kernels' Triton module is imported)"
            )
        if self.config is not None:
            return self.config
        if not t.is_cuda:
            return _INTERPRETER_CONFIG
        return TritonConfig(block_n=64) if with_kl else TritonConfig()

    def stats(self, p: Pass, s: Tensor, s0: Tensor, with_kl: bool, col_stats: bool):
        cfg = self._config(p.a, with_kl)
        a, b, a0, b0 = (_rowmajor(t) for t in (p.a, p.b, p.a0, p.b0))
        n, big_n, d = a.shape[0], b.shape[0], a.shape[1]
        dev = a.device
        row_blocks = triton.cdiv(n, cfg.block_m)
        min_programs = cfg.min_programs or 4 * torch.cuda.get_device_properties(dev).multi_processor_count
        # Split the columns when the row blocks alone cannot fill the GPU (local rows n << N).
        splits = max(1, min(triton.cdiv(min_programs, row_blocks), triton.cdiv(big_n, cfg.block_n)))
        cols_per_split = triton.cdiv(triton.cdiv(big_n, splits), cfg.block_n) * cfg.block_n
        splits = triton.cdiv(big_n, cols_per_split)  # no empty split
        f32 = dict(device=dev, dtype=torch.float32)
        row_lse = torch.empty((splits, n), **f32)
        row_lse0 = torch.empty((splits, n), **f32) if with_kl else row_lse
        row_q = torch.empty((splits, n), **f32) if with_kl else row_lse
        col_shape = (row_blocks, big_n) if col_stats else (1,)
        col_lse = torch.empty(col_shape, **f32)
        col_lse0 = torch.empty(col_shape, **f32) if (col_stats and with_kl) else col_lse
        col_q = torch.empty(col_shape, **f32) if (col_stats and with_kl) else col_lse
        scales = torch.stack([s, s0]).float()
        ids = p.col_ids if p.col_ids is not None else row_lse  # dummy pointer when unmasked
        _stats_fwd_kernel[(row_blocks, splits)](
            a, b, a0 if with_kl else a, b0 if with_kl else b, ids, scales,
            row_lse, row_lse0, row_q, col_lse, col_lse0, col_q,
            a.stride(0), b.stride(0), (a0 if with_kl else a).stride(0), (b0 if with_kl else b).stride(0),
            n, big_n, d, p.row_offset, cols_per_split,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            HAS_KL=with_kl, HAS_IDS=p.col_ids is not None, COL_STATS=col_stats,
            INPUT_PRECISION=_precision(a), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        rows = _combine(row_lse, row_lse0 if with_kl else None, row_q)
        cols = _combine(col_lse, col_lse0 if with_kl else None, col_q) if col_stats else None
        return rows, cols

    def grads(self, p: Pass, s, s0, rows: Stats, cols: Optional[Stats], coef: Tensor, want_ds: bool, want_ds0: bool):
        with_kl = p.a0 is not None
        cfg = self._config(p.a, with_kl)
        a, b, a0, b0 = (_rowmajor(t) for t in (p.a, p.b, p.a0, p.b0))
        n, big_n, d = a.shape[0], b.shape[0], a.shape[1]
        dev = a.device
        stripe = cfg.stripe_cols or max(cfg.block_n, cfg.stripe_bytes // max(1, n * a.element_size()))
        stripe = min(triton.cdiv(stripe, cfg.block_n) * cfg.block_n, triton.cdiv(big_n, cfg.block_n) * cfg.block_n)
        scales = torch.stack([s, s0]).float()
        ids = p.col_ids if p.col_ids is not None else rows.lse
        teacher = with_kl and want_ds0
        col_stats = cols is not None
        dummy = rows.lse
        da = torch.zeros((n, d), device=dev, dtype=torch.float32)
        db = torch.empty((big_n, d), device=dev, dtype=torch.float32)
        row_blocks = triton.cdiv(n, cfg.block_m)
        ds0_parts = []
        g = torch.empty((n, stripe), device=dev, dtype=a.dtype)
        for c0 in range(0, big_n, stripe):
            width = min(stripe, big_n - c0)
            col_blocks = triton.cdiv(width, cfg.block_n)
            ds0_part = torch.empty(row_blocks * col_blocks if teacher else 1, device=dev, dtype=torch.float32)
            _grad_logits_kernel[(row_blocks, col_blocks)](
                a, b, a0 if with_kl else a, b0 if with_kl else b, ids, scales, coef,
                rows.lse, rows.lse0 if with_kl else dummy, rows.kl if teacher else dummy,
                cols.lse if col_stats else dummy,
                cols.lse0 if (col_stats and with_kl) else dummy,
                cols.kl if (col_stats and teacher) else dummy,
                g, ds0_part,
                a.stride(0), b.stride(0), (a0 if with_kl else a).stride(0), (b0 if with_kl else b).stride(0),
                g.stride(0), n, big_n, d, p.row_offset, c0, width,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                HAS_KL=with_kl, HAS_IDS=p.col_ids is not None, COL_STATS=col_stats,
                TEACHER_GRAD=teacher, INPUT_PRECISION=_precision(a),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
            g_w = g[:, :width]
            # Gradient GEMMs in the input dtype (fp32 accumulation inside the GEMM), summed
            # across stripes in fp32.
            da += (g_w @ b[c0 : c0 + width]).float()
            db[c0 : c0 + width] = (g_w.T @ a).float()
            if teacher:
                ds0_parts.append(ds0_part)
        # sum_ij G_ij a_i.b_j = sum_i a_i.(G B)_i: no reduction over n x N terms needed.
        ds = (da * a.float()).sum() if want_ds else torch.zeros((), device=dev)
        ds0 = torch.cat(ds0_parts).sum() if teacher else torch.zeros((), device=dev)
        return da, db, ds, ds0


def _combine(lse_p: Tensor, lse0_p: Optional[Tensor], q_p: Tensor) -> Stats:
    """Merge (parts, size) partial statistics into one `Stats` of `size` entries."""
    lse = torch.logsumexp(lse_p, 0)
    if lse0_p is None:
        return Stats(lse, None, None)
    lse0 = torch.logsumexp(lse0_p, 0)
    q = (torch.exp(lse0_p - lse0) * q_p).sum(0)
    return Stats(lse, lse0, q - lse0 + lse)
