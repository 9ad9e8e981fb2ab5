"""Hugging Face CLIP directories: read them as open_clip models, write open_clip models as them.

A Hugging Face CLIP directory is what `transformers.CLIPModel.save_pretrained` writes:
`config.json` (model_type "clip") and the weights in `model.safetensors` or
`pytorch_model.bin` (or shards of either with their `*.index.json`). Such a directory passed as
`pretrained` is read into the open_clip ViT CLIP with the same architecture:

- the architecture comes from the config: an open_clip config registered under a name
  (ViT-B-32-quickgelu for OpenAI's B/32, ViT-H-14 for LAION's H/14, tiny-vit, ...) when one
  describes exactly the same network, else a derived config registered as `hf-clip-<hash>`;
- what open_clip's CLIP cannot express (another activation, layer-norm epsilon, tokenizer
  vocabulary or pooling token) is refused with the reason, before any model is built.

The other way, `export_hf` writes an open_clip ViT CLIP as such a directory, with tokenizer and
image-processor files built from what open_clip ships (its BPE vocabulary), so the directory
loads with `CLIPModel.from_pretrained`, `CLIPTextModel.from_pretrained` and
`CLIPTextModelWithProjection.from_pretrained` without the hub.

Stable Diffusion reads its text encoder's `last_hidden_state`, the output of its last layer
after the final layer norm. SD 1.x conditions on all 12 layers of OpenAI's ViT-L/14; SD 2.x on
the penultimate layer of OpenCLIP's ViT-H/14, which diffusers stores as a 23-layer text encoder
(`num_hidden_layers: 23`: the 24th block dropped, the final layer norm kept). `text_layers`
writes such a truncated text tower; `hf_text_encoder` builds one to the measure of a
pipeline's own text-encoder config.

Reading a directory needs only safetensors/torch and transformers' config class; writing one
needs transformers (the `hf` extra). Nothing here is imported by `cliperase.engine` itself.
"""
from __future__ import annotations

import copy
import hashlib
import json
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

from ..errors import ConfigError
from ..lazy import lazy_import
from .registry import LoadedModel, _brief, _quiet_random_init
from .specs import checkpoint_file_problems, model_config, model_names

if TYPE_CHECKING:
    from torch import Tensor, nn

torch = lazy_import("torch")  # reading a directory's config needs none; converting its weights does

__all__ = ["hf_dir_problems", "hf_model_name", "hf_spec_problems", "load_hf_clip", "hf_to_open_clip",
           "open_clip_to_hf", "export_hf", "hf_text_encoder"]

# Weight files in the order transformers prefers them; an index names the shards of a split checkpoint.
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_INSTALL_HINT = "install the hf extra: pip install 'cliperase[hf]' (transformers, diffusers)"
# open_clip's LayerNorm and transformers' CLIP share this default; open_clip configs cannot set another.
_LN_EPS = 1e-5
_VOCAB_SIZE = 49408  # open_clip's tokenizer (the OpenAI BPE vocabulary)
_BOS, _EOS = 49406, 49407
# open_clip configs HF CLIPs are usually exactly one of; tried first so a duplicate name elsewhere
# in the registry (ViT-B-32 vs some alias) never wins.
_PREFERRED = ("ViT-B-32", "ViT-B-32-quickgelu", "ViT-B-16", "ViT-B-16-quickgelu", "ViT-L-14", "ViT-L-14-quickgelu",
              "ViT-L-14-336", "ViT-L-14-336-quickgelu", "ViT-H-14", "ViT-H-14-quickgelu", "ViT-bigG-14",
              "ViT-bigG-14-quickgelu")
# Keys of a registered config that leave a plain ViT CLIP; any other key (a timm or HF tower, custom
# attention, SigLIP's bias, another tokenizer) makes a network an HF CLIPModel is not.
_PLAIN_TOP = {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg"}
_PLAIN_VISION = {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size"}
_PLAIN_TEXT = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}
_DERIVED: Dict[str, Path] = {}  # derived config name -> its JSON file (kept for the registry's rescans)
_DERIVED_DIR: Optional[tempfile.TemporaryDirectory] = None


# ---------------------------------------------------------------------------------------------
# Recognising a directory and inferring its architecture (nothing is built)

def _is_hf_dir(path: Optional[str]) -> bool:
    """True for an existing directory holding `config.json`: one that is meant as a Hugging Face
    model, whether or not it is a CLIP open_clip can express (hf_dir_problems says which)."""
    return bool(path) and Path(path).is_dir() and (Path(path) / "config.json").is_file()


def _weight_file(path: Path) -> Optional[Path]:
    return next((path / f for f in _WEIGHT_FILES if (path / f).is_file()), None)


def _read_json(path: Path) -> Tuple[Optional[dict], Optional[str]]:
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    return (obj, None) if isinstance(obj, dict) else (None, f"expected a JSON object, found {type(obj).__name__}")


def _load_config(path: Path):
    """(transformers' CLIPConfig of the directory, problem): its defaults and legacy keys are the authority."""
    try:
        from transformers import CLIPConfig
    except ImportError:
        return None, f"pretrained: {str(path)!r} is a Hugging Face directory; reading it needs transformers: {_INSTALL_HINT}"
    try:
        return CLIPConfig.from_pretrained(str(path), local_files_only=True), None
    except Exception as exc:  # transformers raises ValueError, TypeError, OSError... for a malformed config
        return None, f"pretrained: {str(path)!r}: config.json is not a readable CLIPConfig ({_brief(exc)})"


def hf_dir_problems(path: str) -> List[str]:
    """Problems with `path` as a Hugging Face CLIP directory, found from its files alone.

    Each names the path and what is wrong: missing, not a directory, no config.json, a config of
    another model type (SigLIP, a text or vision tower alone), no weights, or an architecture
    open_clip's CLIP cannot express (with the reason). Empty when the directory can be read.
    """
    p = Path(path)
    where = f"pretrained: {path!r}"
    if not p.exists():
        return [f"{where} does not exist (expected a checkpoint file or a Hugging Face CLIP directory)"]
    if not p.is_dir():
        return [f"{where} is not a directory"]
    if not (p / "config.json").is_file():
        return [f"{where} is a directory, expected a checkpoint file or a Hugging Face CLIP directory (it has no "
                f"config.json; such a directory holds config.json and {' or '.join(_WEIGHT_FILES[::2])}, as "
                "transformers' CLIPModel.save_pretrained writes them)"]
    raw, err = _read_json(p / "config.json")
    if raw is None:
        return [f"{where}: config.json cannot be read ({err})"]
    if raw.get("model_type") != "clip":
        found = raw.get("model_type") or "none"
        hint = " (a text or vision tower alone: export the whole CLIPModel)" if found.startswith("clip_") else ""
        return [f"{where}: config.json describes model_type {found!r}, expected 'clip' (transformers' CLIPModel){hint}"]
    weights = _weight_file(p)
    if weights is None:
        return [f"{where}: no weights (expected {', '.join(_WEIGHT_FILES)} beside config.json)"]
    problems = _weight_problems(p, weights)
    if problems:
        return problems
    _, problems = _open_clip_config(path)
    return problems


def _weight_problems(path: Path, weights: Path) -> List[str]:
    if not weights.name.endswith(".index.json"):
        return checkpoint_file_problems(str(weights))
    index, err = _read_json(weights)
    if index is None or not isinstance(index.get("weight_map"), dict):
        return [f"pretrained: {str(weights)!r} is not a shard index ({err or 'no weight_map'})"]
    missing = sorted({s for s in index["weight_map"].values() if not (path / s).is_file()})
    if missing:
        return [f"pretrained: {str(path)!r} lacks the shards {', '.join(missing)} named by {weights.name}"]
    return [q for s in sorted(set(index["weight_map"].values())) for q in checkpoint_file_problems(str(path / s))]


def _mlp_ratio(width: int, hidden: int) -> float:
    """A ratio open_clip turns back into exactly `hidden` units (it takes int(width * ratio))."""
    ratio = hidden / width
    return ratio if int(width * ratio) == hidden else (hidden + 0.5) / width


def _open_clip_config(path: str) -> Tuple[Optional[dict], List[str]]:
    """(the open_clip model config of the HF CLIP directory `path`, problems).

    The config has open_clip's keys (embed_dim, quick_gelu, vision_cfg, text_cfg); the problems
    say what open_clip's CLIP cannot express, and the config is None when there are any.
    """
    cfg, problem = _load_config(Path(path))
    if cfg is None:
        return None, [problem]
    v, t, where = cfg.vision_config, cfg.text_config, f"pretrained: {path!r}"
    p = []
    acts = {v.hidden_act, t.hidden_act}
    if not acts <= {"gelu", "quick_gelu"} or len(acts) > 1:
        p.append(f"{where}: activations vision={v.hidden_act!r}, text={t.hidden_act!r}; open_clip's CLIP has one "
                 "activation for both towers, 'gelu' or 'quick_gelu'")
    for tower, c in (("vision", v), ("text", t)):
        if c.layer_norm_eps != _LN_EPS:
            p.append(f"{where}: {tower} layer_norm_eps={c.layer_norm_eps}; open_clip's CLIP uses {_LN_EPS}")
        if c.hidden_size % c.num_attention_heads:
            p.append(f"{where}: {tower} hidden_size {c.hidden_size} is not a multiple of its "
                     f"{c.num_attention_heads} attention heads")
    if v.num_channels != 3:
        p.append(f"{where}: vision num_channels={v.num_channels}; open_clip's ViT reads RGB (3)")
    if v.image_size % v.patch_size:
        p.append(f"{where}: image_size {v.image_size} is not a multiple of patch_size {v.patch_size}")
    if t.vocab_size != _VOCAB_SIZE:
        p.append(f"{where}: text vocab_size={t.vocab_size}; open_clip's tokenizer has {_VOCAB_SIZE} tokens")
    if t.eos_token_id not in (2, t.vocab_size - 1):  # 2: transformers' legacy marker for argmax pooling
        p.append(f"{where}: text pools at eos_token_id={t.eos_token_id}; open_clip pools at the highest token id "
                 f"({t.vocab_size - 1})")
    if p:
        return None, p
    oc = {"embed_dim": cfg.projection_dim,
          "vision_cfg": {"image_size": v.image_size, "layers": v.num_hidden_layers, "width": v.hidden_size,
                         "head_width": v.hidden_size // v.num_attention_heads,
                         "mlp_ratio": _mlp_ratio(v.hidden_size, v.intermediate_size), "patch_size": v.patch_size},
          "text_cfg": {"context_length": t.max_position_embeddings, "vocab_size": t.vocab_size, "width": t.hidden_size,
                       "heads": t.num_attention_heads, "layers": t.num_hidden_layers,
                       "mlp_ratio": _mlp_ratio(t.hidden_size, t.intermediate_size)}}
    if v.hidden_act == "quick_gelu":
        oc["quick_gelu"] = True
    return oc, []


def _signature(cfg: dict) -> Optional[tuple]:
    """The network a plain ViT CLIP config builds, as numbers; None for any other config."""
    v, t = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    if set(cfg) - _PLAIN_TOP or set(v) - _PLAIN_VISION or set(t) - _PLAIN_TEXT:
        return None
    layers, size, patch = v.get("layers", 12), v.get("image_size", 224), v.get("patch_size", 16)
    if not all(isinstance(x, int) for x in (layers, size, patch)):  # ResNet towers, non-square images
        return None
    vw, tw = v.get("width", 768), t.get("width", 512)
    return (cfg["embed_dim"], bool(cfg.get("quick_gelu", False)), size, patch, vw, layers, vw // v.get("head_width", 64),
            int(vw * v.get("mlp_ratio", 4.0)), t.get("context_length", 77), t.get("vocab_size", _VOCAB_SIZE), tw,
            t.get("heads", 8), t.get("layers", 12), int(tw * t.get("mlp_ratio", 4.0)))


def _known() -> List[str]:
    return model_names() + list(_DERIVED)


def _config(name: str) -> dict:
    return json.loads(_DERIVED[name].read_text()) if name in _DERIVED else model_config(name) or {}


def _register(cfg: dict) -> str:
    """The name of a registered open_clip config that builds exactly `cfg`'s network; registers
    `cfg` itself as `hf-clip-<hash>` when none does (then importing open_clip)."""
    global _DERIVED_DIR
    want = _signature(cfg)
    models = _known()
    for name in [m for m in _PREFERRED if m in models] + models:
        if _signature(_config(name)) == want:
            return name
    import open_clip
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]
    name = f"hf-clip-{digest}"
    if name not in _DERIVED:
        # open_clip's registry reads configs from files, and rereads every file on each addition.
        _DERIVED_DIR = _DERIVED_DIR or tempfile.TemporaryDirectory(prefix="cliperase-hf-configs-")
        path = Path(_DERIVED_DIR.name) / f"{name}.json"
        path.write_text(json.dumps(cfg, indent=2))
        open_clip.add_model_config(path)
        _DERIVED[name] = path
    return name


def hf_model_name(path: Optional[str]) -> Optional[str]:
    """The open_clip model name for `pretrained=path`, when `path` is a Hugging Face CLIP
    directory; None for anything else (a tag, a checkpoint file, a missing path).

    A CLI uses it as the default architecture when the user gave `--pretrained DIR` without
    `--model`. Registers a derived config when no registered one matches. Raises ConfigError
    when the directory is one open_clip cannot read (hf_dir_problems).
    """
    if not _is_hf_dir(path):
        return None
    problems = hf_dir_problems(path)
    if problems:
        raise ConfigError(problems)
    cfg, _ = _open_clip_config(path)
    return _register(cfg)


def _resolve(name: Optional[str], path: str) -> Tuple[Optional[str], List[str]]:
    """(the open_clip name to build for `pretrained=path`, problems): `name` itself when it builds
    the directory's network, the inferred name when `name` is empty."""
    problems = hf_dir_problems(path)
    if problems:
        return None, problems
    cfg, _ = _open_clip_config(path)
    inferred = _register(cfg)
    if not name or name == inferred:
        return inferred, []
    if name in _known() and _signature(_config(name)) == _signature(cfg):
        return name, []
    why = "an unknown architecture" if name not in _known() else "another network"
    return None, [f"model: {name!r} disagrees with the Hugging Face directory {path!r}, which holds {inferred} "
                  f"({_describe(cfg)}); {name!r} is {why}. Pass --model {inferred}"]


def hf_spec_problems(name: Optional[str], path: str) -> List[str]:
    """Problems with `(model name, pretrained=path)` for a directory `path`: those of the directory
    (hf_dir_problems), else a `name` that builds another network than the directory holds."""
    return _resolve(name, path)[1]


def _describe(cfg: dict) -> str:
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    act = "QuickGELU" if cfg.get("quick_gelu") else "GELU"
    return (f"ViT width {v['width']}, {v['layers']} layers, patch {v['patch_size']}, {v['image_size']} px; "
            f"text width {t['width']}, {t['layers']} layers; embed {cfg['embed_dim']}; {act}")


# ---------------------------------------------------------------------------------------------
# State dicts: transformers' CLIPModel keys <-> open_clip's CLIP keys

# (open_clip suffix, transformers suffix) inside one transformer block
_BLOCK = (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"),
          ("attn.out_proj", "self_attn.out_proj"))
# (open_clip key, transformers key) outside the blocks; projections are transposed, see below
_FLAT = (("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
         ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
         ("ln_final.weight", "text_model.final_layer_norm.weight"), ("ln_final.bias", "text_model.final_layer_norm.bias"),
         ("visual.class_embedding", "vision_model.embeddings.class_embedding"),
         ("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight"),
         ("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
         ("visual.ln_pre.weight", "vision_model.pre_layrnorm.weight"), ("visual.ln_pre.bias", "vision_model.pre_layrnorm.bias"),
         ("visual.ln_post.weight", "vision_model.post_layernorm.weight"),
         ("visual.ln_post.bias", "vision_model.post_layernorm.bias"), ("logit_scale", "logit_scale"))
_PROJ = (("text_projection", "text_projection.weight"), ("visual.proj", "visual_projection.weight"))
_OC_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
_HF_BLOCK = re.compile(r"^(text_model|vision_model)\.encoder\.layers\.(\d+)\.(.+)$")


def hf_to_open_clip(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """An open_clip CLIP state dict from a transformers CLIPModel one (same tensors, renamed; q, k, v
    concatenated into in_proj; projections transposed). Raises ConfigError naming keys that are
    neither: a checkpoint of another model."""
    flat, proj, block = {h: o for o, h in _FLAT}, {h: o for o, h in _PROJ}, {h: o for o, h in _BLOCK}
    out: Dict[str, Tensor] = {}
    unknown: List[str] = []
    qkv: Dict[Tuple[str, str], Dict[str, Tensor]] = {}
    for key, value in state.items():
        if key.endswith("position_ids"):  # a buffer older transformers saved; rebuilt on load
            continue
        m = _HF_BLOCK.match(key)
        if key in flat:
            out[flat[key]] = value
        elif key in proj:
            out[proj[key]] = value.T.contiguous()
        elif m:
            prefix = ("visual." if m[1] == "vision_model" else "") + f"transformer.resblocks.{m[2]}."
            sub = re.match(r"^self_attn\.([qkv])_proj\.(weight|bias)$", m[3])
            if sub:
                qkv.setdefault((prefix, sub[2]), {})[sub[1]] = value
                continue
            part, _, leaf = m[3].rpartition(".")
            if part not in block:
                unknown.append(key)
                continue
            out[f"{prefix}{block[part]}.{leaf}"] = value
        else:
            unknown.append(key)
    for (prefix, leaf), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            unknown.append(f"{prefix}attn.in_proj_{leaf} (found only {''.join(sorted(parts))} of q, k, v)")
            continue
        out[f"{prefix}attn.in_proj_{leaf}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    if unknown:
        raise ConfigError([f"pretrained: weights are not a transformers CLIPModel's: unexpected keys "
                           f"{', '.join(sorted(unknown)[:8])}{' ...' if len(unknown) > 8 else ''}"])
    if "logit_scale" in out:
        out["logit_scale"] = out["logit_scale"].reshape(())
    return out


def open_clip_to_hf(state: Dict[str, Tensor], *, text_layers: Optional[int] = None) -> Dict[str, Tensor]:
    """A transformers CLIPModel state dict from an open_clip CLIP one (the inverse of
    hf_to_open_clip); with `text_layers`, only the first `text_layers` text blocks are kept.
    Raises ConfigError naming keys of another open_clip architecture (a ResNet or timm tower)."""
    flat, proj, block = dict(_FLAT), dict(_PROJ), dict(_BLOCK)
    out: Dict[str, Tensor] = {}
    unknown: List[str] = []
    for key, value in state.items():
        m = _OC_BLOCK.match(key)
        if key in flat:
            out[flat[key]] = value.reshape(()) if key == "logit_scale" else value
        elif key in proj:
            out[proj[key]] = value.T.contiguous()
        elif m:
            tower = "vision_model" if m[1] else "text_model"
            if tower == "text_model" and text_layers is not None and int(m[2]) >= text_layers:
                continue
            prefix = f"{tower}.encoder.layers.{m[2]}."
            attn = re.match(r"^attn\.in_proj_(weight|bias)$", m[3])
            part, _, leaf = m[3].rpartition(".")
            if attn:
                for name, chunk in zip("qkv", value.chunk(3)):
                    out[f"{prefix}self_attn.{name}_proj.{attn[1]}"] = chunk.contiguous()
            elif part in block:
                out[f"{prefix}{block[part]}.{leaf}"] = value
            else:
                unknown.append(key)
        elif key != "attn_mask":
            unknown.append(key)
    if unknown:
        raise ConfigError([f"model: not a plain ViT CLIP that transformers' CLIPModel can hold: keys "
                           f"{', '.join(sorted(unknown)[:8])}{' ...' if len(unknown) > 8 else ''} have no counterpart"])
    return out


def _load_hf_state_dict(path: Path) -> Dict[str, Tensor]:
    weights = _weight_file(path)
    files = [weights]
    if weights.name.endswith(".index.json"):
        files = [path / s for s in sorted(set(json.loads(weights.read_text())["weight_map"].values()))]
    state: Dict[str, Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            state.update(load_file(str(f)))
        else:
            state.update(torch.load(f, map_location="cpu", weights_only=True))
    return state


def _skip_init():
    """No random initialisation while a model is built whose every weight is loaded next (strict):
    a ViT-bigG spends minutes on CPU drawing numbers it throws away. transformers' context patches
    torch.nn.init; the weights are left uninitialised until load_state_dict fills them."""
    from transformers.initialization import no_init_weights

    return no_init_weights()


def _image_norm(path: Path) -> Dict[str, tuple]:
    """{"mean", "std"} of the directory's image processor, where it has one."""
    pre, _ = _read_json(path / "preprocessor_config.json")
    if pre is None:  # transformers 5 may keep it inside processor_config.json
        pre = (_read_json(path / "processor_config.json")[0] or {}).get("image_processor")
    pre = pre if isinstance(pre, dict) else {}
    return {k: tuple(pre[f"image_{k}"]) for k in ("mean", "std") if isinstance(pre.get(f"image_{k}"), list)}


def load_hf_clip(name: Optional[str], path: str, *, device: str | torch.device = "cpu"):
    """The open_clip CLIP held by the HF CLIP directory `path`, as `models.LoadedModel`, fp32, eval.

    `name` may be None (inferred) or must build the directory's network. Image preprocessing takes
    the directory's mean and std (preprocessor_config.json) when it has them. Raises ConfigError
    for the problems of hf_spec_problems and for weights that do not fit the config.
    """
    import open_clip

    name, problems = _resolve(name, path)
    if problems:
        raise ConfigError(problems)
    norm = _image_norm(Path(path))
    with _quiet_random_init(True), _skip_init():
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, device="cpu", image_mean=norm.get("mean"), image_std=norm.get("std"))
    try:
        model.load_state_dict(hf_to_open_clip(_load_hf_state_dict(Path(path))), strict=True)
    except RuntimeError as exc:  # missing keys or shapes the config did not announce
        raise ConfigError([f"pretrained: the weights in {path!r} do not fit its config.json ({_brief(exc)})"]) from exc
    model.to(device).eval()
    return LoadedModel(model, preprocess, open_clip.get_tokenizer(name), name, path)


# ---------------------------------------------------------------------------------------------
# Export: an open_clip ViT CLIP as a transformers CLIPModel directory

def _activation(model: nn.Module) -> str:
    from open_clip.transformer import QuickGELU

    acts = {type(m) for m in model.modules() if isinstance(m, (torch.nn.GELU, QuickGELU))}
    approx = {m.approximate for m in model.modules() if isinstance(m, torch.nn.GELU)}
    if acts == {QuickGELU}:
        return "quick_gelu"
    if acts == {torch.nn.GELU} and approx == {"none"}:
        return "gelu"
    raise ConfigError([f"model: activations {sorted(a.__name__ for a in acts)} (GELU approximate={sorted(approx)}); "
                       "transformers' CLIP takes one of exact GELU or QuickGELU for both towers"])


def _export_problems(model: nn.Module) -> List[str]:
    """What keeps an open_clip model from being a transformers CLIPModel, beyond its keys."""
    import open_clip
    from open_clip.transformer import VisionTransformer

    if not isinstance(model, open_clip.CLIP) or not isinstance(getattr(model, "visual", None), VisionTransformer):
        return [f"model: a {type(model).__name__} with a {type(getattr(model, 'visual', None)).__name__} image tower; "
                "only open_clip's CLIP with a ViT image tower has a transformers CLIPModel counterpart"]
    vis, p = model.visual, []
    if vis.attn_pool is not None or vis.pool_type != "tok" or vis.final_ln_after_pool:
        p.append("model: the image tower pools otherwise than the class token after ln_post")
    if model.text_pool_type != "argmax" or model.attn_mask is None or model.logit_bias is not None:
        p.append("model: the text tower is not causal with argmax (end-of-text) pooling, or the model has a logit bias")
    if vis.image_size[0] != vis.image_size[1] or vis.patch_size[0] != vis.patch_size[1]:
        p.append(f"model: non-square image {vis.image_size} or patch {vis.patch_size}")
    eps = {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)}
    if eps != {_LN_EPS}:
        p.append(f"model: layer-norm epsilons {sorted(eps)}, expected {_LN_EPS}")
    return p


def _hf_clip_config(model: nn.Module, *, text_layers: Optional[int] = None):
    """transformers' CLIPConfig describing the open_clip ViT CLIP `model` (from its modules, not
    its name); `text_layers` (1..text depth) sets a shorter text tower. Raises ConfigError for a
    model transformers' CLIP cannot hold."""
    try:
        from transformers import CLIPConfig
    except ImportError as exc:
        raise ConfigError([f"--to hf needs transformers: {_INSTALL_HINT}"]) from exc
    problems = _export_problems(model)
    if problems:
        raise ConfigError(problems)
    act, vis = _activation(model), model.visual
    depth = len(model.transformer.resblocks)
    if text_layers is not None and not (isinstance(text_layers, int) and 1 <= text_layers <= depth):
        raise ConfigError([f"text_layers: expected an integer from 1 to the text tower's {depth} layers, got {text_layers!r}"])

    def tower(blocks, width: int) -> dict:
        return {"hidden_size": width, "intermediate_size": blocks[0].mlp.c_fc.out_features, "hidden_act": act,
                "num_hidden_layers": len(blocks), "num_attention_heads": blocks[0].attn.num_heads,
                "layer_norm_eps": _LN_EPS, "projection_dim": model.text_projection.shape[1]}

    text = tower(model.transformer.resblocks, model.token_embedding.embedding_dim)
    text.update(num_hidden_layers=text_layers or depth, max_position_embeddings=model.positional_embedding.shape[0],
                vocab_size=model.token_embedding.num_embeddings, bos_token_id=_BOS, eos_token_id=_EOS, pad_token_id=_EOS)
    vision = tower(vis.transformer.resblocks, vis.conv1.out_channels)
    vision.update(image_size=vis.image_size[0], patch_size=vis.patch_size[0], num_channels=3)
    cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=model.text_projection.shape[1],
                     logit_scale_init_value=float(model.logit_scale.detach().reshape(())))
    cfg.architectures = ["CLIPModel"]
    return cfg


def _write_processor(model: nn.Module, out: Path, context_length: int) -> None:
    """Tokenizer and image-processor files from open_clip's own BPE vocabulary and preprocessing:
    tokenizer.json for transformers' CLIPTokenizer, and vocab.json + merges.txt for readers that
    build the tokenizer from those (older transformers, other tools)."""
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPImageProcessor, CLIPTokenizer

    bpe = SimpleTokenizer()
    # open_clip names the specials <start_of_text>/<end_of_text>; transformers' CLIP <|...|>.
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(tok, tok): i for tok, i in bpe.encoder.items()}
    merges = [pair for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda kv: kv[1])]
    # Padding with <|endoftext|> as OpenAI's tokenizer does: open_clip pads with id 0, but "!" as a
    # pad token would be split out of the text as a special token ("badly!" -> "badly", pad).
    # Pads follow the end-of-text token, so under causal attention they change no pooled embedding.
    CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=context_length).save_pretrained(str(out))
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(p) for p in merges) + "\n")
    pp, size = open_clip.get_model_preprocess_cfg(model), model.visual.image_size[0]
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                       image_mean=list(pp.get("mean", open_clip.OPENAI_DATASET_MEAN)),
                       image_std=list(pp.get("std", open_clip.OPENAI_DATASET_STD))).save_pretrained(str(out))


def export_hf(model: nn.Module, out: Path, *, text_layers: Optional[int] = None) -> Path:
    """Write the open_clip ViT CLIP `model` as a transformers CLIPModel directory `out`:
    config.json, model.safetensors (fp32), tokenizer and image-processor files.

    With `text_layers`, the text tower keeps its first `text_layers` blocks and the final layer
    norm: Stable Diffusion 2.x's text encoder is OpenCLIP ViT-H-14's with 23 of 24 (its
    penultimate layer). The directory's CLIPModel then no longer gives the open_clip text
    embeddings; its CLIPTextModel gives what SD 2.x conditions on. Raises ConfigError for a model
    transformers' CLIP cannot hold.
    """
    from safetensors.torch import save_file

    cfg = _hf_clip_config(model, text_layers=text_layers)
    state = open_clip_to_hf({k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()},
                            text_layers=text_layers)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(str(out))
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_processor(model, out, cfg.text_config.max_position_embeddings)
    return out


def hf_text_encoder(model: nn.Module, like) -> nn.Module:
    """The text tower of the open_clip CLIP `model` as a transformers text encoder shaped like the
    config `like` (a pipeline's `text_encoder.config`): CLIPTextModel, or
    CLIPTextModelWithProjection when `like` is that model's config (it has the projection).

    The number of layers is `like`'s (23 of ViT-H-14's 24 for SD 2.x); everything else must
    match, else ConfigError names what differs. Returned fp32, eval, on the CPU.
    """
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    ours = _hf_clip_config(model, text_layers=min(like.num_hidden_layers, len(model.transformer.resblocks))).text_config
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "max_position_embeddings", "vocab_size",
            "hidden_act", "layer_norm_eps")
    diff = [f"{k} {getattr(ours, k)} vs {getattr(like, k)}" for k in keys if getattr(ours, k) != getattr(like, k)]
    if like.num_hidden_layers > len(model.transformer.resblocks):
        diff.append(f"num_hidden_layers {len(model.transformer.resblocks)} vs {like.num_hidden_layers}")
    with_proj = "CLIPTextModelWithProjection" in (getattr(like, "architectures", None) or [])
    if with_proj and like.projection_dim != model.text_projection.shape[1]:
        diff.append(f"projection_dim {model.text_projection.shape[1]} vs {like.projection_dim}")
    if diff:
        raise ConfigError([f"text encoder: the model's text tower does not fit the pipeline's ({'; '.join(diff)})"])
    state = open_clip_to_hf({k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()},
                            text_layers=like.num_hidden_layers)
    like = copy.deepcopy(like)  # the pipeline's own encoder keeps its config object
    with _skip_init():
        encoder = (CLIPTextModelWithProjection if with_proj else CLIPTextModel)(like)
    if with_proj:
        keep = {k: v for k, v in state.items() if k.startswith("text_model.") or k == "text_projection.weight"}
    else:
        keep = {k[len("text_model."):]: v for k, v in state.items() if k.startswith("text_model.")}
    encoder.load_state_dict(keep, strict=True)
    return encoder.eval()
