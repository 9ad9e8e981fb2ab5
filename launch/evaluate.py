"""Evaluate open_clip checkpoints: zero-shot classification and retrieval, split into forget and retain.

    python launch/evaluate.py --model ViT-B-32 --pretrained laion2b_s34b_b79k --pretrained runs/x/model.pt \\
        --dataset eval/ --forget-classes dog --output results/
    python launch/evaluate.py --run runs/demo --output results/   # model, checkpoint, eval set and
                                                                 # forget classes from the run

Datasets are in CLIP_benchmark's webdataset layout, of either kind: a classification folder
(classnames.txt, cls labels; no dataset_type.txt) or a retrieval folder (dataset_type.txt =
retrieval, txt captions). A classification folder whose samples also carry captions is scored
on both tasks (CLIP_benchmark reads it for classification only). One JSON file per dataset x
task x checkpoint is written to --output as CLIP_benchmark's default name does,

    {dataset}_{checkpoint}_{model}_en_{task}.json

with dataset = the dataset folder's name, checkpoint = an open_clip tag, a checkpoint file's
name with its extension (its parent folder's name prepended when two names clash) or, for
--run, the run folder's name, and task = zeroshot_classification or zeroshot_retrieval. Each
file holds CLIP_benchmark's result shape {"dataset", "model", "pretrained", "task", "language",
"metrics"} with its values: dataset = "wds/" + the folder's name (what CLIP_benchmark is given as
--dataset, with --dataset_root the folder), pretrained = the tag or path exactly as given, so
`clip_benchmark build` puts the two tools' rows side by side. Metrics use CLIP_benchmark's
names and definitions (acc1, acc5, mean_per_class_recall; acc5 is null below 5 classes, where
CLIP_benchmark writes NaN; image_retrieval_recall@k = text->image, text_retrieval_recall@k =
image->text, k = 1, 5, 10, top-k by torch.topk with its tie order), each also prefixed forget_
and retain_ for the images of the forget classes and the rest. Missing values (an empty part)
are null.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import List, Optional, Tuple

from cliperase.engine import ConfigError
from cliperase.engine.data import load_eval_set
from cliperase.engine.eval import benchmark_record, embed_eval_set, forget_mask, split_metrics
from cliperase.engine.models import load_model
from cliperase.engine.trainer import resolve_device


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", help="open_clip architecture name of every --pretrained")
    a("--pretrained", action="append", default=[], help="open_clip tag or checkpoint file (repeatable)")
    a("--run", action="append", default=[], help="an unlearn run folder: its report.json and model.pt (repeatable)")
    a("--dataset", action="append", default=[],
      help="evaluation set in CLIP_benchmark's webdataset layout, a classification or a retrieval folder "
           "(repeatable; default for --run: its eval_data)")
    a("--forget-classes", help="comma-separated class names to report as the forget part (default for --run: its own)")
    a("--output", default="eval_results", help="folder for the JSON results (default eval_results)")
    a("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N (default auto)")
    a("--batch-size", type=int, default=256, help="images or texts per forward pass (default 256)")
    a("--no-progress", action="store_true", help="no progress bar")
    return p


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


def checkpoints_from_args(args: argparse.Namespace) -> List[Tuple[str, Optional[str], str, dict]]:
    """(model, pretrained, label, run_config) per checkpoint to evaluate; raises ConfigError."""
    problems, out = [], []
    if args.pretrained and not args.model:
        problems.append("--model: required with --pretrained")
    if not args.pretrained and not args.run:
        problems.append("nothing to evaluate: give --model NAME --pretrained A [...], or --run DIR")
    labels: set = set()
    for spec in args.pretrained:
        is_file = Path(spec).is_file()
        label = _slug(Path(spec).name if is_file else spec)  # CLIP_benchmark's basename, extension kept
        if label in labels and is_file:
            label = _slug(f"{Path(spec).resolve().parent.name}-{Path(spec).name}")
        while label in labels:
            label += "_"
        labels.add(label)
        out.append((args.model, spec, label, {}))
    for run in args.run:
        report, ckpt = Path(run) / "report.json", Path(run) / "model.pt"
        if not report.is_file() or not ckpt.is_file():
            problems.append(f"--run: {run!r} has no report.json and model.pt (is it a finished unlearn run?)")
            continue
        config = json.loads(report.read_text()).get("config", {})
        label = _slug(Path(run).resolve().name)
        while label in labels:
            label += "_"
        labels.add(label)
        out.append((config.get("model") or args.model, str(ckpt), label, config))
    if problems:
        raise ConfigError(problems)
    return out


def evaluate_checkpoint(model_name: str, pretrained: Optional[str], label: str, datasets: List[str],
                        forget_classes: List[str], args: argparse.Namespace, where: str = "") -> List[Path]:
    """Evaluate one checkpoint on every dataset; the written JSON paths. `where` narrows the
    forget part to a subgroup (a run's forget_attributes)."""
    loaded = load_model(model_name, pretrained, device=resolve_device(args.device))
    written = []
    for root in datasets:
        ev = load_eval_set(root, loaded.preprocess)
        missing = [c for c in forget_classes if ev.labels is not None and c not in ev.classnames]
        if missing:
            raise ConfigError([f"--forget-classes: {missing} not classes of {root} ({', '.join(ev.classnames)})"])
        name = _slug(Path(root).resolve().name)
        emb = embed_eval_set(loaded.model, loaded.tokenizer, ev, batch_size=args.batch_size,
                             progress=not args.no_progress, desc=f"{label} on {name}")
        for task, metrics in split_metrics(emb, ev, forget_mask(ev, forget_classes, where or None)).items():
            record = benchmark_record(dataset=f"wds/{name}", model=model_name, pretrained=pretrained, task=task,
                                      metrics=metrics, forget_classes=forget_classes)
            path = Path(args.output) / f"{name}_{label}_{_slug(model_name)}_en_{task}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record, indent=2) + "\n")
            written.append(path)
    return written


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.batch_size <= 0:
            raise ConfigError([f"--batch-size: expected a positive integer, got {args.batch_size}"])
        given_classes = ([c.strip() for c in args.forget_classes.split(",") if c.strip()]
                         if args.forget_classes is not None else None)
        written = []
        for model_name, pretrained, label, run_cfg in checkpoints_from_args(args):
            datasets = args.dataset or ([run_cfg["eval_data"]] if run_cfg.get("eval_data") else [])
            if not datasets:
                raise ConfigError(["--dataset: no evaluation set given"])
            classes = given_classes if given_classes is not None else list(run_cfg.get("forget_classes", []))
            # A run's subgroup applies with its own classes (the split report.json used).
            where = run_cfg.get("forget_attributes", "") if given_classes is None else ""
            written += evaluate_checkpoint(model_name, pretrained, label, datasets, classes, args, where)
    except ConfigError as exc:
        print(f"evaluate: error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        metrics = json.loads(path.read_text())["metrics"]
        head = "acc1" if "acc1" in metrics else "text_retrieval_recall@1"
        parts = "  ".join(f"{p}{head}={_fmt(metrics.get(p + head))}" for p in ("", "forget_", "retain_"))
        print(f"{path}: {parts}")
    return 0


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


if __name__ == "__main__":
    sys.exit(main())
