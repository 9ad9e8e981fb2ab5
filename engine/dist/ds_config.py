"""The DeepSpeed config, built by one function from the typed run config (STYLE.md rule 11).

`build_ds_config(cfg, world_size)` is the only place a DeepSpeed config dict is made. A user's
`--deepspeed-config FILE` is merged into it: keys the typed config does not own (bucket sizes,
offload, overlap_comm, ...) are added, and a key the typed config owns must either be absent
from the file or hold the same value; anything else is a ConfigError naming the key, the file's
value and the typed value (and the flag that sets it), never resolved silently.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..errors import ConfigError

__all__ = ["build_ds_config", "deepspeed_config_problems", "world_size_from_env"]

# Keys (dotted paths) the typed config owns, with the UnlearnConfig field / flag that sets each.
_OWNED = {
    "train_batch_size": "batch_size * world * accum_steps",
    "train_micro_batch_size_per_gpu": "batch_size (--batch-size)",
    "gradient_accumulation_steps": "accum_steps (--accum-steps)",
    "gradient_clipping": "grad_clip (--set grad_clip=...)",
    "zero_optimization.stage": "zero_stage (--zero-stage)",
    "bf16.enabled": "precision (--precision)",
    "bfloat16.enabled": "precision (--precision)",
    "fp16.enabled": "precision (--precision)",
}
# Sections the engine supplies itself: the client AdamW (lr, weight_decay) and the lr schedule
# of engine/trainer.py (warmup_steps, schedule). A file that sets them is reported, not obeyed.
_ENGINE_SUPPLIED = {"optimizer": "lr, weight_decay", "scheduler": "warmup_steps, schedule"}


def world_size_from_env() -> int:
    """WORLD_SIZE as set by the deepspeed / torchrun launchers; 1 without a launcher."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _typed(cfg, world_size: int) -> Dict[str, Any]:
    return {
        "train_batch_size": cfg.batch_size * world_size * cfg.accum_steps,
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.accum_steps,
        "gradient_clipping": float(cfg.grad_clip),
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": cfg.precision == "fp16"},
        # The engine's optimizer is a client torch AdamW (no JIT-built CPU Adam).
        "zero_allow_untested_optimizer": True,
        # The engine logs itself (log.jsonl); DeepSpeed's own step prints stay quiet.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def _flatten(d: dict, prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = _merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def _read_file(path: str) -> Tuple[Optional[dict], List[str]]:
    p = Path(path)
    if not p.is_file():
        return None, [f"deepspeed_config: file {path!r} does not exist"]
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, [f"deepspeed_config: {path!r} is not valid JSON ({exc})"]
    if not isinstance(data, dict):
        return None, [f"deepspeed_config: {path!r} must hold a JSON object, got {type(data).__name__}"]
    return data, []


def _conflicts(typed: dict, user: dict, path: str) -> List[str]:
    problems = []
    flat_typed, flat_user = _flatten(typed), _flatten(user)
    for key, value in flat_user.items():
        if key in _OWNED and key in flat_typed and value != flat_typed[key]:
            problems.append(f"deepspeed_config: {path!r} sets {key}={value!r} but the run config gives "
                            f"{flat_typed[key]!r} (from {_OWNED[key]}); set it there, or drop it from the file")
        elif key in _OWNED and key not in flat_typed and value not in (False, None):
            problems.append(f"deepspeed_config: {path!r} sets {key}={value!r}; precision comes from {_OWNED[key]}")
    for section, fields in _ENGINE_SUPPLIED.items():
        if section in user:
            problems.append(f"deepspeed_config: {path!r} has an {section!r} section; the engine supplies its own "
                            f"(set {fields} in the run config instead)")
    return problems


def deepspeed_config_problems(cfg, world_size: Optional[int] = None) -> List[str]:
    """Every problem with `cfg.deepspeed_config` (missing file, bad JSON, conflicts); empty if fine."""
    if cfg.deepspeed_config is None:
        return []
    user, problems = _read_file(cfg.deepspeed_config)
    if user is None:
        return problems
    return _conflicts(_typed(cfg, world_size or world_size_from_env()), user, cfg.deepspeed_config)


def build_ds_config(cfg, world_size: int) -> dict:
    """The DeepSpeed config dict of a run of `cfg` on `world_size` processes.

    `train_batch_size == batch_size * world_size * accum_steps` (batch_size is the per-rank
    micro-batch of each of the forget and retain streams). ZeRO stage, bf16/fp16 and gradient
    clipping come from the typed fields; `cfg.deepspeed_config` (a JSON file) adds other keys.
    Raises ConfigError listing every conflict between the file and the typed config.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size: expected a positive integer, got {world_size!r}")
    typed = _typed(cfg, world_size)
    if cfg.deepspeed_config is None:
        return typed
    user, problems = _read_file(cfg.deepspeed_config)
    if user is not None:
        problems = _conflicts(typed, user, cfg.deepspeed_config)
    if problems:
        raise ConfigError(problems)
    return _merge(typed, user)
