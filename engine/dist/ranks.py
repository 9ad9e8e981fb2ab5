"""The ranks of a run and the global batch (see the package docstring for the row rule)."""
from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Tuple

from ..lazy import lazy_import

if TYPE_CHECKING:
    from torch import Tensor

torch = lazy_import("torch")  # `launched()` answers before anything heavy is imported (preflight)

__all__ = ["launched", "rank", "world_size", "is_main", "barrier", "broadcast", "gather_rows"]

_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def launched() -> bool:
    """True when a launcher (deepspeed, torchrun) started this process as one of a group."""
    return all(v in os.environ for v in _LAUNCHER_VARS)


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_available() and torch.distributed.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        torch.distributed.barrier()


def broadcast(obj):
    """Rank 0's `obj` on every rank (one process: `obj`). An exception object broadcast this way
    lets every rank raise what rank 0 found."""
    if world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def gather_rows(local: Tensor) -> Tuple[Tensor, Tensor, int]:
    """`(local, global, row_offset)` of a (n, d) block of rows held by each rank.

    `global` is (world * n, d): every rank's rows in rank order, with
    `global[row_offset : row_offset + n]` equal to `local`. The gather carries gradient
    (`torch.distributed.nn.functional.all_gather`: its backward sums each rank's gradient of its
    copy back into the owner's rows); plain `dist.all_gather` would silently drop the cross-rank
    terms. Tensors without grad are gathered the same way. One process: `(local, local, 0)`,
    the same tensor object, so the symmetric single-process loss paths are taken unchanged.
    Every rank must hold the same n.
    """
    world = world_size()
    if world == 1:
        return local, local, 0
    if not local.requires_grad:
        return local, torch.cat(_gather_no_grad(local), dim=0), rank() * local.shape[0]
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # deprecated in favour of functional collectives without autograd on gloo
        warnings.simplefilter("ignore", FutureWarning)
        parts = all_gather(local)
    return local, torch.cat(parts, dim=0), rank() * local.shape[0]


def _gather_no_grad(local: Tensor):
    parts = [torch.empty_like(local) for _ in range(world_size())]
    torch.distributed.all_gather(parts, local.contiguous())
    return parts
