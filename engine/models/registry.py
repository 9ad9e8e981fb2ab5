"""open_clip's registry with the engine's own configs, and the small helpers every loader shares
(no model is built here; nothing here imports torch or open_clip until a function needs it)."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, List, Optional

if TYPE_CHECKING:
    from torch import nn

__all__ = ["LoadedModel", "CONFIG_DIR", "register_configs", "available_models"]

CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"


@dataclass
class LoadedModel:
    model: nn.Module  # an open_clip CLIP, in eval mode, fp32
    preprocess: Callable  # PIL image -> (3, H, W) tensor, open_clip's eval transform
    tokenizer: Callable  # list[str] -> (B, context_length) int64
    name: str
    pretrained: Optional[str]


def register_configs() -> None:
    """Add the engine's model configs to open_clip's registry (idempotent)."""
    import open_clip

    ours = {p.stem for p in CONFIG_DIR.glob("*.json")}
    if not ours <= set(open_clip.list_models()):
        open_clip.add_model_config(CONFIG_DIR)


def available_models() -> List[str]:
    import open_clip

    register_configs()
    return open_clip.list_models()


def _brief(exc: BaseException, limit: int = 300) -> str:
    """`Type: message` on one line, cut at `limit` characters: torch's load errors run to
    thousands (every missing key of a state dict)."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def _quiet_random_init(asked: bool):
    """open_clip warns "No pretrained weights loaded ... initialized randomly" on the root logger;
    when no weights were asked for (pretraining, the tests' random checkpoints) that is the intent."""
    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "No pretrained weights loaded" not in record.getMessage()

    root, drop = logging.getLogger(), _Drop()
    if asked:
        root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)
