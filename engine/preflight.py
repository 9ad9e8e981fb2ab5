"""Everything wrong with a run config, found before anything is built.

`problems(cfg)` lists every problem at once, each naming the field, what was expected and what
came, with the closest valid value where there is one; `check(cfg)` raises them as one
ConfigError and returns the warnings (legal but suspicious setups, engine/inputs.py). It reads
only metadata (file existence, class names, a checkpoint's pickle, the first samples of each
shard spec and of the evaluation set) and imports neither torch nor open_clip (except to check
an open_clip tag or a CUDA device), so a refused command line costs well under a second and
writes nothing.
"""
from __future__ import annotations

import os
import re
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Dict, List

from . import checks
from .config import (EXPORT_PRECISIONS, LOSS_IMPLS, PRECISIONS, RUN_MARKERS, SCHEDULES, TEACHER_CACHE_PRECISIONS, TEACHERS,
                     UnlearnConfig, method_names)
from .data import DATA_SPLITS, ShardReader, eval_set_problems, shard_problems
from .data.eval_set import eval_shards
from .dist import launched
from .dist.ds_config import deepspeed_config_problems
from .errors import ConfigError
from .eval.splits import parse_attributes
from .inputs import Findings, class_problems, eval_findings, output_findings, stream_findings
from .methods import METHODS, MethodOptions
from .models import check_model_spec

__all__ = ["inspect", "problems", "check", "output_dir_problems"]


def check(cfg: UnlearnConfig) -> List[str]:
    """Raise ConfigError listing every problem at once; return the warnings when there is none."""
    found = inspect(cfg)
    if found.problems:
        raise ConfigError(found.problems)
    return found.warnings


def problems(cfg: UnlearnConfig) -> List[str]:
    """Every problem with `cfg`, each naming the field; empty when the run can start."""
    return inspect(cfg).problems


def inspect(cfg: UnlearnConfig) -> Findings:
    """Every problem and every warning about `cfg`."""
    # --config and --set take any JSON value: a path or name of the wrong type is named first and
    # spares the checks below that would crash on it.
    mistyped = _type_problems(cfg)
    values = _value_problems(cfg)
    found = Findings(checks.collect(list(mistyped.values()), values, _method_problems(cfg),
                                    _scale_problems(cfg, mistyped, values)))
    if cfg.teacher == "live" and cfg.teacher_cache_precision != UnlearnConfig.teacher_cache_precision:
        found.warnings.append(f"teacher_cache_precision: {cfg.teacher_cache_precision!r} changes nothing with "
                              "teacher='live' (no cache is built)")
    return found.add(_input_findings(cfg, mistyped))


def _type_problems(cfg: UnlearnConfig) -> Dict[str, str]:
    """{field: problem} for the fields whose type the value checks take for granted."""
    out: Dict[str, str] = {}
    for name in ("model", "output_dir"):
        v = getattr(cfg, name)
        if not isinstance(v, str) or not v:
            out[name] = f"{name}: expected a non-empty string, got {v!r}"
    for name in ("pretrained", "forget_data", "retain_data", "eval_data", "audit_data", "deepspeed_config"):
        v = getattr(cfg, name)
        if v is not None and not isinstance(v, str):
            out[name] = f"{name}: expected a string (a path), got {v!r}"
    for name in ("overwrite", "mask_duplicate_captions", "train_logit_scale", "resampled", "grad_checkpointing"):
        found = checks.boolean(name, getattr(cfg, name))
        if found:
            out[name] = found
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool):
        out["seed"] = f"seed: expected an integer, got {cfg.seed!r}"
    if not isinstance(cfg.forget_classes, (tuple, list)) or not all(isinstance(c, str) for c in cfg.forget_classes):
        out["forget_classes"] = f"forget_classes: expected a list of class names, got {cfg.forget_classes!r}"
    return out


def _value_problems(cfg: UnlearnConfig) -> List[str]:
    p = checks.collect(*(checks.positive_int(n, getattr(cfg, n))
                         for n in ("steps", "batch_size", "log_every", "eval_batch_size", "accum_steps")),
                       checks.positive_number("lr", cfg.lr), checks.nonneg_number("weight_decay", cfg.weight_decay),
                       checks.nonneg_int("save_every", cfg.save_every),
                       checks.nonneg_int("data_workers", cfg.data_workers),
                       checks.positive_int("keep_checkpoints", cfg.keep_checkpoints),
                       checks.nonneg_int("eval_every", cfg.eval_every),
                       checks.nonneg_int("warmup_steps", cfg.warmup_steps),
                       checks.one_of("schedule", cfg.schedule, SCHEDULES),
                       checks.one_of("export_precision", cfg.export_precision, EXPORT_PRECISIONS),
                       checks.one_of("data_split", cfg.data_split, DATA_SPLITS),
                       checks.one_of("teacher", cfg.teacher, TEACHERS),
                       checks.one_of("teacher_cache_precision", cfg.teacher_cache_precision, TEACHER_CACHE_PRECISIONS))
    if cfg.resume is not None and cfg.resume != "latest" and not Path(str(cfg.resume)).is_dir():
        p.append(f"resume: expected 'latest' or a checkpoint directory, got {cfg.resume!r} (not a directory)")
    if cfg.loss_impl is not None and cfg.loss_impl not in LOSS_IMPLS:
        p.append(f"loss_impl: expected one of {list(LOSS_IMPLS)} or None, got {cfg.loss_impl!r}")
    try:
        parse_attributes(cfg.forget_attributes)
    except ValueError as exc:
        p.append(f"forget_attributes: {exc}")
    return p


def _method_problems(cfg: UnlearnConfig) -> List[str]:
    if not isinstance(cfg.method, str) or cfg.method not in METHODS:
        return [f"method: unknown method {cfg.method!r}; available: {', '.join(method_names())}",
                *_unchecked_option_problems(cfg)]
    method = METHODS[cfg.method]
    if not isinstance(cfg.options, MethodOptions) or not isinstance(cfg.options, method.Options):
        return [f"options: expected {method.Options.__name__} for method {cfg.method!r}, "
                f"got {type(cfg.options).__name__}"]
    p = list(cfg.options.problems(cfg))
    if cfg.zero_stage == 3 and method.needs_full_params:
        p.append(f"zero_stage: method {cfg.method!r} reads whole parameters in its hooks, which ZeRO-3 shards "
                 "across ranks; use zero_stage 0, 1 or 2")
    return p


def _unchecked_option_problems(cfg: UnlearnConfig) -> List[str]:
    """Option keys given with an unknown method, each checked as the method that owns it would."""
    found: List[str] = []
    for key, value in getattr(cfg.options, "keys", {}).items():
        owner = next((m for m in METHODS.values() if key in {f.name for f in fields(m.Options)}), None)
        if owner is not None:
            found.extend(p for p in owner.Options(**{key: value}).problems(cfg) if p.startswith(f"{key}:"))
    return found


def _scale_problems(cfg: UnlearnConfig, mistyped: Dict[str, str], values: List[str]) -> List[str]:
    p = checks.collect(checks.one_of("precision", cfg.precision, PRECISIONS))
    if not checks.finite(cfg.grad_clip) or cfg.grad_clip < 0:
        p.append(f"grad_clip: expected a non-negative number (0 = off), got {cfg.grad_clip!r}")
    if not isinstance(cfg.zero_stage, int) or isinstance(cfg.zero_stage, bool) or cfg.zero_stage not in (0, 1, 2, 3):
        p.append(f"zero_stage: expected 0, 1, 2 or 3, got {cfg.zero_stage!r}")
    if isinstance(cfg.eval_every, int) and cfg.eval_every > 0 and (cfg.zero_stage != 0 or cfg.precision != "fp32"):
        p.append("eval_every: periodic evaluation runs on the single-process fp32 path only "
                 "(DeepSpeed shards the weights it would read); use 0 with zero_stage/precision")
    if cfg.deepspeed_config is not None and "deepspeed_config" not in mistyped:
        # The file is compared with the DeepSpeed config these fields build: only when they are valid.
        if not any(q.split(":")[0] in ("batch_size", "accum_steps", "grad_clip", "zero_stage", "precision")
                   for q in p + values):
            p.extend(deepspeed_config_problems(cfg))
        # Without a launcher, stage 0 and fp32 run plain torch: the file would be ignored.
        if cfg.zero_stage == 0 and cfg.precision == "fp32" and not launched():
            p.append(f"deepspeed_config: {cfg.deepspeed_config!r} given, but this run does not go through DeepSpeed "
                     "(zero_stage 0, precision fp32, no launcher); set --zero-stage or --precision, or drop the file")
    return p


def _input_findings(cfg: UnlearnConfig, mistyped: Dict[str, str]) -> Findings:
    """The files the run reads and writes: device, model and checkpoint, shards, eval set, output."""
    found = Findings(_device_problems(cfg.device))
    if not mistyped.keys() & {"model", "pretrained"}:
        found.problems.extend(check_model_spec(cfg.model, cfg.pretrained))
    streams = []
    for what in ("forget_data", "retain_data"):
        if what not in mistyped:
            shards = shard_problems(getattr(cfg, what), what)
            found.problems.extend(shards)
            streams += [] if shards else [what]
    found.add(stream_findings(cfg, streams))
    if cfg.audit_data is not None and "audit_data" not in mistyped:
        found.problems.extend(shard_problems(cfg.audit_data, "audit_data"))
    found.add(_eval_findings(cfg, mistyped))
    if "output_dir" not in mistyped:
        found.problems.extend(output_dir_problems(cfg.output_dir, cfg.overwrite or cfg.resume is not None))
        ckpt = cfg.pretrained if "pretrained" not in mistyped and cfg.pretrained else None
        if ckpt and Path(ckpt).is_file() and (Path(cfg.output_dir) / "model.pt").resolve() == Path(ckpt).resolve():
            found.problems.append(f"output_dir: the unlearned model.pt would overwrite the input checkpoint {ckpt!r}; "
                                  "choose another output_dir")
        if not mistyped.keys() & {"forget_data", "retain_data", "eval_data", "pretrained"}:
            found.add(output_findings(cfg, getattr(cfg.options, "calibration_data", None)))
    return found


def _eval_findings(cfg: UnlearnConfig, mistyped: Dict[str, str]) -> Findings:
    eval_problems = [] if "eval_data" in mistyped else eval_set_problems(cfg.eval_data)
    if eval_problems:
        return Findings(eval_problems)
    if not cfg.forget_classes and "forget_classes" not in mistyped:
        return Findings(["forget_classes: name at least one class of eval_data to forget"])
    if mistyped.keys() & {"eval_data", "forget_classes"}:
        return Findings()
    if not (Path(cfg.eval_data) / "classnames.txt").is_file():
        missing = _no_classnames_problems(Path(cfg.eval_data))
        return Findings(missing) if missing else eval_findings(cfg)
    unknown = class_problems(cfg.eval_data, cfg.forget_classes)
    return Findings(unknown) if unknown else eval_findings(cfg)


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


def _device_problems(device) -> List[str]:
    if device in ("auto", "cpu"):
        return []
    m = re.fullmatch(r"cuda(?::(\d+))?", device) if isinstance(device, str) else None
    if m is None:
        return [f"device: expected 'auto', 'cpu' or 'cuda[:N]', got {device!r}"]
    # Otherwise the run fails after writing run.json, when the model is moved to the device. Without
    # the NVIDIA driver there is none to count; with it, torch's own count (CUDA_VISIBLE_DEVICES).
    if Path("/proc/driver/nvidia").is_dir():
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    else:
        n = 0
    if n == 0:
        return [f"device: {device!r} asked for, but torch sees no CUDA device on this machine"]
    if m.group(1) is not None and int(m.group(1)) >= n:
        return [f"device: {device!r} asked for, but this machine has {n} CUDA device(s) (cuda:0 to cuda:{n - 1})"]
    return []


def _no_classnames_problems(root: Path) -> List[str]:
    """An eval set without classnames.txt is fine for retrieval (forget_classes then match its
    captions), not when its samples carry class labels or no captions: nothing would say which
    images are forgotten. Looks at the first sample only."""
    shard = eval_shards(str(root))[0]
    reader = ShardReader([str(shard)], check_images="none", check_samples=False, retries=0)
    samples = iter(reader)
    try:
        first = next(samples, None)
    finally:
        samples.close()
    if first is None:
        why = reader.bad_shards.get(str(shard), "it holds no samples")
        return [f"eval_data: cannot read {shard} ({why})"]
    if "cls" in first:
        return [f"eval_data: {root / 'classnames.txt'} is missing: its samples carry class labels (cls) "
                "that need one class name per line, in label order"]
    if "txt" not in first:
        return [f"eval_data: {root} has neither classnames.txt nor captions (txt): "
                "nothing to evaluate forget_classes on"]
    return []
