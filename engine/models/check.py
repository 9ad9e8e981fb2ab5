"""A (model name, pretrained) spec checked without building anything: names and checkpoint files
from their files (specs.py), a Hugging Face directory from its config (hf.py), a tag from
open_clip's own table (read from its source, not run)."""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import List, Optional

from .hf import hf_spec_problems
from .specs import architecture_problems, checkpoint_file_problems, model_names, pretrained_tags

__all__ = ["check_model_spec"]

_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".npz")


def _looks_like_path(spec: str) -> bool:
    return os.sep in spec or spec.startswith(".") or spec.endswith(_CHECKPOINT_SUFFIXES)


def check_model_spec(name: Optional[str], pretrained: Optional[str]) -> List[str]:
    """Problems with a model name / pretrained spec: unknown name (with close matches), missing
    or damaged checkpoint file, weights of another architecture, unknown tag (with the model's
    tags), or a Hugging Face directory that does not fit (models/hf.py)."""
    if pretrained and Path(pretrained).is_dir():
        return hf_spec_problems(name, pretrained)
    models = model_names()
    if name not in models:
        close = difflib.get_close_matches(str(name), models, n=5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        return [f"model: unknown architecture {name!r}.{hint} Available: {', '.join(models)}"]
    if not pretrained:
        return []
    if Path(pretrained).is_file():
        return checkpoint_file_problems(pretrained) or architecture_problems(name, pretrained)
    if _looks_like_path(pretrained):
        return [f"pretrained: checkpoint file {pretrained!r} does not exist"]
    tags = pretrained_tags(name)
    if pretrained not in tags:
        listed = ", ".join(tags) if tags else "none (use a local checkpoint path)"
        return [f"pretrained: {pretrained!r} is neither a file nor an open_clip tag of {name}; tags: {listed}"]
    return []
