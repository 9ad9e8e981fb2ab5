"""The layout types both fast backends share: one logits block and its saved statistics.

Their own module so that `_contrastive` (the autograd Function, the chunked backend) and
`_triton_contrastive` (the Triton backend) both import it and neither imports the other back.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

from torch import Tensor

__all__ = ["Pass", "Stats"]


class Pass(NamedTuple):
    """One (n x N) logits block. Teacher tensors are None without the KL; ids None unmasked."""

    a: Tensor  # (n, d) rows (student)
    b: Tensor  # (N, d) columns (student)
    a0: Optional[Tensor]  # (n, d) teacher rows
    b0: Optional[Tensor]  # (N, d) teacher columns
    row_offset: int  # positive of row i is column row_offset + i
    row_ids: Optional[Tensor]  # (n,) int64 caption ids of the rows
    col_ids: Optional[Tensor]  # (N,) int64 caption ids of the columns


class Stats(NamedTuple):
    """Per-row (or per-column) fp32 statistics of one direction; lse0 and kl None without KL."""

    lse: Tensor  # logsumexp_j S_ij over the unmasked columns
    lse0: Optional[Tensor]  # logsumexp_j S0_ij over the same columns
    kl: Optional[Tensor]  # KL(softmax(S0_i) || softmax(S_i))
