"""open_clip's registry with the engine's own configs, checkpoint files as their containers show
them, and the small helpers every loader shares (no model is built here)."""
from __future__ import annotations

import contextlib
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import torch
from torch import nn

__all__ = ["LoadedModel", "CONFIG_DIR", "register_configs", "available_models", "checkpoint_file_problems"]

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


def checkpoint_file_problems(path: str) -> List[str]:
    """Problems with a local checkpoint file that its container shows: empty, not a torch.save
    archive (garbage, a download cut short), no tensors in it. Tensors are memory-mapped and
    never read, so a multi-GB checkpoint costs milliseconds; weights of another architecture
    are only found when load_model loads them."""
    p = Path(path)
    if p.stat().st_size == 0:
        return [f"pretrained: checkpoint file {path!r} is empty (0 bytes)"]
    if p.suffix in (".npz", ".npy"):  # big_vision weights: open_clip converts them while loading
        return []
    if p.suffix == ".safetensors":
        try:
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                has_tensors = bool(list(f.keys()))
        except Exception as exc:  # safetensors raises its own error types for a bad header
            return [f"pretrained: {path!r} is not a readable safetensors file ({_brief(exc)})"]
        return [] if has_tensors else [f"pretrained: {path!r} holds no tensors"]
    if not zipfile.is_zipfile(p):
        with open(p, "rb") as f:
            if f.read(1) == b"\x80":  # a pickle: torch.save's legacy format, only checked when loaded
                return []
        return [f"pretrained: {path!r} is not a PyTorch checkpoint (neither a torch.save archive nor a pickle; "
                "a truncated download or another format?)"]
    with zipfile.ZipFile(p) as z:
        if any(n.endswith("/constants.pkl") for n in z.namelist()):
            return []  # a TorchScript archive (OpenAI's releases): reading it builds the module
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, ... for a damaged archive
        return [f"pretrained: {path!r} cannot be read as a PyTorch checkpoint ({_brief(exc)})"]
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        found = "an empty dict" if obj == {} else f"a {type(obj).__name__}"
        return [f"pretrained: {path!r} holds no state dict of tensors (found {found})"]
    return []


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
