"""Crash-safe writes and open_clip-loadable exports."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

__all__ = ["atomic_write_bytes", "atomic_save", "write_json", "export_open_clip"]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic(path: Path, write) -> None:
    """Write to a temporary sibling, fsync, rename: a reader sees the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def atomic_write_bytes(data: bytes, path: Path) -> None:
    _atomic(path, lambda f: f.write(data))


def atomic_save(obj: Any, path: Path) -> None:
    _atomic(path, lambda f: torch.save(obj, f))


def write_json(obj: Any, path: Path) -> None:
    atomic_write_bytes((json.dumps(obj, indent=2, sort_keys=False) + "\n").encode(), path)


def export_open_clip(model: nn.Module, path: Path, *, dtype: torch.dtype = torch.float32, meta: Optional[dict] = None) -> Path:
    """Save a plain state dict that `open_clip.create_model(name, pretrained=path)` loads.

    `meta` (model name, method, step...) goes to a JSON sidecar `path.json`, keeping the
    checkpoint itself a bare state dict that any open_clip version reads with weights_only.
    """
    state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).clone() for k, v in model.state_dict().items()}
    atomic_save(state, path)
    if meta is not None:
        write_json(meta, Path(str(path) + ".json"))
    return Path(path)
