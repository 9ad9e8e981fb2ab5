"""Models through open_clip: architecture names, pretrained tags, local checkpoint files.

The engine's own small configs are registered with open_clip's
registry on first use, so `open_clip.create_model_and_transforms("tiny-clip", pretrained=PATH)`
works in any process that called `register_configs()`:
- `tiny-clip`: ResNet image tower, transformer text tower, 32 px. Learns the embedded default
  in a minute on two CPU cores (a ViT this small needs several times longer); demo and tests.
- `tiny-vit`: the same with a ViT image tower (patch 4), for tests of ViT code paths.
- `small-clip`: a ViT at 64 px, a step up for GPU smoke runs.
"""
from __future__ import annotations

import contextlib
import difflib
import logging
import os
import socket
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import torch
from torch import nn

from .errors import ConfigError

__all__ = ["LoadedModel", "register_configs", "available_models", "check_model_spec", "checkpoint_file_problems", "load_model"]

CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".npz")


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


def _looks_like_path(spec: str) -> bool:
    return os.sep in spec or spec.startswith(".") or spec.endswith(_CHECKPOINT_SUFFIXES)


def check_model_spec(name: str, pretrained: Optional[str]) -> List[str]:
    """Problems with a model name / pretrained spec, found without building anything."""
    import open_clip

    if pretrained and Path(pretrained).is_dir():  # a Hugging Face CLIP directory: engine/hf.py
        from .hf import hf_spec_problems

        return hf_spec_problems(name, pretrained)
    problems = []
    models = available_models()
    if name not in models:
        close = difflib.get_close_matches(name, models, n=5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        problems.append(f"model: unknown architecture {name!r}.{hint} Available: {', '.join(models)}")
        return problems
    if not pretrained:
        return problems
    if Path(pretrained).is_file():
        return checkpoint_file_problems(pretrained)
    if _looks_like_path(pretrained):
        problems.append(f"pretrained: checkpoint file {pretrained!r} does not exist")
        return problems
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        listed = ", ".join(tags) if tags else "none (use a local checkpoint path)"
        problems.append(f"pretrained: {pretrained!r} is neither a file nor an open_clip tag of {name}; tags: {listed}")
    return problems


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


def _hub_reachable(timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline(offline: bool):
    """Hub offline mode for one call. Without it a missing network costs about a minute of
    retries before failing; offline mode still serves weights already in the local cache.
    huggingface_hub reads HF_HUB_OFFLINE once at import, so its constant is set too."""
    if not offline:
        yield
        return
    import huggingface_hub.constants as hub

    saved_env, saved_const = os.environ.get("HF_HUB_OFFLINE"), hub.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"], hub.HF_HUB_OFFLINE = "1", True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = saved_const
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env


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


def load_model(name: str, pretrained: Optional[str] = None, *, device: str | torch.device = "cpu") -> LoadedModel:
    """Build an open_clip model by architecture name with weights from a tag, a file, a Hugging
    Face CLIP directory (engine/hf.py: `name` must build its network), or none.

    Raises ConfigError naming the problem: unknown name (with close matches), missing file,
    unknown tag (with the available ones), or tag weights that cannot be fetched.
    """
    import open_clip

    problems = check_model_spec(name, pretrained)
    if problems:
        raise ConfigError(problems)
    if pretrained and Path(pretrained).is_dir():  # a Hugging Face CLIP directory: engine/hf.py
        from .hf import load_hf_clip

        return load_hf_clip(name, pretrained, device=device)
    is_tag = bool(pretrained) and not Path(pretrained).is_file()
    offline = is_tag and (os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") or not _hub_reachable())
    try:
        with _hub_offline(offline), _quiet_random_init(not pretrained):
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained or None, device=device)
    except Exception as exc:  # open_clip and the hub raise many types; name the input instead
        if is_tag:
            raise ConfigError([
                f"pretrained: could not load tag {pretrained!r} of {name} ({type(exc).__name__}: {exc}). "
                "Without network access, download the weights elsewhere and pass the file path."
            ]) from exc
        if pretrained:
            raise ConfigError([f"pretrained: {pretrained!r} is not a checkpoint of {name} ({_brief(exc)})"]) from exc
        raise
    model.eval()
    return LoadedModel(model, preprocess, open_clip.get_tokenizer(name), name, pretrained)
