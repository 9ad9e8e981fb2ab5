"""ZeRO-3 models that no rank ever holds whole: built partitioned, consolidated on rank 0 only.

Construction: the architecture is built with its parameters on the meta device (no storage, no
random init: models.load_empty); the checkpoint file is memory-mapped, and parameter by parameter
the value is copied out in the run's dtype and handed to DeepSpeed's zero.Init, which keeps this
rank's 1/world slice and frees the rest. A rank's resident memory is its slices plus one full
parameter (the largest) in flight; the mapped file's pages are the page cache's, shared by all
ranks and dropped when the mapping is. The student is built so in the run's precision, and the
frozen original (teacher-cache pass, "before" evaluation, a live teacher) the same way as an
inference engine, then closed when only its embeddings are needed.

Consolidation: every rank takes part in gathering each parameter's fp32 value, rank 0 keeps it,
and the others drop it at once; the Adam moments go first (training is over), so rank 0 holds
its shards plus one full fp32 copy, the one model.pt is written from.
"""
from __future__ import annotations

import logging
import zipfile
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..models import LoadedModel, Towers, load_empty

__all__ = ["can_build_partitioned", "load_partitioned", "ShardedOriginal", "sharded_engine", "gather_full_state",
           "release_optimizer_state", "assemble", "trim_heap"]

log = logging.getLogger("cliperase")


def can_build_partitioned(pretrained: Optional[str]) -> bool:
    """A torch.save archive on disk (memory-mappable): tags, Hugging Face directories, legacy
    pickles, TorchScript and .npz/.safetensors files take the full load instead."""
    if not pretrained or not Path(pretrained).is_file() or not zipfile.is_zipfile(pretrained):
        return False
    with zipfile.ZipFile(pretrained) as z:
        return not any(n.endswith("/constants.pkl") for n in z.namelist())


def _mapped_state(path: str) -> Dict[str, Tensor]:
    """The checkpoint's state dict, memory-mapped (nothing read yet), in open_clip's key layout
    (a {"state_dict": ...} wrapper and DataParallel's "module." prefix removed, as open_clip does)."""
    obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if next(iter(state), "").startswith("module."):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _check_keys(model: nn.Module, state: Dict[str, Tensor], name: str, path: str) -> None:
    want = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    wrong = sorted(k for k in set(want) & set(state) if tuple(state[k].shape) != want[k])
    if missing or unexpected or wrong:
        raise ConfigError([f"pretrained: {path!r} is not a checkpoint of {name} (missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}, other shapes {wrong[:5]})"])


def load_partitioned(name: str, path: str, ds_config: dict, *, dtype: torch.dtype, train_logit_scale: bool) -> LoadedModel:
    """open_clip's `name` with the weights of checkpoint `path`, ZeRO-3 partitioned in `dtype`
    across the process group (collective: every rank calls it). The 0-dim logit_scale, which
    DeepSpeed cannot partition (PITFALLS 1), becomes a 1-element parameter when trained, else a
    buffer. Buffers are the checkpoint's where it has them (unpartitioned, as ZeRO keeps them)."""
    import deepspeed

    loaded = load_empty(name)
    model = loaded.model
    state = _mapped_state(path)
    _check_keys(model, state, name, path)
    init = deepspeed.zero.Init(config_dict_or_path=ds_config, dtype=dtype)
    for prefix, module in model.named_modules():
        key = lambda local: f"{prefix}.{local}" if prefix else local  # noqa: E731
        for pname, param in list(module.named_parameters(recurse=False)):
            value = state[key(pname)]
            if param.dim() == 0:  # logit_scale
                del module._parameters[pname]
                if not train_logit_scale:
                    module.register_buffer(pname, value.float().clone())
                    continue
                value = value.reshape(1)
            full = nn.Parameter(value.to(dtype, copy=True), requires_grad=param.requires_grad)
            module._parameters[pname] = full
            init._convert_to_zero_parameters([full])  # broadcast from rank 0, keep this rank's slice, free the rest
        for bname, buf in module.named_buffers(recurse=False):
            if key(bname) in state:
                buf.copy_(state[key(bname)])
    del state  # the mapping goes: the file's pages are the page cache's again
    trim_heap()  # the per-parameter copies
    return loaded


def sharded_engine(clip: nn.Module, ds_config: dict, dtype: torch.dtype):
    """A ZeRO-3 inference engine (no optimizer) around a frozen CLIP: parameters sharded across
    ranks, gathered module by module in its forward, computing in `dtype`. Collective."""
    import deepspeed

    clip.requires_grad_(False).eval()
    towers = Towers(clip, zero3=True, input_dtype=dtype)
    config = {k: v for k, v in ds_config.items() if k not in ("gradient_clipping", "zero_allow_untested_optimizer")}
    engine, *_ = deepspeed.initialize(model=towers, config=config)
    engine.eval()
    return engine


class ShardedOriginal(nn.Module):
    """The frozen original model as a ZeRO-3 inference engine, with the CLIP methods the
    evaluation and the teacher-cache pass call: `encode_image`, `encode_text` (each a forward of
    the whole engine, so the CLIP's top-level parameters are gathered too: PITFALLS 2), and
    `state_dict` of the CLIP itself (the teacher's fingerprint gathers it tensor by tensor).
    Every call is collective: all ranks make the same calls in the same order."""

    def __init__(self, engine):
        super().__init__()
        self.engine = engine
        self.input_dtype = engine.module.input_dtype

    def encode_image(self, images: Tensor, normalize: bool = False) -> Tensor:
        out = self.engine(images, None)[0]
        return F.normalize(out, dim=-1) if normalize else out

    def encode_text(self, texts: Tensor, normalize: bool = False) -> Tensor:
        out = self.engine(None, texts)[1]
        return F.normalize(out, dim=-1) if normalize else out

    def encode(self, images: Tensor, texts: Tensor) -> Tuple[Tensor, Tensor]:
        img, txt, _ = self.engine(images, texts)
        return img, txt

    def state_dict(self, *args, **kwargs):
        return self.engine.module.clip.state_dict(*args, **kwargs)

    def idle(self) -> Callable[[], None]:
        """One forward on a dummy 1-sample batch: what a rank without work of its own runs while
        its peers still embed theirs (a ZeRO-3 forward is collective)."""
        clip = self.engine.module.clip
        size = clip.visual.image_size
        size = size if isinstance(size, (tuple, list)) else (size, size)
        context = clip.attn_mask.shape[0] if getattr(clip, "attn_mask", None) is not None else 77
        return lambda: self.encode(torch.zeros(1, 3, *size), torch.zeros(1, context, dtype=torch.int64))

    def close(self) -> None:
        """Give the shards back. Dropping the engine is not enough: DeepSpeed's module hooks keep
        it, and so every parameter, reachable after destroy() (measured: a ViT-B-32 original's
        fp32 shards stayed resident), so each shard's storage is released here explicitly."""
        clip = self.engine.module.clip
        self.engine.destroy()
        self.engine = None
        with torch.no_grad():
            for param in clip.parameters():
                param.data = torch.empty(0, dtype=param.dtype)
                if getattr(param, "ds_tensor", None) is not None:
                    param.ds_tensor.data = torch.empty(0, dtype=param.ds_tensor.dtype)
        trim_heap()


def trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim; elsewhere nothing). glibc keeps
    freed blocks for reuse, so without it a phase's transients (one full parameter at a time
    while loading, a closed original's shards) stay in the process's RSS: measured on a
    ViT-B-32, 480 MiB of a closed fp32 original's 580 stayed resident until trimmed."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc
        pass


def release_optimizer_state(engine) -> None:
    """Training is over: drop the Adam moments (the last checkpoint holds them), keeping the fp32
    master weights consolidation reads. Frees 8 bytes/param/world per rank before rank 0 takes
    a full fp32 copy."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    inner.state.clear()
    trim_heap()


def gather_full_state(clip: nn.Module, *, keep: bool) -> Dict[str, Tensor]:
    """Each parameter's full fp32 value (the optimizer's master copy where DeepSpeed keeps one,
    else the gathered parameter), collected parameter by parameter. Collective: every rank calls
    it; only ranks with `keep` hold the result (the others drop each value at once)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    state = {}
    for name, param in clip.named_parameters():
        full = safe_get_full_fp32_param(param) if param.requires_grad else None
        if full is None:
            with deepspeed.zero.GatheredParameters([param], enabled=hasattr(param, "ds_id")):
                full = param.detach().clone() if keep else None
        if keep:
            state[name] = full.detach().float().cpu()
        del full
    return state


def assemble(name: str, state: Dict[str, Tensor]) -> nn.Module:
    """The plain fp32 open_clip model `name` holding `state`'s tensors (no copy, no random init),
    each reshaped to the architecture's own shape (a 1-element logit_scale back to 0-dim). Buffers
    outside the state dict (the causal mask) are built by the architecture itself."""
    model = load_empty(name).model
    own = model.state_dict(keep_vars=True)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise RuntimeError(f"consolidation: the state of {name} lacks {missing[:5]}, has unexpected {unexpected[:5]}")
    model.load_state_dict({k: v.reshape(own[k].shape) for k, v in state.items()}, assign=True)
    return model
