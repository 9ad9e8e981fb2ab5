"""`unlearn(UnlearnConfig(...))`: the surface the CLI and other frontends call."""
from __future__ import annotations

import logging
from typing import Optional

from .config import UnlearnConfig
from .lazy import lazy_import
from .preflight import check

# The recipe (torch, open_clip, DeepSpeed) loads only once the config passed its checks: a refused
# config costs what validation imports, well under a second.
recipe = lazy_import("cliperase.engine.recipe")

__all__ = ["unlearn"]

log = logging.getLogger("cliperase")


def unlearn(cfg: UnlearnConfig, *, progress: bool = True) -> Optional[dict]:
    """Unlearn `cfg.forget_data` from `cfg.model` and report before/after metrics.

    Checks the whole config first (ConfigError lists every problem, before any model is
    built; legal but suspicious setups are logged as warnings), evaluates the original model, runs `cfg.steps` steps of `cfg.method`, evaluates
    again with the same code, and writes to `cfg.output_dir`:
      - `report.json`: {"method", "model", "config", "steps", "wall_s", "before", "after", ...}
      - `model.pt` (+ `model.pt.json`): the unlearned weights as an open_clip state dict,
      - `run.json` (config, versions, status) and `log.jsonl` (losses every `log_every` steps),
      - `checkpoints/step_<N>/`: training checkpoints every `save_every` steps, at the end and
        on SIGTERM/SIGINT (which then raise engine.stopping.Interrupted); `resume="latest"`
        continues from the newest one that verifies, on the same data order and lr schedule,
        and ends at the same weights as an uninterrupted run,
      - `ds_config.json`: the DeepSpeed config, on runs through DeepSpeed.
    The input checkpoint and shards are only read. Returns the report (on rank 0; other ranks
    return None).

    Runs through DeepSpeed when started by a launcher (`deepspeed launch/unlearn.py ...`: every
    rank runs this function) or when `zero_stage > 0` / `precision != "fp32"`; otherwise plain
    torch on one process. Distributed, the global batch is `batch_size * world` pairs of each
    stream, every rank decoding its own share (data.PairStream); losses take local rows against
    the gathered global batch, and only rank 0 evaluates and writes files. The run's stages are
    engine/recipe.py's UnlearnRecipe.
    """
    for warning in check(cfg):
        log.warning(warning)
    return recipe.UnlearnRecipe(cfg, progress=progress).run()
