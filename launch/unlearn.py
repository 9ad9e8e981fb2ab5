"""Unlearn a forget set from an open_clip model.

    python launch/unlearn.py                      # the demo on the embedded default
    python launch/unlearn.py --output-dir runs/x --steps 30   # the demo, with other settings
    python launch/unlearn.py --model ViT-B-32 --pretrained laion2b_s34b_b79k \\
        --forget-data forget/ --retain-data retain/ --eval-data eval/ --forget-classes dog

Without any data flag (--model, --pretrained, --forget-data, --retain-data, --eval-data,
--forget-classes) the run is the embedded demo, with whatever else was given.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

import cliperase.engine as engine  # its names load on first use: a refused input imports no torch
from cliperase.engine.config import DATA_KEYS, UnlearnConfig, config_overrides, method_names
from cliperase.engine.errors import ConfigError, Interrupted, NonFiniteLoss
from cliperase.engine.models.hf import hf_model_name

_DEFAULTS = UnlearnConfig()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unlearn", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", help=f"open_clip architecture name (default {_DEFAULTS.model})")
    a("--pretrained", help="open_clip pretrained tag or a local checkpoint path")
    a("--forget-data", help="shards of image-caption pairs to forget (dir, brace pattern, file)")
    a("--retain-data", help="shards of image-caption pairs to keep")
    a("--eval-data", help="evaluation set in CLIP_benchmark's webdataset layout")
    a("--forget-classes", help="comma-separated class names of the eval set to forget")
    a("--audit-data", help="never-seen pairs like the forget pairs (shards): report.json's membership audit "
                           "(the embedded default generates them)")
    a("--method", help=f"unlearning method: {', '.join(method_names())} (default {_DEFAULTS.method})")
    a("--steps", type=int, help=f"optimizer steps (default {_DEFAULTS.steps})")
    a("--batch-size", type=int, help=f"pairs per batch, forget and retain each (default {_DEFAULTS.batch_size})")
    a("--lr", type=float, help=f"peak learning rate (default {_DEFAULTS.lr})")
    a("--seed", type=int, help="seed of data order and initialisation (default 0)")
    a("--output-dir", help=f"where report.json and the unlearned checkpoint go (default {_DEFAULTS.output_dir})")
    a("--overwrite", action="store_true", default=None, help="allow --output-dir to hold an earlier run")
    a("--zero-stage", type=int, help="DeepSpeed ZeRO stage 0-3 (default 0: plain torch on one process)")
    a("--precision", help="training precision: fp32, bf16 or fp16 (default fp32)")
    a("--grad-checkpointing", action="store_true", default=None, help="recompute activations in backward")
    a("--accum-steps", type=int, help="micro-batches accumulated per optimizer step (default 1)")
    a("--save-every", type=int, help=f"training checkpoint every N steps, 0: only at the end (default {_DEFAULTS.save_every})")
    a("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
      help="continue the run in --output-dir from its newest complete checkpoint (or from CHECKPOINT, a "
           "checkpoints/step_N directory); with none yet, start it")
    a("--deepspeed-config", help="DeepSpeed JSON merged into the built config; conflicts with flags are errors")
    a("--config", help="JSON file of UnlearnConfig fields; flags given on the command line win")
    a("--set", action="append", default=[], metavar="FIELD=VALUE",
      help="any other config field or method option (JSON value), e.g. --set lambda_f=1 --set forget_mode='\"hinge\"'")
    a("--no-progress", action="store_true", help="no progress bar")
    # The deepspeed launcher appends --local_rank=N to the script's arguments.
    a("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def given_keys(args: argparse.Namespace) -> dict:
    """The config keys the command line gives: --config, then --set, then the flags."""
    given = config_overrides(args.config, args.set)
    for name in ("model", "pretrained", "forget_data", "retain_data", "eval_data", "audit_data", "method", "steps",
                 "batch_size", "lr", "seed", "output_dir", "overwrite", "zero_stage", "precision",
                 "grad_checkpointing", "accum_steps", "deepspeed_config", "save_every", "resume"):
        value = getattr(args, name)
        if value is not None:
            given[name] = value
    if args.forget_classes is not None:
        given["forget_classes"] = [c.strip() for c in args.forget_classes.split(",") if c.strip()]
    return given


def config_from_args(args: argparse.Namespace) -> UnlearnConfig:
    """The run config from the flags: the embedded demo (with the other keys given) when no data
    flag is given, else a config of exactly what was given. Raises ConfigError."""
    given = given_keys(args)
    if not any(k in given for k in DATA_KEYS):
        from cliperase.engine.tools.demo import demo_config  # prepares the demo's data: only for a demo run

        if "output_dir" in given:  # a folder of the user's own: no silent overwrite
            given.setdefault("overwrite", False)
        return demo_config(progress=not args.no_progress, **given)
    if isinstance(given.get("pretrained"), str) and "model" not in given:
        # A Hugging Face CLIP directory names its own architecture (None for anything else).
        given["model"] = hf_model_name(given["pretrained"]) or UnlearnConfig.model
    return UnlearnConfig.from_dict(given)


def _demo_hint(args: argparse.Namespace, exc: ConfigError) -> str:
    """When data flags are missing, a word that the demo exists."""
    missing = [p for p in exc.problems if p.split(":")[0] in ("forget_data", "retain_data", "eval_data", "forget_classes")
               and ("no shards given" in p or "no evaluation set given" in p or "name at least one class" in p)]
    flags = ", ".join("--" + k.replace("_", "-") for k in DATA_KEYS)
    return f"\n(without any of {flags}, launch/unlearn.py runs the embedded demo)" if missing else ""


def _cell(v) -> str:
    return f"{v:>9.3f}" if isinstance(v, (int, float)) else f"{'n/a':>9}"


def print_summary(report: dict) -> None:
    b, a = report["before"], report["after"]
    rows = []
    if "zeroshot" in b:  # absent for a retrieval-only eval set (no classnames.txt)
        rows += [("zero-shot forget acc", b["zeroshot"]["forget_acc"], a["zeroshot"]["forget_acc"]),
                 ("zero-shot retain acc", b["zeroshot"]["retain_acc"], a["zeroshot"]["retain_acc"])]
    for part in ("forget", "retain"):
        if "retrieval" in b:
            rows.append((f"retrieval {part} i2t R@1", b["retrieval"][part]["i2t_r1"], a["retrieval"][part]["i2t_r1"]))
            rows.append((f"retrieval {part} t2i R@1", b["retrieval"][part]["t2i_r1"], a["retrieval"][part]["t2i_r1"]))
    for attack in ("threshold", "calibrated"):  # the membership audit (audit_data set)
        if attack in b.get("audit", {}) and attack in a.get("audit", {}):
            rows.append((f"MIA {attack} AUC", b["audit"][attack]["auc"], a["audit"][attack]["auc"]))
            rows.append((f"MIA {attack} TPR@1%FPR", b["audit"][attack]["tpr_at_1pct_fpr"],
                         a["audit"][attack]["tpr_at_1pct_fpr"]))
    print(f"\n{report['method']} on {report['model']}: {report['steps']} steps in {report['wall_s']:.1f} s")
    print(f"{'metric':<26}{'before':>9}{'after':>9}")
    for name, x, y in rows:
        print(f"{name:<26}{_cell(x)}{_cell(y)}")
    print(f"report: {Path(report['checkpoint']).parent / 'report.json'}")


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        report = engine.unlearn(cfg, progress=not args.no_progress)  # checks cfg before any heavy import
    except ConfigError as exc:
        print(f"unlearn: error: {exc}{_demo_hint(args, exc)}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(f"unlearn: {exc}", file=sys.stderr)
        return 128 + exc.signum  # the shell's convention for "stopped by a signal"
    except NonFiniteLoss as exc:
        print(f"unlearn: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # disk full, permissions, a vanished directory: the run is resumable
        print(f"unlearn: error: {exc}\nComplete checkpoints are kept; fix the cause and run the same command "
              "with --resume to continue from the last one.", file=sys.stderr)
        return 1
    if report is not None:  # None on ranks other than 0 of a distributed run
        print_summary(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
