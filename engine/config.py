"""The typed run configuration: one frozen dataclass, validated as a whole before anything is built."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from .errors import ConfigError

__all__ = ["UnlearnConfig", "METHOD_NAMES", "RUN_MARKERS"]

# Kept here (not imported from methods) so validating a config never imports torch models.
METHOD_NAMES = ("cliperase", "ft", "ga", "graddiff", "neggrad+", "kl", "multidelete")  # engine/methods.py defines each
FORGET_MODES = ("cosine", "dot", "hinge")
LOSS_IMPLS = ("ref", "chunked", "triton")
SCHEDULES = ("constant", "cosine")
PRECISIONS = ("fp32", "bf16", "fp16")
# Files whose presence marks a directory as holding a run (started or finished).
RUN_MARKERS = ("run.json", "report.json")


@dataclass(frozen=True)
class UnlearnConfig:
    # --- what to unlearn
    model: str = "tiny-clip"  # open_clip architecture name (ViT-B-32, ViT-H-14, ...) or an engine config
    pretrained: Optional[str] = None  # open_clip tag (laion2b_s32b_b79k) or a local checkpoint path
    forget_data: Optional[str] = None  # image-caption shards to forget (dir, brace pattern, file; '::' joins)
    retain_data: Optional[str] = None  # image-caption shards to keep
    eval_data: Optional[str] = None  # CLIP_benchmark-layout set for before/after evaluation
    forget_classes: Tuple[str, ...] = ()  # class names of eval_data that count as forgotten
    method: str = "cliperase"  # one of METHOD_NAMES
    # --- optimisation (METHOD.md paper defaults: Adam, lr 1e-6, batch 16 + 16)
    steps: int = 100  # optimizer steps
    batch_size: int = 16  # pairs per batch, each of forget and retain
    lr: float = 1e-6  # peak learning rate
    weight_decay: float = 0.0  # Adam(W) decoupled weight decay
    warmup_steps: int = 0  # linear warmup before the schedule
    schedule: str = "constant"  # after warmup: "constant" or "cosine" decay to 0
    seed: int = 0  # data order and any randomness
    # --- CLIPErase objective (METHOD.md)
    lambda_r: float = 1.0  # retention module weight (retain InfoNCE)
    lambda_f: float = 3.0  # forgetting module weight (forget-pair similarity)
    lambda_c: float = 3.0  # consistency module weight (KL to the original model)
    forget_mode: str = "cosine"  # forgetting module: "cosine", "dot" (raw features) or "hinge"
    forget_margin: float = 0.0  # hinge margin: pairs below it feel no push
    mask_duplicate_captions: bool = False  # retain InfoNCE: identical captions are not negatives
    train_logit_scale: bool = False  # train the temperature (default: the original's, frozen)
    beta: float = 0.9  # NegGrad+: beta * retain loss - (1 - beta) * forget loss
    loss_impl: Optional[str] = None  # loss backend: "ref", "chunked", "triton"; default by device
    # --- run
    output_dir: str = "runs/unlearn"  # report.json, the unlearned checkpoint, logs
    overwrite: bool = False  # allow output_dir to hold an earlier run
    log_every: int = 10  # steps between logged losses (the only host syncs in the loop)
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda", "cuda:1", ...
    eval_batch_size: int = 256  # images per evaluation batch
    eval_every: int = 0  # zero-shot evaluation every N steps for accuracy curves (0: before and after only)
    # --- scale (DeepSpeed; engine/ds_config.py builds its config from these fields)
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0-3; >0 runs through deepspeed.initialize even on 1 process
    precision: str = "fp32"  # training precision: "fp32", "bf16" or "fp16" (not fp32: through DeepSpeed)
    grad_checkpointing: bool = False  # recompute tower activations in backward (open_clip set_grad_checkpointing)
    accum_steps: int = 1  # micro-batches accumulated per optimizer step (global batch = batch_size * world * accum)
    grad_clip: float = 0.0  # clip the global gradient norm to this value; 0 = off
    deepspeed_config: Optional[str] = None  # JSON file merged into the built DeepSpeed config; conflicts are errors

    def to_dict(self) -> dict:
        d = asdict(self)
        d["forget_classes"] = list(self.forget_classes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "UnlearnConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError([f"{k}: unknown config field" for k in unknown])
        d = dict(d)
        if "forget_classes" in d:
            d["forget_classes"] = tuple(d["forget_classes"])
        return cls(**d)

    def problems(self) -> List[str]:
        """Every problem with this config, each naming the field; empty when valid.

        Reads only metadata (file existence, class names), never builds a model.
        """
        from .data import eval_set_problems, shard_problems
        from .models import check_model_spec

        p: List[str] = []
        if self.method not in METHOD_NAMES:
            p.append(f"method: unknown method {self.method!r}; available: {', '.join(METHOD_NAMES)}")
        for name in ("steps", "batch_size", "log_every", "eval_batch_size", "accum_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                p.append(f"{name}: expected a positive integer, got {v!r}")
        if not _finite(self.lr) or self.lr <= 0:
            p.append(f"lr: expected a positive number, got {self.lr!r}")
        for name in ("weight_decay", "lambda_r", "lambda_f", "lambda_c"):
            v = getattr(self, name)
            if not _finite(v) or v < 0:
                p.append(f"{name}: expected a non-negative number, got {v!r}")
        if not isinstance(self.eval_every, int) or isinstance(self.eval_every, bool) or self.eval_every < 0:
            p.append(f"eval_every: expected a non-negative integer, got {self.eval_every!r}")
        elif self.eval_every and (self.zero_stage > 0 or self.precision != "fp32"):
            p.append("eval_every: periodic evaluation runs on the single-process fp32 path only "
                     "(DeepSpeed shards the weights it would read); use 0 with zero_stage/precision")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            p.append(f"warmup_steps: expected a non-negative integer, got {self.warmup_steps!r}")
        if self.schedule not in SCHEDULES:
            p.append(f"schedule: expected one of {list(SCHEDULES)}, got {self.schedule!r}")
        if not _finite(self.beta) or not 0 <= self.beta <= 1:
            p.append(f"beta: expected a number in [0, 1], got {self.beta!r}")
        if self.forget_mode not in FORGET_MODES:
            p.append(f"forget_mode: expected one of {list(FORGET_MODES)}, got {self.forget_mode!r}")
        if not _finite(self.forget_margin) or not -1 <= self.forget_margin <= 1:
            p.append(f"forget_margin: expected a number in [-1, 1], got {self.forget_margin!r}")
        if self.loss_impl is not None and self.loss_impl not in LOSS_IMPLS:
            p.append(f"loss_impl: expected one of {list(LOSS_IMPLS)} or None, got {self.loss_impl!r}")
        if not isinstance(self.zero_stage, int) or isinstance(self.zero_stage, bool) or self.zero_stage not in (0, 1, 2, 3):
            p.append(f"zero_stage: expected 0, 1, 2 or 3, got {self.zero_stage!r}")
        if self.precision not in PRECISIONS:
            p.append(f"precision: expected one of {list(PRECISIONS)}, got {self.precision!r}")
        if not isinstance(self.grad_checkpointing, bool):
            p.append(f"grad_checkpointing: expected true or false, got {self.grad_checkpointing!r}")
        if not _finite(self.grad_clip) or self.grad_clip < 0:
            p.append(f"grad_clip: expected a non-negative number (0 = off), got {self.grad_clip!r}")
        if self.deepspeed_config is not None:
            from .ds_config import deepspeed_config_problems

            p.extend(deepspeed_config_problems(self))
        if not (self.device == "auto" or self.device == "cpu" or str(self.device).startswith("cuda")):
            p.append(f"device: expected 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        p.extend(check_model_spec(self.model, self.pretrained))
        p.extend(shard_problems(self.forget_data, "forget_data"))
        p.extend(shard_problems(self.retain_data, "retain_data"))
        eval_problems = eval_set_problems(self.eval_data)
        p.extend(eval_problems)
        if not self.forget_classes:
            p.append("forget_classes: name at least one class of eval_data to forget")
        elif not eval_problems:
            names_file = Path(self.eval_data) / "classnames.txt"
            if names_file.is_file():
                names = [x.strip() for x in names_file.read_text().splitlines() if x.strip()]
                missing = [c for c in self.forget_classes if c not in names]
                if missing:
                    p.append(f"forget_classes: {missing} not in {names_file} (classes: {', '.join(names)})")
        p.extend(output_dir_problems(self.output_dir, self.overwrite))
        return p

    def validate(self) -> "UnlearnConfig":
        """Raise ConfigError listing every problem at once; return self when valid."""
        problems = self.problems()
        if problems:
            raise ConfigError(problems)
        return self


def config_overrides(config_file: Optional[str], set_items: Sequence[str]) -> dict:
    """UnlearnConfig fields from a JSON file, then `FIELD=VALUE` items (VALUE parsed as JSON when
    it parses, else taken as a string), the later winning. Raises ConfigError naming an item
    that is malformed or names no field."""
    given: dict = {}
    if config_file:
        try:
            given.update(json.loads(Path(config_file).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError([f"config: cannot read {config_file!r} as JSON ({exc})"]) from exc
    known = {f.name for f in fields(UnlearnConfig)}
    for item in set_items:
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            raise ConfigError([f"--set {item!r}: expected FIELD=VALUE with FIELD one of {sorted(known)}"])
        try:
            given[key] = json.loads(value)
        except json.JSONDecodeError:
            given[key] = value
    return given


def output_dir_problems(output_dir: str, overwrite: bool) -> List[str]:
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        return [f"output_dir: {output_dir!r} exists and is not a directory"]
    if out.is_dir() and not overwrite:
        markers = [m for m in RUN_MARKERS if (out / m).exists()]
        if markers:
            return [f"output_dir: {output_dir!r} holds another run ({', '.join(markers)}); "
                    "choose a new directory or pass --overwrite"]
    return []


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def config_json(cfg: UnlearnConfig) -> str:
    return json.dumps(cfg.to_dict(), indent=2)
