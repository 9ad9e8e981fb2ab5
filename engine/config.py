"""The typed run configuration: one frozen dataclass of plain values, and the methods' options.

Pure data: building a config reads no file. `preflight.problems(cfg)` says everything that is
wrong with one (values, files, shards, models), before anything is built.

A method's own settings (CLIPErase's lambdas, NegGrad+'s beta, the subgroup stages...) live in
its options dataclass (`engine/methods/<family>.py`), reached through `cfg.options`; as keys
they sit beside the run's fields (`--set beta=0.5`, a `--config` file, `to_dict()`), so a run
is still one flat JSON object.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import methods
from .checks import did_you_mean
from .errors import ConfigError

__all__ = ["UnlearnConfig", "method_names", "RUN_MARKERS", "DATA_KEYS", "config_overrides", "trajectory_fields", "keys_for",
           "all_keys"]

LOSS_IMPLS = ("ref", "chunked", "triton")
SCHEDULES = ("constant", "cosine")
PRECISIONS = ("fp32", "bf16", "fp16")
TEACHERS = ("cache", "live")
TEACHER_CACHE_PRECISIONS = ("fp16", "bf16", "fp32")  # engine/teacher_cache.py's CACHE_PRECISIONS
EXPORT_PRECISIONS = ("fp32", "bf16")
# Files whose presence marks a directory as holding a run (started or finished).
RUN_MARKERS = ("run.json", "report.json")
# The keys that say what to unlearn: a command line that gives none of them runs the embedded demo.
DATA_KEYS = ("model", "pretrained", "forget_data", "retain_data", "eval_data", "forget_classes")


def method_names() -> Tuple[str, ...]:
    """The registered methods (engine/methods/), in registration order."""
    return tuple(methods.METHODS)


@dataclass(frozen=True)
class UnlearnConfig:
    # --- what to unlearn
    model: str = "tiny-clip"  # open_clip architecture name (ViT-B-32, ViT-H-14, ...) or an engine config
    pretrained: Optional[str] = None  # open_clip tag (laion2b_s32b_b79k) or a local checkpoint path
    forget_data: Optional[str] = None  # image-caption shards to forget (dir, brace pattern, file; '::' joins)
    retain_data: Optional[str] = None  # image-caption shards to keep
    eval_data: Optional[str] = None  # CLIP_benchmark-layout set for before/after evaluation
    forget_classes: Tuple[str, ...] = ()  # class names of eval_data that count as forgotten
    # Never-seen image-caption shards like forget_data: report.json's membership audit (before/after)
    # tests forget pairs against them (first half; the rest calibrates the stronger attack). None: no audit.
    audit_data: Optional[str] = None
    # Only the forget_classes images whose {key}.json attributes match count as forgotten (a subgroup):
    # "colour=red", "colour=red|blue;background=white" (every key must match, any of its values); "" = all.
    forget_attributes: str = ""
    method: str = "cliperase"  # one of method_names()
    # The method's own options (a dataclass of engine/methods/); None: the method's defaults.
    options: Any = None
    # --- optimisation (METHOD.md paper defaults: Adam, lr 1e-6, batch 16 + 16)
    steps: int = 100  # optimizer steps
    batch_size: int = 16  # pairs per batch, each of forget and retain
    lr: float = 1e-6  # peak learning rate
    weight_decay: float = 0.0  # Adam(W) decoupled weight decay
    warmup_steps: int = 0  # linear warmup before the schedule
    schedule: str = "constant"  # after warmup: "constant" or "cosine" decay to 0
    seed: int = 0  # data order and any randomness
    resampled: bool = False  # streams draw shards with replacement (no epochs) instead of epoch after epoch
    # How ranks x data workers divide a stream: "shard" (each reads only its shards: for big corpora),
    # "sample" (each reads every shard, decodes its samples: any shard count), "auto" (shard at >= 4 shards a reader)
    data_split: str = "auto"
    # Data-loader worker processes per rank and stream (0: decode in the rank's own process). Each
    # costs the memory of a process that imported torch (~0.4 GB): on a CPU-only box at full model
    # size, 0 leaves that to the model; a GPU run wants enough to keep the device fed.
    data_workers: int = 1
    # --- every method's losses
    # Contrastive losses (retain and forget InfoNCE, and the consistency KL on the same support):
    # an off-diagonal pair whose captions are identical ("a circle" twice) is not a negative.
    mask_duplicate_captions: bool = False
    train_logit_scale: bool = False  # train the temperature (default: the original's, frozen)
    loss_impl: Optional[str] = None  # loss backend: "ref", "chunked", "triton"; default by device
    teacher: str = "cache"  # the original's embeddings: "cache" (computed once, stored with the run) or "live"
    # the cache's stored rows: "fp16" (element error <= 2^-11 relative), "bf16" (<= 2^-8) or "fp32" (exact)
    teacher_cache_precision: str = "fp16"
    # --- run
    output_dir: str = "runs/unlearn"  # report.json, the unlearned checkpoint, logs
    overwrite: bool = False  # allow output_dir to hold an earlier run
    log_every: int = 10  # steps between logged losses (the only host syncs in the loop)
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda", "cuda:1", ...
    eval_batch_size: int = 256  # images per evaluation batch
    eval_every: int = 0  # zero-shot evaluation every N steps for accuracy curves (0: before and after only)
    save_every: int = 100  # training checkpoint every N steps (0: none), plus one at the end and on SIGTERM/SIGINT
    keep_checkpoints: int = 2  # complete checkpoints kept in output_dir/checkpoints (older ones deleted)
    export_precision: str = "fp32"  # dtype of the exported model.pt: "fp32" or "bf16" (half the bytes)
    resume: Optional[str] = None  # "latest" (newest verified checkpoint in output_dir; none yet: start) or a checkpoint dir
    # --- scale (DeepSpeed; engine/dist/ds_config.py builds its config from these fields)
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0-3; >0 runs through deepspeed.initialize even on 1 process
    precision: str = "fp32"  # training precision: "fp32", "bf16" or "fp16" (not fp32: through DeepSpeed)
    grad_checkpointing: bool = False  # recompute tower activations in backward (open_clip set_grad_checkpointing)
    accum_steps: int = 1  # micro-batches accumulated per optimizer step (global batch = batch_size * world * accum)
    grad_clip: float = 0.0  # clip the global gradient norm to this value; 0 = off
    deepspeed_config: Optional[str] = None  # JSON file merged into the built DeepSpeed config; conflicts are errors

    def __post_init__(self):
        # The method's defaults when no options were given (an unknown method keeps None; preflight says so).
        if self.options is None and isinstance(self.method, str) and self.method in methods.METHODS:
            object.__setattr__(self, "options", methods.METHODS[self.method].Options())

    def to_dict(self) -> dict:
        """Flat JSON-able dict: the run's fields, the method's options beside them."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "options"}
        d["forget_classes"] = list(self.forget_classes)
        if isinstance(self.options, _Unchecked):
            d.update(self.options.keys)
        elif dataclasses.is_dataclass(self.options):
            d.update(asdict(self.options))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "UnlearnConfig":
        """The config of a flat dict (`to_dict`'s shape): run fields, and the method's options by key.

        Raises ConfigError naming each key that is neither (with the closest key when there is
        one), and each option key of another method than `d["method"]`.
        """
        d = dict(d)
        if isinstance(d.get("forget_classes"), str):  # tuple() would split it into letters
            d["forget_classes"] = [c.strip() for c in d["forget_classes"].split(",") if c.strip()]
        if "forget_classes" in d and isinstance(d["forget_classes"], (list, tuple)):
            d["forget_classes"] = tuple(d["forget_classes"])
        own = {f.name for f in fields(cls)} - {"options"}
        run = {k: v for k, v in d.items() if k in own}
        rest = {k: v for k, v in d.items() if k not in own}
        method = run.get("method", cls.method)
        known = isinstance(method, str) and method in methods.METHODS
        options_type = methods.METHODS[method].Options if known else None
        taken = _field_names(options_type) if known else set(all_keys())
        problems = [_key_problem(k, method, options_type) for k in rest if k not in taken]
        if problems:
            raise ConfigError(problems)
        if not known:  # preflight names the method, and checks these keys as their own methods would
            return cls(**run, options=_Unchecked(rest) if rest else None)
        return cls(**run, options=options_type(**rest))

    def replace(self, **changes) -> "UnlearnConfig":
        """A copy with `changes` applied, run fields and option keys alike (validated as from_dict)."""
        return UnlearnConfig.from_dict({**self.to_dict(), **changes})


@dataclass(frozen=True)
class _Unchecked:
    """The option keys given with an unknown method: checked by their own methods' rules, never used."""

    keys: Dict[str, Any] = field(default_factory=dict)


def _field_names(cls) -> set:
    return {f.name for f in fields(cls)}


def all_keys() -> List[str]:
    """Every key a config dict may hold: run fields and every method's option keys."""
    keys = {f.name for f in fields(UnlearnConfig)} - {"options"}
    for m in methods.METHODS.values():
        keys |= _field_names(m.Options)
    return sorted(keys)


def keys_for(method: str, d: dict) -> dict:
    """`d` without the option keys that only other methods take: for a dict shared by several
    methods' runs (a comparison, the demo's defaults). Unknown keys are kept, for from_dict to name."""
    own = _field_names(methods.METHODS[method].Options) if method in methods.METHODS else set()
    foreign = {k for m in methods.METHODS.values() for k in _field_names(m.Options)} - own
    return {k: v for k, v in d.items() if k not in foreign}


def _key_problem(key: str, method, options_type) -> str:
    owners = [name for name, m in methods.METHODS.items() if key in _field_names(m.Options)]
    if owners and options_type is not None:
        return (f"{key}: an option of method {', '.join(owners)}, not of {method!r} (it would change nothing); "
                f"{method!r} takes {sorted(_field_names(options_type)) or 'no options'}")
    return f"{key}: unknown config field" + did_you_mean(key, all_keys())


# Fields a resumed run may change: they do not alter the trajectory (where files go, how often
# to log or checkpoint). Every other field must equal the checkpoint's.
RESUMABLE_CHANGES = ("resume", "overwrite", "output_dir", "log_every", "save_every", "keep_checkpoints", "eval_batch_size",
                     "audit_data")


def trajectory_fields(cfg: UnlearnConfig) -> dict:
    """The config keys that determine the run's trajectory (all but RESUMABLE_CHANGES)."""
    return {k: v for k, v in cfg.to_dict().items() if k not in RESUMABLE_CHANGES}


def config_overrides(config_file: Optional[str], set_items: Sequence[str]) -> dict:
    """Config keys from a JSON file, then `KEY=VALUE` items, the later winning. VALUE is parsed
    as JSON when it parses, else taken as a plain string, except that a value which starts like
    JSON (a quote, bracket or brace) must parse: `"colour=red` with its closing quote lost is an
    error, not the string with a quote in it. Raises ConfigError naming the item that is
    malformed or names no key (with the closest key)."""
    given: dict = {}
    if config_file:
        try:
            loaded = json.loads(Path(config_file).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError([f"config: cannot read {config_file!r} as JSON ({exc})"]) from exc
        if not isinstance(loaded, dict):
            raise ConfigError([f"config: {config_file!r} must hold a JSON object of UnlearnConfig fields, "
                               f"got {type(loaded).__name__}"])
        given.update(loaded)
    known = all_keys()
    for item in set_items:
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            hint = did_you_mean(key, known) if sep else ""
            raise ConfigError([f"--set {item!r}: expected FIELD=VALUE with FIELD one of the config keys{hint} "
                               f"Keys: {', '.join(known)}"])
        try:
            given[key] = json.loads(value)
        except json.JSONDecodeError as exc:
            if value.lstrip()[:1] in ('"', "[", "{"):
                raise ConfigError([f"--set {item!r}: {value!r} starts like JSON but does not parse ({exc.msg}); "
                                   f"write a string as {key}=text or {key}='\"text\"', a list as {key}='[...]'"]) from exc
            given[key] = value
    return given


