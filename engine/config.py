"""The typed run configuration: one frozen dataclass, validated as a whole before anything is built."""
from __future__ import annotations

import json
import math
import os
import re
import tarfile
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .errors import ConfigError

__all__ = ["UnlearnConfig", "METHOD_NAMES", "RUN_MARKERS"]

# Kept here (not imported from methods) so validating a config never imports torch models.
METHOD_NAMES = ("cliperase", "ft", "ga", "graddiff", "neggrad+", "kl", "multidelete", "subgroup")  # engine/methods.py defines each
# Methods whose hooks read whole parameters (Method.needs_full_params), so ZeRO-3 sharding is refused.
FULL_PARAM_METHODS = ("subgroup",)
SUBGROUP_STAGES = ("forget", "remind", "restore")
SUBGROUP_TOWERS = ("image", "all")
FORGET_MODES = ("cosine", "dot", "hinge")
LOSS_IMPLS = ("ref", "chunked", "triton")
SCHEDULES = ("constant", "cosine")
DATA_SPLITS = ("auto", "sample", "shard")  # how training streams divide data between readers (engine/data.py PairStream)
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
    # Only the forget_classes images whose {key}.json attributes match count as forgotten (a subgroup):
    # "colour=red", "colour=red|blue;background=white" (every key must match, any of its values); "" = all.
    forget_attributes: str = ""
    method: str = "cliperase"  # one of METHOD_NAMES
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
    teacher: str = "cache"  # the original's embeddings: "cache" (computed once, stored with the run) or "live"
    # subgroup (METHOD.md, Zhang et al. 2025): forget (top-k Fisher layers) -> remind (lambda_r * retain
    # InfoNCE + lambda_c * KL, EMA) -> restore (soup with the original); forget_mode/margin shape stage 1.
    subgroup_stages: str = "forget,remind,restore"  # stages to run, comma-separated (any non-empty subset; order fixed)
    subgroup_forget_steps: Optional[int] = None  # forget-stage steps, the rest remind; default steps // 6 (all with one stage)
    # k: the top-k layers by relative Fisher information are trained, the rest frozen. 10, not 3: with 3 the
    # tiny model forgot red circles but not blue squares (0.756) or stars on black (0.987); with 10 it
    # forgets the first two on three seeds (benchmarks/results/compare-subgroup.md).
    subgroup_layers: int = 10
    subgroup_tower: str = "image"  # layers eligible for selection: "image" (the image tower) or "all"
    subgroup_fisher_batches: int = 4  # forget batches and retain batches each for the Fisher scores
    # remind: weight of a hinge max(0, cos(forget image, class prompt) - forget_margin) kept in the remind loss so
    # that training on the siblings (other circles) does not teach the subgroup back; 0 = METHOD.md's remind stage.
    subgroup_guard: float = 3.0
    subgroup_ema_decay: float = 0.9  # remind: EMA of the weights, avg = d * avg + (1 - d) * w, from the forget stage's
    subgroup_original: Optional[str] = None  # the original model's checkpoint when the input is already unlearned; default the input
    calibration_data: Optional[str] = None  # CLIP_benchmark-layout split for the soup weight a; default: eval_data
    soup_tolerance: float = 0.02  # restore: the largest drop of calibration retain accuracy the chosen a may cost
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
        if isinstance(d.get("forget_classes"), str):  # tuple() would split it into letters
            d["forget_classes"] = [c.strip() for c in d["forget_classes"].split(",") if c.strip()]
        if "forget_classes" in d:
            d["forget_classes"] = tuple(d["forget_classes"])
        return cls(**d)

    def problems(self) -> List[str]:
        """Every problem with this config, each naming the field; empty when valid.

        Reads only metadata (file existence, class names, a checkpoint's container) and the
        first usable sample of each shard spec; never builds a model.
        """
        from .data import eval_set_problems, shard_problems
        from .models import check_model_spec

        p: List[str] = []
        # --config and --set take any JSON value: a path or name of the wrong type is named here
        # and spares the checks below that would crash on it.
        mistyped = _type_problems(self)
        p.extend(mistyped.values())
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
        for name in ("save_every", "keep_checkpoints"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (1 if name == "keep_checkpoints" else 0):
                p.append(f"{name}: expected a {'positive' if name == 'keep_checkpoints' else 'non-negative'} integer, "
                         f"got {v!r}")
        if self.resume is not None and self.resume != "latest" and not Path(str(self.resume)).is_dir():
            p.append(f"resume: expected 'latest' or a checkpoint directory, got {self.resume!r} (not a directory)")
        if not isinstance(self.eval_every, int) or isinstance(self.eval_every, bool) or self.eval_every < 0:
            p.append(f"eval_every: expected a non-negative integer, got {self.eval_every!r}")
        elif self.eval_every and (self.zero_stage != 0 or self.precision != "fp32"):
            p.append("eval_every: periodic evaluation runs on the single-process fp32 path only "
                     "(DeepSpeed shards the weights it would read); use 0 with zero_stage/precision")
        if not isinstance(self.warmup_steps, int) or isinstance(self.warmup_steps, bool) or self.warmup_steps < 0:
            p.append(f"warmup_steps: expected a non-negative integer, got {self.warmup_steps!r}")
        if self.schedule not in SCHEDULES:
            p.append(f"schedule: expected one of {list(SCHEDULES)}, got {self.schedule!r}")
        if not _finite(self.beta) or not 0 <= self.beta <= 1:
            p.append(f"beta: expected a number in [0, 1], got {self.beta!r}")
        if self.forget_mode not in FORGET_MODES:
            p.append(f"forget_mode: expected one of {list(FORGET_MODES)}, got {self.forget_mode!r}")
        if not _finite(self.forget_margin) or not -1 <= self.forget_margin <= 1:
            p.append(f"forget_margin: expected a number in [-1, 1], got {self.forget_margin!r}")
        if self.export_precision not in ("fp32", "bf16"):
            p.append(f"export_precision: expected 'fp32' or 'bf16', got {self.export_precision!r}")
        if self.data_split not in DATA_SPLITS:
            p.append(f"data_split: expected one of {list(DATA_SPLITS)}, got {self.data_split!r}")
        if not isinstance(self.resampled, bool):
            p.append(f"resampled: expected true or false, got {self.resampled!r}")
        if self.teacher not in ("cache", "live"):
            p.append(f"teacher: expected 'cache' or 'live', got {self.teacher!r}")
        if self.loss_impl is not None and self.loss_impl not in LOSS_IMPLS:
            p.append(f"loss_impl: expected one of {list(LOSS_IMPLS)} or None, got {self.loss_impl!r}")
        if not isinstance(self.zero_stage, int) or isinstance(self.zero_stage, bool) or self.zero_stage not in (0, 1, 2, 3):
            p.append(f"zero_stage: expected 0, 1, 2 or 3, got {self.zero_stage!r}")
        elif self.zero_stage == 3 and self.method in FULL_PARAM_METHODS:
            p.append(f"zero_stage: method {self.method!r} reads whole parameters in its hooks (layer scores, EMA, "
                     "soup), which ZeRO-3 shards across ranks; use zero_stage 0, 1 or 2")
        p.extend(self._subgroup_problems())
        try:
            parse_attributes(self.forget_attributes)
        except ValueError as exc:
            p.append(f"forget_attributes: {exc}")
        if self.precision not in PRECISIONS:
            p.append(f"precision: expected one of {list(PRECISIONS)}, got {self.precision!r}")
        if not isinstance(self.grad_checkpointing, bool):
            p.append(f"grad_checkpointing: expected true or false, got {self.grad_checkpointing!r}")
        if not _finite(self.grad_clip) or self.grad_clip < 0:
            p.append(f"grad_clip: expected a non-negative number (0 = off), got {self.grad_clip!r}")
        if self.deepspeed_config is not None and "deepspeed_config" not in mistyped:
            from .distributed import launched
            from .ds_config import deepspeed_config_problems

            # The file is compared with the DeepSpeed config these fields build: only when they are valid.
            if not any(q.split(":")[0] in ("batch_size", "accum_steps", "grad_clip", "zero_stage", "precision") for q in p):
                p.extend(deepspeed_config_problems(self))
            # Without a launcher, stage 0 and fp32 run plain torch: the file would be ignored.
            if self.zero_stage == 0 and self.precision == "fp32" and not launched():
                p.append(f"deepspeed_config: {self.deepspeed_config!r} given, but this run does not go through DeepSpeed "
                         "(zero_stage 0, precision fp32, no launcher); set --zero-stage or --precision, or drop the file")
        p.extend(_device_problems(self.device))
        if not mistyped.keys() & {"model", "pretrained"}:
            p.extend(check_model_spec(self.model, self.pretrained))
        for what in ("forget_data", "retain_data"):
            if what not in mistyped:
                shards = shard_problems(getattr(self, what), what)
                p.extend(shards or _sample_problems(getattr(self, what), what))
        eval_problems = [] if "eval_data" in mistyped else eval_set_problems(self.eval_data)
        p.extend(eval_problems)
        if not self.forget_classes and "forget_classes" not in mistyped:
            p.append("forget_classes: name at least one class of eval_data to forget")
        elif not eval_problems and not mistyped.keys() & {"eval_data", "forget_classes"}:
            names_file = Path(self.eval_data) / "classnames.txt"
            if names_file.is_file():
                names = [x.strip() for x in names_file.read_text().splitlines() if x.strip()]
                missing = [c for c in self.forget_classes if c not in names]
                if missing:
                    p.append(f"forget_classes: {missing} not in {names_file} (classes: {', '.join(names)})")
            else:
                p.extend(_no_classnames_problems(Path(self.eval_data)))
        if "output_dir" not in mistyped:
            p.extend(output_dir_problems(self.output_dir, self.overwrite or self.resume is not None))
            ckpt = self.pretrained if "pretrained" not in mistyped and self.pretrained else None
            if ckpt and Path(ckpt).is_file() and (Path(self.output_dir) / "model.pt").resolve() == Path(ckpt).resolve():
                p.append(f"output_dir: the unlearned model.pt would overwrite the input checkpoint {ckpt!r}; "
                         "choose another output_dir")
        return p

    def subgroup_plan(self) -> Tuple[Tuple[str, ...], int, int]:
        """(stages, forget steps, remind steps) of the subgroup method: the forget stage takes the
        first steps, remind the rest; with neither, the steps are no-ops and only restore acts."""
        stages = tuple(x for x in SUBGROUP_STAGES if x in _stage_list(self.subgroup_stages))
        if "forget" in stages and "remind" in stages:
            f = self.subgroup_forget_steps if self.subgroup_forget_steps is not None else max(1, self.steps // 6)
            return stages, f, self.steps - f
        return stages, (self.steps if "forget" in stages else 0), (self.steps if "remind" in stages else 0)

    def _subgroup_problems(self) -> List[str]:
        p: List[str] = []
        given = _stage_list(self.subgroup_stages) if isinstance(self.subgroup_stages, str) else None
        if given is None or not given or any(x not in SUBGROUP_STAGES for x in given) or len(set(given)) != len(given):
            p.append(f"subgroup_stages: expected a comma-separated non-empty subset of {list(SUBGROUP_STAGES)}, "
                     f"got {self.subgroup_stages!r}")
            given = list(SUBGROUP_STAGES)
        fs = self.subgroup_forget_steps
        if fs is not None:
            if not isinstance(fs, int) or isinstance(fs, bool) or fs <= 0:
                p.append(f"subgroup_forget_steps: expected a positive integer or null, got {fs!r}")
            elif not {"forget", "remind"} <= set(given):
                p.append("subgroup_forget_steps: splits steps between the forget and remind stages; "
                         f"with subgroup_stages={self.subgroup_stages!r} one stage takes all steps (leave it null)")
            elif isinstance(self.steps, int) and fs >= self.steps:
                p.append(f"subgroup_forget_steps: {fs} leaves no remind steps of steps={self.steps}")
        elif (self.method == "subgroup" and {"forget", "remind"} <= set(given) and isinstance(self.steps, int)
              and self.steps == 1):
            p.append("steps: the forget and remind stages need at least 2 steps (one each); "
                     "or skip one with subgroup_stages")
        if (self.method == "subgroup" and not {"forget", "remind"} & set(given) and _finite(self.weight_decay)
                and self.weight_decay > 0):
            p.append("weight_decay: with subgroup_stages='restore' the training steps are no-ops, "
                     "but weight decay would still move the weights; use 0")
        for name in ("subgroup_layers", "subgroup_fisher_batches"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                p.append(f"{name}: expected a positive integer, got {v!r}")
        if self.subgroup_tower not in SUBGROUP_TOWERS:
            p.append(f"subgroup_tower: expected one of {list(SUBGROUP_TOWERS)}, got {self.subgroup_tower!r}")
        if not _finite(self.subgroup_ema_decay) or not 0 <= self.subgroup_ema_decay < 1:
            p.append(f"subgroup_ema_decay: expected a number in [0, 1), got {self.subgroup_ema_decay!r}")
        if not _finite(self.subgroup_guard) or self.subgroup_guard < 0:
            p.append(f"subgroup_guard: expected a non-negative number, got {self.subgroup_guard!r}")
        if not _finite(self.soup_tolerance) or self.soup_tolerance < 0:
            p.append(f"soup_tolerance: expected a non-negative number, got {self.soup_tolerance!r}")
        if self.calibration_data is not None:
            from .data import eval_set_problems

            p.extend(eval_set_problems(self.calibration_data, "calibration_data"))
        if self.subgroup_original is not None:
            from .models import check_model_spec

            p.extend(f"subgroup_original: {x}" for x in check_model_spec(self.model, self.subgroup_original))
        return p

    def validate(self) -> "UnlearnConfig":
        """Raise ConfigError listing every problem at once; return self when valid."""
        problems = self.problems()
        if problems:
            raise ConfigError(problems)
        return self


# Fields a resumed run may change: they do not alter the trajectory (where files go, how often
# to log or checkpoint). Every other field must equal the checkpoint's.
RESUMABLE_CHANGES = ("resume", "overwrite", "output_dir", "log_every", "save_every", "keep_checkpoints", "eval_batch_size")


def trajectory_fields(cfg: "UnlearnConfig") -> dict:
    """The config fields that determine the run's trajectory (all but RESUMABLE_CHANGES)."""
    return {k: v for k, v in cfg.to_dict().items() if k not in RESUMABLE_CHANGES}


def config_overrides(config_file: Optional[str], set_items: Sequence[str]) -> dict:
    """UnlearnConfig fields from a JSON file, then `FIELD=VALUE` items (VALUE parsed as JSON when
    it parses, else taken as a string), the later winning. Raises ConfigError naming an item
    that is malformed or names no field."""
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
                    "choose a new directory, pass --resume to continue it, or --overwrite to replace it"]
    # Tried, not os.access(): root passes access() on a read-only filesystem. The probe file is
    # created in the directory itself or the nearest existing parent, and removed at once.
    probe_dir = out
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    try:
        fd, probe = tempfile.mkstemp(prefix=".cliperase-write-test-", dir=probe_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return [f"output_dir: cannot write in {str(probe_dir)!r} ({exc.strerror or exc}); "
                "choose a writable directory"]
    return []


def _type_problems(cfg: UnlearnConfig) -> Dict[str, str]:
    """{field: problem} for the fields whose type the value checks of problems() take for granted."""
    out: Dict[str, str] = {}
    for name in ("model", "output_dir"):
        v = getattr(cfg, name)
        if not isinstance(v, str) or not v:
            out[name] = f"{name}: expected a non-empty string, got {v!r}"
    for name in ("pretrained", "forget_data", "retain_data", "eval_data", "deepspeed_config"):
        v = getattr(cfg, name)
        if v is not None and not isinstance(v, str):
            out[name] = f"{name}: expected a string (a path), got {v!r}"
    for name in ("overwrite", "mask_duplicate_captions", "train_logit_scale"):
        v = getattr(cfg, name)
        if not isinstance(v, bool):  # "false" from --set would be truthy
            out[name] = f"{name}: expected true or false, got {v!r}"
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool):
        out["seed"] = f"seed: expected an integer, got {cfg.seed!r}"
    if not isinstance(cfg.forget_classes, (tuple, list)) or not all(isinstance(c, str) for c in cfg.forget_classes):
        out["forget_classes"] = f"forget_classes: expected a list of class names, got {cfg.forget_classes!r}"
    return out


def _device_problems(device) -> List[str]:
    if device in ("auto", "cpu"):
        return []
    m = re.fullmatch(r"cuda(?::(\d+))?", device) if isinstance(device, str) else None
    if m is None:
        return [f"device: expected 'auto', 'cpu' or 'cuda[:N]', got {device!r}"]
    import torch

    # Otherwise the run fails after writing run.json, when the model is moved to the device.
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        return [f"device: {device!r} asked for, but torch sees no CUDA device on this machine"]
    if m.group(1) is not None and int(m.group(1)) >= n:
        return [f"device: {device!r} asked for, but this machine has {n} CUDA device(s) (cuda:0 to cuda:{n - 1})"]
    return []


def _sample_problems(spec: str, what: str) -> List[str]:
    """Shards that exist but hold no usable image-caption pair (not tars, empty, json only)
    otherwise fail only once training starts, after the model is built and evaluated. Reading
    stops at the first usable sample: a few kilobytes when the data is good."""
    from .data import ShardReader, resolve_shards

    reader = ShardReader(resolve_shards(spec, what), retries=0)
    samples = iter(reader)
    try:
        if next(samples, None) is not None:
            return []
    finally:
        samples.close()
    skipped = {k: v for k, v in reader.skip_counts().items() if v}
    bad = "; ".join(f"{url}: {why}" for url, why in list(reader.bad_shards.items())[:3])
    return [f"{what}: no usable image-caption sample in {len(reader.shards)} shard(s) of {spec!r} "
            f"(skipped: {skipped or 'nothing, the shards hold no samples'})" + (f"; {bad}" if bad else "")]


def _no_classnames_problems(root: Path) -> List[str]:
    """An eval set without classnames.txt is fine for retrieval (forget_classes then match its
    captions), not when its samples carry class labels or no captions: nothing would say which
    images are forgotten. Looks at the first sample only."""
    shard = min((root / "test").glob("*.tar"), key=lambda s: (len(s.stem), s.stem))
    exts, key = set(), None
    try:
        with tarfile.open(shard, mode="r|") as tar:
            for member in tar:
                k, _, ext = member.name.partition(".")
                if key is not None and k != key:
                    break
                key = k
                exts.add(ext)
    except (OSError, tarfile.TarError) as exc:
        return [f"eval_data: cannot read {shard} ({exc})"]
    if "cls" in exts:
        return [f"eval_data: {root / 'classnames.txt'} is missing: its samples carry class labels (cls) "
                "that need one class name per line, in label order"]
    if "txt" not in exts:
        return [f"eval_data: {root} has neither classnames.txt nor captions (txt): "
                "nothing to evaluate forget_classes on"]
    return []


def _stage_list(spec: str) -> List[str]:
    return [x.strip() for x in spec.split(",") if x.strip()]


def parse_attributes(spec: str) -> dict:
    """`"colour=red|blue;background=white"` -> {"colour": ("red", "blue"), "background": ("white",)};
    "" -> {}. Raises ValueError naming the malformed part."""
    if not isinstance(spec, str):
        raise ValueError(f"expected a string like 'colour=red', got {spec!r}")
    out: dict = {}
    for part in (x.strip() for x in spec.split(";")):
        if not part:
            continue
        key, sep, values = part.partition("=")
        vals = tuple(v.strip() for v in values.split("|") if v.strip())
        if not sep or not key.strip() or not vals:
            raise ValueError(f"expected KEY=VALUE[|VALUE...] parts joined by ';', got {part!r}")
        if key.strip() in out:
            raise ValueError(f"attribute {key.strip()!r} given twice (join its values with '|')")
        out[key.strip()] = vals
    return out


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def config_json(cfg: UnlearnConfig) -> str:
    return json.dumps(cfg.to_dict(), indent=2)
