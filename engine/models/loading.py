"""Models by open_clip architecture name with weights from a tag, a local checkpoint file, a Hugging
Face CLIP directory (hf.py), or none: checked first (specs.py), then built."""
from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import List, Optional

import torch

from ..errors import ConfigError
from .hf import load_hf_clip
from .registry import LoadedModel, _brief, _quiet_random_init, register_configs
from .check import check_model_spec

__all__ = ["load_model", "load_empty"]


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
    register_configs()  # the engine's own architectures, for open_clip to build
    if pretrained and Path(pretrained).is_dir():  # a Hugging Face CLIP directory
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


@contextlib.contextmanager
def _parameters_on_meta():
    """Every parameter registered meanwhile lives on the meta device (shape and dtype, no storage);
    buffers stay real: the causal attention mask is built in __init__ and is not in checkpoints.
    Each parameter's initial value exists for one statement at most, so a model of any size is
    built in the memory of its largest tensor, and its random init is skipped."""
    import open_clip.factory as factory

    original, place = torch.nn.Module.register_parameter, factory._set_model_device_and_precision

    def register(module, name, param):
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    # create_model ends with model.to(device), which meta parameters refuse; fp32 on the CPU,
    # where the buffers were built, is where it would leave them anyway (open_clip 3.3).
    torch.nn.Module.register_parameter, factory._set_model_device_and_precision = register, lambda *a, **k: None
    try:
        yield
    finally:
        torch.nn.Module.register_parameter, factory._set_model_device_and_precision = original, place


def load_empty(name: str) -> LoadedModel:
    """The open_clip architecture `name` with its parameters on the meta device (to be filled from
    a checkpoint: ZeRO-3 shards, or a consolidated state dict), real buffers, its preprocessing and
    tokenizer. Raises ConfigError for an unknown name."""
    import open_clip

    problems = check_model_spec(name, None)
    if problems:
        raise ConfigError(problems)
    register_configs()
    with _parameters_on_meta(), _quiet_random_init(True):
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None, device="cpu")
    model.eval()
    return LoadedModel(model, preprocess, open_clip.get_tokenizer(name), name, None)
