"""Ranks and the global batch: the one place the local-vs-global row rule lives.

DeepSpeed itself (process groups, ZeRO engines, consolidation) is in zero.py; its config in
ds_config.py.

Each rank holds `n` rows of a global batch of `world * n` rows; rank r's rows are
`r * n .. (r + 1) * n` of it (the order `all_gather` concatenates in). Losses take local rows
against global columns, so the positive of local row i sits at global column `r * n + i`.
"""
from ..lazy import lazy_exports

__all__ = ["launched", "rank", "world_size", "is_main", "barrier", "broadcast", "gather_rows"]

_EXPORTS = {"launched": "ranks", "rank": "ranks", "world_size": "ranks", "is_main": "ranks", "barrier": "ranks",
            "broadcast": "ranks", "gather_rows": "ranks"}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
