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
merges the partials (O(N * N / BLOCK_M) floats, a small fraction of N x N).

Backward, `_grad_logits_kernel`: grid over (row blocks, column blocks) of a column stripe.
Each program recomputes S (and S0), forms the gradient wrt the logits
`c_inf (p - onehot) + c_kl (p - p0)` for rows (and columns in symmetric mode) from the saved
LSEs and stores it for the stripe (with the teacher logits' term for the gradient wrt `s0`
reduced per tile; the gradient wrt `s` is `sum(A * (G @ B))` on the host). The two gradient
GEMMs per stripe (`G @ B`, `G.T @ A`) are left to cuBLAS with fp32 output, dA accumulating
across stripes inside the GEMM: with d up to 1280 a program cannot hold a (BLOCK_M x d)
gradient accumulator in registers, and splitting d would recompute S d / BLOCK_D times. The
stripe width bounds the extra memory (`TritonConfig.stripe_bytes`).

Both kernels: masked pairs (padding, equal caption ids) get the finite logit MASKED for the
student and the teacher; logits are base 2 (S * log2 e) in the epilogue, so an exponential is
one `exp2`; the statistics stored are natural logs. Launch tiles come from `_triton_tiles.TILES`
by GPU architecture, dtype and variant (spill-free when compiled: tests/test_triton_tiles.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import addmm_f32, mm_f32
from ._layout import Pass, Stats
from ._triton_tiles import Tile, tile_for, variant_name

__all__ = ["TritonBackend", "TritonConfig", "DEFAULT_TRITON_CONFIG", "INTERPRETER_CONFIG"]

# The logit of a masked pair: far below any real logit (|S| <= s), finite (see the kernels).
MASKED = tl.constexpr(-1e30)
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _stats_fwd_kernel(
    a_ptr,  # (n, d) student rows
    b_ptr,  # (N, d) student columns
    a0_ptr,  # (n, d) teacher rows (read when HAS_KL)
    b0_ptr,  # (N, d) teacher columns (read when HAS_KL)
    ids_ptr,  # (N,) int32 dense caption ids (read when HAS_IDS)
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
    EVEN_K: tl.constexpr,  # d % BLOCK_K == 0: operand loads need no mask at all
):
    # Index math in int32 (sizes < 2**31); int64 only where a row index meets a stride.
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    # Out-of-range rows/columns load a clamped (real) row instead of a masked one, so operand
    # loads carry no row mask; their logits are masked below like any padding.
    a_rows = tl.minimum(rows, n - 1).to(tl.int64)[:, None]
    # The epilogue works on base-2 logits, S * log2(e): exp2 is one SFU instruction where exp
    # is a multiply and exp2, and the statistics are turned back into natural logs once per row.
    s = tl.load(scale_ptr) * LOG2E
    s0 = tl.load(scale_ptr + 1) * LOG2E
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    m0_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l0_i = tl.zeros((BLOCK_M,), tl.float32)
    q_i = tl.zeros((BLOCK_M,), tl.float32)
    if HAS_IDS:
        row_ids = tl.load(ids_ptr + row_offset + rows, mask=row_ok, other=-1)
    col_start = pid_s * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, N)
    for c0 in range(col_start, col_end, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_ok = cols < col_end
        b_rows = tl.minimum(cols, N - 1).to(tl.int64)[:, None]
        dot = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        dot0 = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, d, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            a = _load_rows(a_ptr, a_rows, stride_a, ks, d, EVEN_K)
            b = _load_rows(b_ptr, b_rows, stride_b, ks, d, EVEN_K)
            dot = tl.dot(a, tl.trans(b), dot, input_precision=INPUT_PRECISION)
            if HAS_KL:
                a0 = _load_rows(a0_ptr, a_rows, stride_a0, ks, d, EVEN_K)
                b0 = _load_rows(b0_ptr, b_rows, stride_b0, ks, d, EVEN_K)
                dot0 = tl.dot(a0, tl.trans(b0), dot0, input_precision=INPUT_PRECISION)
        valid = row_ok[:, None] & col_ok[None, :]
        if HAS_IDS:
            col_ids = tl.load(ids_ptr + cols, mask=col_ok, other=-2)
            same = (row_ids[:, None] == col_ids[None, :]) & (cols[None, :] != rows[:, None] + row_offset)
            valid = valid & ~same
        # Masked pairs (padding, equal captions) get a finite MASKED logit, for the student and
        # the teacher alike: exp() of it is 0 once a real logit has set the running max, the KL
        # term S0 - S is 0 there (never -inf - -inf), and the mask dies here, freeing its
        # registers. A row (column) whose pairs in a split are all masked gets lse ~ MASKED,
        # which the host's merge weighs by exp(MASKED - lse) = 0.
        logits = tl.where(valid, dot * s, MASKED)
        if HAS_KL:
            logits0 = tl.where(valid, dot0 * s0, MASKED)
            diff = logits0 - logits  # S0 - S, the KL's integrand; 0 at masked pairs
        # Student statistics first, both directions, so that `logits` dies before the teacher's
        # are formed: one (BLOCK_M, BLOCK_N) tensor fewer at the register peak.
        m_new = tl.maximum(m_i, tl.max(logits, 1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(logits - m_new[:, None]), 1)
        m_i = m_new
        if COL_STATS:
            cm = tl.max(logits, 0)
            c_lse = (cm + tl.log2(tl.sum(tl.exp2(logits - cm[None, :]), 0))) * LN2
            tl.store(col_lse_ptr + pid_m.to(tl.int64) * N + cols, c_lse, mask=col_ok)
        if HAS_KL:
            m0_new = tl.maximum(m0_i, tl.max(logits0, 1))
            alpha0 = tl.exp2(m0_i - m0_new)
            e0 = tl.exp2(logits0 - m0_new[:, None])
            l0_i = l0_i * alpha0 + tl.sum(e0, 1)
            q_i = q_i * alpha0 + tl.sum(e0 * diff, 1)
            m0_i = m0_new
            if COL_STATS:
                cm0 = tl.max(logits0, 0)
                ce0 = tl.exp2(logits0 - cm0[None, :])
                cl0 = tl.sum(ce0, 0)
                cq = tl.sum(ce0 * diff, 0) / cl0 * LN2
                tl.store(col_lse0_ptr + pid_m.to(tl.int64) * N + cols, (cm0 + tl.log2(cl0)) * LN2, mask=col_ok)
                tl.store(col_q_ptr + pid_m.to(tl.int64) * N + cols, cq, mask=col_ok)
    # l >= 1 (the max term), so log() and the divide are safe, padding rows included.
    out = pid_s.to(tl.int64) * n + rows
    tl.store(row_lse_ptr + out, (m_i + tl.log2(l_i)) * LN2, mask=row_ok)
    if HAS_KL:
        tl.store(row_lse0_ptr + out, (m0_i + tl.log2(l0_i)) * LN2, mask=row_ok)
        tl.store(row_q_ptr + out, q_i / l0_i * LN2, mask=row_ok)


@triton.jit
def _load_rows(ptr, rows, stride, ks, d, EVEN_K: tl.constexpr):
    """(len(rows), BLOCK_K) slice `ks` of the rows `rows` ((R, 1) int64, all in range)."""
    if EVEN_K:
        return tl.load(ptr + rows * stride + ks[None, :])
    return tl.load(ptr + rows * stride + ks[None, :], mask=ks[None, :] < d, other=0.0)


@triton.jit
def _grad_logits_kernel(
    a_ptr,  # (n, d) student rows
    b_ptr,  # (N, d) student columns
    a0_ptr,  # (n, d) teacher rows (HAS_KL)
    b0_ptr,  # (N, d) teacher columns (HAS_KL)
    ids_ptr,  # (N,) int32 dense caption ids (HAS_IDS)
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
    EVEN_K: tl.constexpr,  # d % BLOCK_K == 0: operand loads need no mask at all
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    local_cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = col_base + local_cols
    row_ok = rows < n
    col_ok = (local_cols < stripe) & (cols < N)
    a_rows = tl.minimum(rows, n - 1).to(tl.int64)[:, None]  # clamped, as in the forward
    b_rows = tl.minimum(cols, N - 1).to(tl.int64)[:, None]
    s = tl.load(scale_ptr) * LOG2E  # base-2 logits, as in the forward
    s0 = tl.load(scale_ptr + 1) * LOG2E
    dot = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    dot0 = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, d, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = _load_rows(a_ptr, a_rows, stride_a, ks, d, EVEN_K)
        b = _load_rows(b_ptr, b_rows, stride_b, ks, d, EVEN_K)
        dot = tl.dot(a, tl.trans(b), dot, input_precision=INPUT_PRECISION)
        if HAS_KL:
            a0 = _load_rows(a0_ptr, a_rows, stride_a0, ks, d, EVEN_K)
            b0 = _load_rows(b0_ptr, b_rows, stride_b0, ks, d, EVEN_K)
            dot0 = tl.dot(a0, tl.trans(b0), dot0, input_precision=INPUT_PRECISION)
    valid = row_ok[:, None] & col_ok[None, :]
    if HAS_IDS:
        row_ids = tl.load(ids_ptr + row_offset + rows, mask=row_ok, other=-1)
        col_ids = tl.load(ids_ptr + cols, mask=col_ok, other=-2)
        same = (row_ids[:, None] == col_ids[None, :]) & (cols[None, :] != rows[:, None] + row_offset)
        valid = valid & ~same
    # As in the forward: masked pairs get the finite MASKED logit, so their p and p0 are 0,
    # their gradient is 0 with no final select, and log p0 - log p is 0 there (not nan).
    logits = tl.where(valid, dot * s, MASKED)
    onehot = cols[None, :] == rows[:, None] + row_offset  # padding pairs are never stored
    c_inf_r = tl.load(coef_ptr)
    c_kl_r = tl.load(coef_ptr + 1)
    c_inf_c = tl.load(coef_ptr + 2)
    c_kl_c = tl.load(coef_ptr + 3)
    # log2 p = S2 - lse * log2(e); the saved statistics are natural logs.
    log_p = logits - tl.load(row_lse_ptr + rows, mask=row_ok, other=0.0)[:, None] * LOG2E
    g = (c_inf_r + c_kl_r) * tl.exp2(log_p) - tl.where(onehot, c_inf_r, 0.0)
    h_dot = 0.0  # sum of the teacher logits' gradient H times A0 B0^T, over log2(e) (TEACHER_GRAD)
    if HAS_KL:
        logits0 = tl.where(valid, dot0 * s0, MASKED)
        log_p0 = logits0 - tl.load(row_lse0_ptr + rows, mask=row_ok, other=0.0)[:, None] * LOG2E
        p0 = tl.exp2(log_p0)
        g -= c_kl_r * p0
        if TEACHER_GRAD:
            # d KL_i / d S0_ij = p0_ij (log p0_ij - log p_ij - KL_i), reduced at once so that
            # no (BLOCK_M, BLOCK_N) buffer of it stays live; in base 2 until the final LN2.
            kl_r = tl.load(row_kl_ptr + rows, mask=row_ok, other=0.0) * LOG2E
            h_dot += tl.sum(tl.sum(c_kl_r * p0 * (log_p0 - log_p - kl_r[:, None]) * dot0, 1), 0)
    if COL_STATS:
        log_pc = logits - tl.load(col_lse_ptr + cols, mask=col_ok, other=0.0)[None, :] * LOG2E
        g += (c_inf_c + c_kl_c) * tl.exp2(log_pc) - tl.where(onehot, c_inf_c, 0.0)
        if HAS_KL:
            log_p0c = logits0 - tl.load(col_lse0_ptr + cols, mask=col_ok, other=0.0)[None, :] * LOG2E
            p0c = tl.exp2(log_p0c)
            g -= c_kl_c * p0c
            if TEACHER_GRAD:
                kl_c = tl.load(col_kl_ptr + cols, mask=col_ok, other=0.0) * LOG2E
                h_dot += tl.sum(tl.sum(c_kl_c * p0c * (log_p0c - log_pc - kl_c[None, :]) * dot0, 1), 0)
    tl.store(
        g_ptr + rows.to(tl.int64)[:, None] * stride_g + local_cols[None, :],
        g.to(g_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )
    if TEACHER_GRAD:
        tl.store(ds0_ptr + pid_m * tl.num_programs(1) + pid_n, h_dot * LN2)


@dataclass(frozen=True)
class TritonConfig:
    fwd: Optional[Tile] = None  # forward tile; None: the shipped table for the device (_triton_tiles)
    bwd: Optional[Tile] = None  # backward tile; None: likewise
    min_programs: int = 0  # forward grid target; 0 = 4 x the GPU's SM count
    stripe_bytes: int = 1 << 30  # backward: memory for one stripe of logit gradients (G)
    stripe_cols: int = 0  # backward: fixed stripe width (0 = from stripe_bytes)


# What CUDA calls use; tests swap in other stripes (tests/test_kernels_gpu.py).
DEFAULT_TRITON_CONFIG = TritonConfig()

# Small tiles for the interpreter: it runs each program in numpy, one after another, and tests
# want several tiles, splits and stripes at N <= 48.
_INTERPRETER_TILE = Tile(16, 16, 16, 1, 1)
INTERPRETER_CONFIG = TritonConfig(fwd=_INTERPRETER_TILE, bwd=_INTERPRETER_TILE, min_programs=4, stripe_cols=32)


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

    def _config(self, t: Tensor, kernel: str, variant: str) -> Tuple[TritonConfig, Tile]:
        """The settings and the launch tile of `kernel` ("fwd"/"bwd") for inputs like `t`."""
        if not t.is_cuda and not _interpreted():
            raise ValueError(
                f"impl='triton': expected CUDA tensors, got {t.device}; on CPU use impl='chunked' "
                "(or set TRITON_INTERPRET=1 before cliperase.kernels' Triton module is imported)"
            )
        cfg = self.config or (DEFAULT_TRITON_CONFIG if t.is_cuda else INTERPRETER_CONFIG)
        tile = cfg.fwd if kernel == "fwd" else cfg.bwd
        if tile is None:
            props = torch.cuda.get_device_properties(t.device)
            tile = tile_for(kernel, (props.major, props.minor), t.dtype, variant,
                            getattr(props, "shared_memory_per_block_optin", None))
        return cfg, tile

    def stats(self, p: Pass, s: Tensor, s0: Tensor, with_kl: bool, col_stats: bool):
        cfg, tile = self._config(p.a, "fwd", variant_name(with_kl))
        a, b, a0, b0 = (_rowmajor(t) for t in (p.a, p.b, p.a0, p.b0))
        n, big_n, d = a.shape[0], b.shape[0], a.shape[1]
        dev = a.device
        row_blocks = triton.cdiv(n, tile.block_m)
        min_programs = cfg.min_programs or 4 * torch.cuda.get_device_properties(dev).multi_processor_count
        # Split the columns when the row blocks alone cannot fill the GPU (local rows n << N).
        splits = max(1, min(triton.cdiv(min_programs, row_blocks), triton.cdiv(big_n, tile.block_n)))
        cols_per_split = triton.cdiv(triton.cdiv(big_n, splits), tile.block_n) * tile.block_n
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
        ids = _dense_ids(p.col_ids) if p.col_ids is not None else row_lse  # dummy pointer when unmasked
        _stats_fwd_kernel[(row_blocks, splits)](
            a, b, a0 if with_kl else a, b0 if with_kl else b, ids, scales,
            row_lse, row_lse0, row_q, col_lse, col_lse0, col_q,
            a.stride(0), b.stride(0), (a0 if with_kl else a).stride(0), (b0 if with_kl else b).stride(0),
            n, big_n, d, p.row_offset, cols_per_split,
            BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
            HAS_KL=with_kl, HAS_IDS=p.col_ids is not None, COL_STATS=col_stats,
            INPUT_PRECISION=_precision(a), EVEN_K=d % tile.block_k == 0,
            num_warps=tile.num_warps, num_stages=tile.num_stages,
        )
        rows = _combine(row_lse, row_lse0 if with_kl else None, row_q)
        cols = _combine(col_lse, col_lse0 if with_kl else None, col_q) if col_stats else None
        return rows, cols

    def grads(self, p: Pass, s, s0, rows: Stats, cols: Optional[Stats], coef: Tensor, want_ds: bool, want_ds0: bool):
        with_kl = p.a0 is not None
        teacher = with_kl and want_ds0
        cfg, tile = self._config(p.a, "bwd", variant_name(with_kl, teacher))
        a, b, a0, b0 = (_rowmajor(t) for t in (p.a, p.b, p.a0, p.b0))
        n, big_n, d = a.shape[0], b.shape[0], a.shape[1]
        dev = a.device
        bn = tile.block_n
        stripe = cfg.stripe_cols or max(bn, cfg.stripe_bytes // max(1, n * a.element_size()))
        stripe = min(triton.cdiv(stripe, bn) * bn, triton.cdiv(big_n, bn) * bn)
        scales = torch.stack([s, s0]).float()
        ids = _dense_ids(p.col_ids) if p.col_ids is not None else rows.lse
        col_stats = cols is not None
        dummy = rows.lse
        da = torch.zeros((n, d), device=dev, dtype=torch.float32)
        db = torch.empty((big_n, d), device=dev, dtype=torch.float32)
        row_blocks = triton.cdiv(n, tile.block_m)
        ds0_parts = []
        g = torch.empty((n, stripe), device=dev, dtype=a.dtype)
        for c0 in range(0, big_n, stripe):
            width = min(stripe, big_n - c0)
            col_blocks = triton.cdiv(width, bn)
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
                BLOCK_M=tile.block_m, BLOCK_N=bn, BLOCK_K=tile.block_k,
                HAS_KL=with_kl, HAS_IDS=p.col_ids is not None, COL_STATS=col_stats,
                TEACHER_GRAD=teacher, INPUT_PRECISION=_precision(a), EVEN_K=d % tile.block_k == 0,
                num_warps=tile.num_warps, num_stages=tile.num_stages,
            )
            g_w = g[:, :width]
            # Gradient GEMMs in the input dtype with fp32 output; dA accumulates across stripes
            # inside the GEMM (no per-stripe rounding to 16 bits, no extra pass over dA).
            da = addmm_f32(da, g_w, b[c0 : c0 + width])
            db[c0 : c0 + width] = mm_f32(g_w.T, a)
            if teacher:
                ds0_parts.append(ds0_part)
        # sum_ij G_ij a_i.b_j = sum_i a_i.(G B)_i: no reduction over n x N terms needed.
        ds = (da * a.float()).sum() if want_ds else torch.zeros((), device=dev)
        ds0 = torch.cat(ds0_parts).sum() if teacher else torch.zeros((), device=dev)
        return da, db, ds, ds0


def _dense_ids(ids: Tensor) -> Tensor:
    """(N,) int64 ids -> (N,) int32 ranks with the same equalities (0 .. distinct - 1).

    int32 compares are one instruction instead of two in the kernels' innermost masks; sort
    and cumsum stay on the device (no host sync, unlike torch.unique)."""
    order = torch.argsort(ids)
    ordered = ids[order]
    step = torch.ones_like(ids, dtype=torch.int32)
    step[1:] = (ordered[1:] != ordered[:-1]).to(torch.int32)
    ranks = torch.empty_like(step)
    ranks[order] = torch.cumsum(step, 0, dtype=torch.int32) - 1
    return ranks


def _combine(lse_p: Tensor, lse0_p: Optional[Tensor], q_p: Tensor) -> Stats:
    """Merge (parts, size) partial statistics into one `Stats` of `size` entries."""
    lse = torch.logsumexp(lse_p, 0)
    if lse0_p is None:
        return Stats(lse, None, None)
    lse0 = torch.logsumexp(lse0_p, 0)
    q = (torch.exp(lse0_p - lse0) * q_p).sum(0)
    return Stats(lse, lse0, q - lse0 + lse)
