"""The GPU validation kit's parts (`benchmarks/gpu_check.py` runs them, each in its own process).

- `kernels`: the loss kernels' fwd+bwd against the measured cuBLAS GEMM rate;
- `vith`: a ViT-H-14 unlearning step under the deepspeed launcher beside a plain open_clip step;
- `wheels`: `make gpu-wheels`, the wheels the offline GPU image lacks.

A part writes its result as JSON to the path it is given, again after every finished case, so a
part killed at its time cap still leaves what it measured.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["write_json"]


def write_json(path: Path, obj: object) -> None:
    """Write `obj` to `path` atomically (a killed writer leaves the previous version whole)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    os.replace(tmp, path)
