"""The embedded default: data generated here, a tiny CLIP pretrained here (cached), and the
CLIPErase settings that make it forget one shape."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

from .config import UnlearnConfig
from .pretrain import PretrainConfig, pretrain
from .synthetic import write_default

__all__ = ["DEMO_FORGET_CLASS", "demo_cache", "prepare_demo", "demo_config"]

DEMO_FORGET_CLASS = "circle"
_PRETRAIN_VERSION = "v1"  # bump when the generator or the pretraining recipe changes


def demo_cache() -> Path:
    """Where the demo's data and pretrained model live: $CLIPERASE_CACHE or ./.cache/cliperase."""
    return Path(os.environ.get("CLIPERASE_CACHE", Path.cwd() / ".cache" / "cliperase"))


def prepare_demo(cache: Optional[Path] = None, *, say: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Generate the data and pretrain the teacher once; later calls reuse both.

    Returns {"data": root, "pretrained": checkpoint path}.
    """
    cache = Path(cache or demo_cache()) / _PRETRAIN_VERSION
    data = cache / "data"
    if not (data / "manifest.json").is_file():
        say(f"generating the embedded dataset in {data}")
        write_default(data, forget=lambda s: s.shape == DEMO_FORGET_CLASS, progress=say)
    ckpt = cache / "tiny-clip-pretrained.pt"
    if not ckpt.is_file():
        say(f"pretraining tiny-clip from scratch (once; cached at {ckpt})")
        pretrain(PretrainConfig(model="tiny-clip", train_data=str(data / "train"), output=str(ckpt)), progress=progress)
    return {"data": data, "pretrained": ckpt}


def demo_config(cache: Optional[Path] = None, output_dir: str = "runs/demo", **overrides) -> UnlearnConfig:
    """CLIPErase on the embedded default: forget every circle, keep the other shapes."""
    paths = prepare_demo(cache, progress=overrides.pop("progress", True))
    data = paths["data"]
    fields = dict(
        model="tiny-clip",
        pretrained=str(paths["pretrained"]),
        forget_data=str(data / "forget"),
        retain_data=str(data / "retain"),
        eval_data=str(data / "eval"),
        forget_classes=(DEMO_FORGET_CLASS,),
        method="cliperase",
        steps=60,
        batch_size=64,
        lr=5e-5,
        output_dir=output_dir,
        overwrite=True,  # the demo's own directory: re-running the demo replaces it
    )
    fields.update(overrides)
    return UnlearnConfig(**fields)
