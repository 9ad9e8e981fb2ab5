"""Argument checks and backend dispatch shared by every loss in this package.

Kept free of engine imports: kernels/ is a leaf.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

TRITON_DEFAULT_ON_CUDA = True  # see resolve_impl


def as_scale(logit_scale, like: Tensor) -> Tensor:
    """The multiplier `s` (already exponentiated) as a 0-dim fp32 tensor on `like`'s device."""
    if isinstance(logit_scale, Tensor):
        if logit_scale.numel() != 1:
            raise ValueError(
                f"logit_scale: expected a scalar (0-dim or 1-element tensor, or float), "
                f"got shape {tuple(logit_scale.shape)}"
            )
        return logit_scale.reshape(()).to(device=like.device, dtype=torch.float32)
    return torch.tensor(float(logit_scale), device=like.device, dtype=torch.float32)


def check_pair(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    """Both 2-D, same shape, same dtype and device, floating point."""
    for name, t in ((name_a, a), (name_b, b)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D (rows, dim) tensor, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if a.shape != b.shape:
        raise ValueError(f"{name_b}: expected shape {tuple(a.shape)} (as {name_a}), got {tuple(b.shape)}")
    if a.dtype != b.dtype or a.device != b.device:
        raise ValueError(
            f"{name_b}: expected dtype {a.dtype} on {a.device} (as {name_a}), got {b.dtype} on {b.device}"
        )


def check_columns(local: Tensor, name: str, cols: Optional[Tensor], row_offset: int) -> Tensor:
    """Validate global columns against local rows; return the columns (local rows when None)."""
    if cols is None:
        if row_offset != 0:
            raise ValueError(f"row_offset={row_offset} needs the global columns ({name}) to be given")
        return local
    if cols.dim() != 2 or cols.shape[1] != local.shape[1]:
        raise ValueError(
            f"{name}: expected shape (N_global, {local.shape[1]}), got {tuple(cols.shape)}"
        )
    if cols.dtype != local.dtype or cols.device != local.device:
        raise ValueError(f"{name}: expected dtype {local.dtype} on {local.device}, got {cols.dtype} on {cols.device}")
    if not 0 <= row_offset <= cols.shape[0] - local.shape[0]:
        raise ValueError(
            f"row_offset: expected 0 <= row_offset <= {cols.shape[0] - local.shape[0]} "
            f"({local.shape[0]} local rows in {cols.shape[0]} global columns), got {row_offset}"
        )
    return cols


def mm_f32(x: Tensor, y: Tensor) -> Tensor:
    """`x @ y` as fp32. Half-precision operands: on CUDA one cuBLAS GEMM with fp32 accumulation
    and fp32 output (`out_dtype`, torch >= 2.8); on CPU, which has no such GEMM, the product
    (accumulated in fp32 by oneDNN) is rounded to the input dtype before the upcast."""
    if x.dtype == torch.float32:
        return x @ y
    if x.is_cuda:
        return torch.mm(x, y, out_dtype=torch.float32)
    return (x @ y).float()


def addmm_f32(acc: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """`acc + x @ y` for an fp32 `acc`; may return a new tensor (use the result).

    On CUDA with half-precision operands the sum happens in the GEMM's epilogue (one read and
    one write of `acc`, nothing rounded to 16 bits) instead of a GEMM to a 16-bit temporary,
    an upcast and an add (about five fp32 passes over an `acc`-sized buffer)."""
    if x.dtype == torch.float32:
        return acc.addmm_(x, y)
    if x.is_cuda:
        return torch.addmm(acc, x, y, out_dtype=torch.float32)
    return acc.add_(mm_f32(x, y))


def check_caption_ids(caption_ids: Optional[Tensor], columns: Sequence[Tensor]) -> Optional[Tensor]:
    """Validate global caption ids against the global columns; return them as int64 (or None).

    `caption_ids`: (N,) integer ids over the global batch, one per column of every direction,
    so every tensor in `columns` must have N rows. The caller's tensor is never modified.
    """
    if caption_ids is None:
        return None
    if not isinstance(caption_ids, Tensor):
        raise ValueError(f"caption_ids: expected a torch.Tensor, got {type(caption_ids).__name__}")
    big_n = columns[0].shape[0]
    if caption_ids.dim() != 1 or caption_ids.shape[0] != big_n:
        raise ValueError(
            f"caption_ids: expected a 1-D tensor of length N_global={big_n}, got shape {tuple(caption_ids.shape)}"
        )
    for cols in columns[1:]:
        if cols.shape[0] != big_n:
            raise ValueError(
                f"caption_ids: needs both directions over the same N_global columns, got {big_n} and {cols.shape[0]}"
            )
    if caption_ids.is_floating_point() or caption_ids.is_complex() or caption_ids.dtype == torch.bool:
        raise ValueError(f"caption_ids: expected an integer tensor, got {caption_ids.dtype}")
    if caption_ids.device != columns[0].device:
        raise ValueError(f"caption_ids: expected a tensor on {columns[0].device}, got {caption_ids.device}")
    return caption_ids.long()


def false_negatives(caption_ids: Optional[Tensor], row_offset: int, n: int) -> Optional[Tensor]:
    """(n, N) bool: True where row i and column j have equal ids and j is not i's positive.

    The materialised mask the references apply; None without caption ids.
    """
    if caption_ids is None:
        return None
    rows = caption_ids[row_offset : row_offset + n]
    same = rows[:, None] == caption_ids[None, :]
    i = torch.arange(n, device=caption_ids.device)
    same[i, i + row_offset] = False
    return same


def resolve_impl(impl: Optional[str], tensors: Sequence[Tensor], available: Sequence[str]) -> str:
    """Pick the backend: an explicit `impl`, else by device: Triton for CUDA tensors (when
    TRITON_DEFAULT_ON_CUDA and Triton imports), the chunked path otherwise.

    The Triton kernels are checked in Triton's CPU interpreter and compiled for sm_80/sm_90
    without spills (tests/test_triton_tiles.py); the GPU tier (`pytest -m gpu`) checks them on
    a GPU. Raises ValueError for an `impl` not in `available`.
    """
    if impl is not None:
        if impl not in available:
            raise ValueError(f"impl: expected one of {list(available)}, got {impl!r}")
        return impl
    on_cuda = all(t.is_cuda for t in tensors)
    if TRITON_DEFAULT_ON_CUDA and on_cuda and "triton" in available and triton_available():
        return "triton"
    return "chunked" if "chunked" in available else "ref"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
