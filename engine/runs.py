"""A finished unlearn run read back: which architecture it trained, from which original weights,
and where its unlearned open_clip state dict is."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import ConfigError

__all__ = ["RunCheckpoint", "read_run"]


@dataclass(frozen=True)
class RunCheckpoint:
    run: Path  # the run folder
    model: str  # open_clip architecture name the run trained (report.json config.model)
    pretrained: Optional[str]  # the original weights it started from: a tag, a file or a HF directory
    checkpoint: Path  # <run>/model.pt: the unlearned weights, an open_clip state dict


def read_run(path: str, what: str = "--run") -> RunCheckpoint:
    """The run in folder `path` (its report.json and model.pt). Builds nothing.

    Raises ConfigError, labelled `what`, for a missing folder, a run that has not finished
    (no report.json or model.pt), an unreadable report, or a report naming no model.
    """
    run = Path(path)
    if not run.is_dir():
        raise ConfigError([f"{what}: {path!r} is not a directory (expected an unlearn run folder)"])
    report, ckpt = run / "report.json", run / "model.pt"
    if not report.is_file() or not ckpt.is_file():
        raise ConfigError([f"{what}: {path!r} has no report.json and model.pt (is it a finished unlearn run?)"])
    try:
        config = json.loads(report.read_text()).get("config")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise ConfigError([f"{what}: {str(report)!r} cannot be read ({type(exc).__name__}: {exc})"]) from exc
    if not isinstance(config, dict) or not isinstance(config.get("model"), str) or not config["model"]:
        raise ConfigError([f"{what}: {str(report)!r} names no model (expected config.model, an open_clip name)"])
    pretrained = config.get("pretrained")
    return RunCheckpoint(run, config["model"], pretrained if isinstance(pretrained, str) and pretrained else None, ckpt)
