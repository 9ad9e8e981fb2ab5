"""What a model spec's files say, read without building anything and without importing torch or open_clip.

A refused command line costs what it imports (torch alone ~2.5 s, open_clip with torchvision
and transformers ~8 s on a 2-core machine), so these checks read files instead:
- architecture names from open_clip's own registry files (its `model_configs/*.json`, found
  with `importlib.util.find_spec`, which runs no package code) plus the engine's configs;
- a checkpoint's tensors (names and shapes) from the pickle inside its torch.save archive, read
  by an unpickler that accepts only what a state dict of tensors holds;
- whether those tensors fit the architecture: the shapes a plain open_clip CLIP config implies
  (text and image widths, depths, patch size, embedding width), with the registered
  architecture that does fit named when there is one.
check.py puts these together for a (name, pretrained) spec.
"""
from __future__ import annotations

import ast
import importlib.util
import io
import json
import pickle
import re
import zipfile
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .registry import CONFIG_DIR, _brief

__all__ = ["model_names", "model_config", "pretrained_tags", "checkpoint_file_problems", "checkpoint_shapes",
           "architecture_problems"]

Shapes = Dict[str, Tuple[int, ...]]


@lru_cache(maxsize=1)
def _config_files() -> Dict[str, Path]:
    """{architecture name: its JSON file}: open_clip's registry files, then the engine's own."""
    spec = importlib.util.find_spec("open_clip")
    folders = [Path(p) / "model_configs" for p in (spec.submodule_search_locations or [])] if spec else []
    files = {p.stem: p for folder in folders for p in sorted(folder.glob("*.json"))}
    files.update({p.stem: p for p in sorted(CONFIG_DIR.glob("*.json"))})
    return files


def model_names() -> List[str]:
    """Every architecture name `load_model` accepts (open_clip's and the engine's), sorted as open_clip sorts them."""
    return sorted(_config_files(), key=lambda s: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s.lower())])


def model_config(name: str) -> Optional[dict]:
    path = _config_files().get(name)
    return json.loads(path.read_text()) if path is not None else None


def _call_tags(node) -> Optional[Dict[str, bool]]:
    """{tag: quick_gelu} of a `dict(tag=_pcfg(..., quick_gelu=True), ...)` node of open_clip's table."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args):
        return None
    out = {}
    for kw in node.keywords:
        flags = [k.value for k in getattr(kw.value, "keywords", []) if k.arg == "quick_gelu"]
        out[kw.arg] = bool(flags and isinstance(flags[0], ast.Constant) and flags[0].value)
    return out


@lru_cache(maxsize=1)
def _pretrained_table() -> Optional[Dict[str, List[str]]]:
    """{architecture: its pretrained tags} read from open_clip's `pretrained.py` without running
    it (its imports load torch): the `_PRETRAINED` dict of `dict(tag=_pcfg(...))` entries, plus the
    `-quickgelu` names open_clip derives from the tags marked quick_gelu. None when the file is
    not laid out so (another open_clip version): then open_clip itself is asked.
    tests/test_models.py checks this table against open_clip's own."""
    spec = importlib.util.find_spec("open_clip")
    path = Path(next(iter(spec.submodule_search_locations or []), "")) / "pretrained.py" if spec else None
    if path is None or not path.is_file():
        return None
    named: Dict[str, Dict[str, bool]] = {}
    table: Optional[Dict[str, Dict[str, bool]]] = None
    for node in ast.parse(path.read_text()).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            continue
        target = node.targets[0].id
        if target == "_PRETRAINED" and isinstance(node.value, ast.Dict):
            table = {}
            for k, v in zip(node.value.keys, node.value.values):
                tags = named.get(v.id) if isinstance(v, ast.Name) else _call_tags(v)
                if not isinstance(k, ast.Constant) or tags is None:
                    return None
                table[k.value] = tags
        elif (tags := _call_tags(node.value)) is not None:
            named[target] = tags
    if not table:
        return None
    out = {m: list(tags) for m, tags in table.items()}
    out.update({f"{m}-quickgelu": [t for t, q in tags.items() if q] for m, tags in table.items() if any(tags.values())})
    return out


def pretrained_tags(name: str) -> List[str]:
    """The open_clip pretrained tags of architecture `name` (open_clip's own list)."""
    table = _pretrained_table()
    if table is not None:
        return table.get(name, [])
    import open_clip  # a layout this reader does not know: ask open_clip itself

    return open_clip.list_pretrained_tags_by_model(name)


class _Tensor:
    """What the unpickler makes of a tensor: its shape."""

    def __init__(self, shape: Tuple[int, ...]):
        self.shape = shape


def _rebuild_tensor(storage, offset, size, *rest) -> _Tensor:
    return _Tensor(tuple(int(s) for s in size))


class _StateDictUnpickler(pickle.Unpickler):
    """A torch.save pickle read as far as names and shapes: dicts, tensors and their storages,
    nothing else (any other class is refused, so reading runs no code of the file's choosing)."""

    _TENSORS = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor, ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor,
                ("torch._utils", "_rebuild_parameter"): lambda t, *_: t, ("collections", "OrderedDict"): OrderedDict}

    def find_class(self, module: str, name: str):
        if (module, name) in self._TENSORS:
            return self._TENSORS[(module, name)]
        if module == "torch" and (name.endswith("Storage") or name in ("Size", "device", "dtype")) or \
                module == "torch.storage" and name == "UntypedStorage":
            return lambda *args: None
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a state dict of tensors")

    def persistent_load(self, pid):
        return None  # a storage: its bytes are never read


def _unpickled(path: str):
    """The object a torch.save zip archive holds, tensors as shapes (raises for a damaged file)."""
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n == "data.pkl" or n.endswith("/data.pkl"))
        return _StateDictUnpickler(io.BytesIO(z.read(name))).load()


def _state(obj):
    """The state dict inside a checkpoint object ({"state_dict": ...} unwrapped), or None."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    return obj if isinstance(obj, dict) else None


def checkpoint_file_problems(path: str) -> List[str]:
    """Problems with a local checkpoint file that its container shows: empty, not a torch.save
    archive (garbage, a download cut short), no tensors in it. Only the archive's pickle is read
    (tensor data never), so a multi-GB checkpoint costs milliseconds."""
    p = Path(path)
    if p.stat().st_size == 0:
        return [f"pretrained: checkpoint file {path!r} is empty (0 bytes)"]
    if p.suffix in (".npz", ".npy"):  # big_vision weights: open_clip converts them while loading
        return []
    if p.suffix == ".safetensors":
        return _safetensors_problems(path)
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
        obj = _unpickled(path)
    except Exception as exc:  # zipfile, pickle and StopIteration (no data.pkl) for a damaged archive
        return [f"pretrained: {path!r} cannot be read as a PyTorch checkpoint ({_brief(exc)})"]
    state = _state(obj)
    if state is None or not any(isinstance(v, _Tensor) for v in state.values()):
        found = "an empty dict" if obj == {} else f"a {type(obj).__name__}"
        return [f"pretrained: {path!r} holds no state dict of tensors (found {found})"]
    return []


def _safetensors_problems(path: str) -> List[str]:
    """A safetensors file's header: 8 bytes of length, then JSON naming each tensor's dtype and shape."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size)) if 0 < size < (1 << 30) else None
    except (OSError, ValueError) as exc:
        return [f"pretrained: {path!r} is not a readable safetensors file ({_brief(exc)})"]
    if not isinstance(header, dict):
        return [f"pretrained: {path!r} is not a readable safetensors file (no JSON header)"]
    return [] if any(k != "__metadata__" for k in header) else [f"pretrained: {path!r} holds no tensors"]


def checkpoint_shapes(path: str) -> Optional[Shapes]:
    """{name: shape} of a torch.save checkpoint's state dict ("module." prefixes dropped, as
    open_clip does), or None for a format these checks do not read (TorchScript, legacy, npz)."""
    if not zipfile.is_zipfile(path):
        return None
    try:
        state = _state(_unpickled(path))
    except Exception:
        return None
    if state is None:
        return None
    shapes = {k: v.shape for k, v in state.items() if isinstance(v, _Tensor)}
    if shapes and all(k.startswith("module.") for k in shapes):
        shapes = {k[len("module."):]: v for k, v in shapes.items()}
    return shapes


def _expected(cfg: dict) -> Optional[Shapes]:
    """The shapes (and block counts, as `#blocks <prefix>`) a plain open_clip CLIP config implies;
    None for a config with another tower (timm, Hugging Face, CoCa...): those are checked when built."""
    v, t = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    if set(cfg) - {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg"} or any(
            k.startswith(("timm", "hf_")) for k in (*v, *t)):
        return None
    embed, tw, vw = cfg["embed_dim"], t.get("width", 512), v.get("width", 768)
    out: Shapes = {"token_embedding.weight": (t.get("vocab_size", 49408), tw),
                   "positional_embedding": (t.get("context_length", 77), tw), "text_projection": (tw, embed),
                   "#blocks transformer.resblocks": (t.get("layers", 12),)}
    layers = v.get("layers", 12)
    if isinstance(layers, (list, tuple)):  # a ModifiedResNet image tower
        out["visual.attnpool.c_proj.weight"] = (embed, vw * 32)
        out.update({f"#blocks visual.layer{i + 1}": (n,) for i, n in enumerate(layers)})
    else:
        patch = v.get("patch_size", 16)
        out.update({"visual.conv1.weight": (vw, 3, patch, patch), "visual.proj": (vw, embed),
                    "#blocks visual.transformer.resblocks": (layers,)})
    return out


def _found(shapes: Shapes, expected: Shapes) -> Shapes:
    """`shapes` in the terms of `expected`: the same tensors, and the block counts."""
    out: Shapes = {}
    for key in expected:
        if key.startswith("#blocks "):
            prefix = re.escape(key[len("#blocks "):])
            ids = {int(m.group(1)) for k in shapes if (m := re.match(prefix + r"\.(\d+)\.", k))}
            out[key] = (max(ids) + 1 if ids else 0,)
        elif key in shapes:
            out[key] = shapes[key]
    return out


def _fitting(shapes: Shapes) -> List[str]:
    """The registered architectures whose implied shapes the checkpoint has exactly."""
    fits = []
    for name in model_names():
        expected = _expected(model_config(name) or {})
        if expected is not None and _found(shapes, expected) == expected:
            fits.append(name)
    return fits


def architecture_problems(name: str, path: str) -> List[str]:
    """Whether the tensors of checkpoint `path` fit architecture `name`, from the shapes its
    config implies (open_clip resizes the image position embedding itself, so that one is not
    compared). Empty when they fit or when either side is not one these checks read."""
    expected, shapes = _expected(model_config(name) or {}), checkpoint_shapes(path)
    if expected is None or not shapes:
        return []
    found = _found(shapes, expected)
    wrong = [k for k in expected if found.get(k) != expected[k]]
    if not wrong:
        return []
    show = lambda key, shape: f"{key[len('#blocks '):]}: {shape[0]} blocks" if key.startswith("#") else \
        f"{key} {shape}"  # noqa: E731
    diffs = "; ".join(f"{show(k, found[k]) if k in found else k + ' missing'} (needs {show(k, expected[k])})"
                      for k in wrong[:3])
    fits = [n for n in _fitting(shapes) if n != name]
    hint = f"; it fits {', '.join(fits[:5])}: pass --model {fits[0]}" if fits else ""
    return [f"pretrained: {path!r} is not a checkpoint of {name}: {diffs}{hint}"]
