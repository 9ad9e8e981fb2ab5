"""The embedded default: data generated here, a tiny CLIP pretrained here (cached), and the
CLIPErase settings that make it forget one shape."""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

from ..config import UnlearnConfig, keys_for
from ..errors import ConfigError
from .pretrain import PretrainConfig, pretrain
from .synthetic import generate, split_pairs, write_default, write_eval, write_pairs, write_retrieval_copy, SHAPES

__all__ = ["DEMO_FORGET_CLASS", "DemoTask", "DEMO_TASKS", "demo_cache", "prepare_demo", "demo_fields", "demo_config"]

DEMO_FORGET_CLASS = "circle"
_CALIBRATION_SEED = 104729  # the calibration split's seed: neither train (0), eval (1) nor the audit's
# The audit pairs' seeds (non-members, then the shadow pool): never-seen pairs of the forget set's kind.
_AUDIT_SEEDS = {"holdout": 7919, "shadow": 7927}
_AUDIT_PAIRS = 1000  # of each


@dataclass(frozen=True)
class DemoTask:
    """What to forget on the embedded default: every image of `classes`, or only those whose
    attributes match `where` (a subgroup, e.g. red circles but not blue ones)."""

    classes: Tuple[str, ...]
    where: Tuple[Tuple[str, str], ...] = ()  # (attribute, value) pairs of the samples' json, all must match
    breakdown: Optional[str] = None  # attribute a comparison splits forget-class accuracy by

    def forgets(self, meta: dict) -> bool:
        return meta.get("shape") in self.classes and all(str(meta.get(k)) == v for k, v in self.where)

    @property
    def forget_attributes(self) -> str:
        """The config's `forget_attributes` for this task ("colour=red"; "" for whole classes)."""
        return ";".join(f"{k}={v}" for k, v in self.where)

    def generate_kwargs(self) -> dict:
        """`synthetic.generate` arguments that draw only samples of this task's forget set."""
        kw = {"shapes": self.classes}
        kw.update({{"colour": "colours", "background": "backgrounds"}[k]: (v,) for k, v in self.where})
        return kw


DEMO_TASKS: Dict[str, DemoTask] = {
    "circle": DemoTask((DEMO_FORGET_CLASS,)),  # the demo: forget every circle
    "red-circle": DemoTask((DEMO_FORGET_CLASS,), (("colour", "red"),), breakdown="colour"),  # a subgroup only
    # Two more subgroups, so that the subgroup method's defaults are not tuned to one: another
    # colour of another class, and a subgroup cut by background rather than by the shape's colour.
    "blue-square": DemoTask(("square",), (("colour", "blue"),), breakdown="colour"),
    "star-on-black": DemoTask(("star",), (("background", "black"),), breakdown="background"),
}
_PRETRAIN_VERSION = "v3"  # bump when the generator, the loader order or the pretraining recipe changes


def demo_cache() -> Path:
    """Where the demo's data and pretrained model live: $CLIPERASE_CACHE or ./.cache/cliperase."""
    return Path(os.environ.get("CLIPERASE_CACHE", Path.cwd() / ".cache" / "cliperase"))


def prepare_demo(cache: Optional[Path] = None, *, say: Callable[[str], None] = print, progress: bool = True,
                 task: str = "circle") -> dict:
    """Generate the data and pretrain the teacher once; later calls reuse both.

    Returns {"data": root (eval/ a classification set with captions, eval_retrieval/ the same
    samples as CLIP_benchmark's retrieval set), "pretrained": checkpoint path, "forget": shards, "retain": shards,
    "calibration": a held-out CLIP_benchmark-layout split for choices made on data (the subgroup
    method's soup weight), or None, "audit": never-seen pairs for report.json's membership audit}. A `task` other than "circle" splits the same training pairs by
    its own rule (DEMO_TASKS) and has a calibration split; "circle" (the demo) keeps its data as it was.
    """
    if task not in DEMO_TASKS:
        raise ConfigError([f"task: unknown demo task {task!r}; available: {', '.join(DEMO_TASKS)}"])
    cache = Path(cache or demo_cache()) / _PRETRAIN_VERSION
    data = cache / "data"
    if not (data / "manifest.json").is_file():
        say(f"generating the embedded dataset in {data}")
        write_default(data, forget=lambda s: s.shape == DEMO_FORGET_CLASS, progress=say)
    if not (data / "eval_retrieval").is_dir():  # caches written before the retrieval folder existed
        write_retrieval_copy(data / "eval", data / "eval_retrieval")
    ckpt = cache / "tiny-clip-pretrained.pt"
    if not ckpt.is_file():
        say(f"pretraining tiny-clip from scratch (once; cached at {ckpt})")
        # Seed 1: 500 steps reach zero-shot circle / other-class accuracy 1.000 / 0.998 with it;
        # seed 0 reached 0.966 / 0.973 (the recipe's spread). A clean original makes the demo's
        # and the subgroup task's before/after comparison read plainly.
        pretrain(PretrainConfig(model="tiny-clip", train_data=str(data / "train"), output=str(ckpt), seed=1),
                 progress=progress)
    split = data
    if task != "circle":
        split = cache / "tasks" / task
        if not (split / "manifest.json").is_file():
            say(f"splitting the training pairs for task {task!r} into {split}")
            split_pairs(data / "train", split, forget=DEMO_TASKS[task].forgets)
    audit = split / "audit"
    if not audit.is_dir():
        _write_audit(audit, task)
    calibration = cache / "calibration" if task != "circle" else None
    if calibration is not None and not calibration.is_dir():
        tmp = calibration.with_name("calibration.partial")  # renamed into place when complete
        shutil.rmtree(tmp, ignore_errors=True)
        write_eval(generate(1440, _CALIBRATION_SEED, prefix="cal-"), tmp, SHAPES)
        tmp.rename(calibration)
    return {"data": data, "pretrained": ckpt, "forget": split / "forget", "retain": split / "retain",
            "calibration": calibration, "audit": audit}


def _write_audit(root: Path, task: str) -> None:
    """Never-seen pairs for the membership audit: the generator, forget rule and JPEG of the
    forget shards with other seeds, so that the only difference from the forget pairs is that no
    model was trained on these; non-members first, then the shadow pool (split_audit_pairs)."""
    tmp = root.with_name(root.name + ".partial")  # renamed into place when complete
    shutil.rmtree(tmp, ignore_errors=True)
    kwargs = DEMO_TASKS[task].generate_kwargs()
    write_pairs([s for name, seed in _AUDIT_SEEDS.items()
                 for s in generate(_AUDIT_PAIRS, seed, **kwargs, prefix=f"{name}-")], tmp)
    tmp.rename(root)


def demo_fields(cache: Optional[Path] = None, output_dir: str = "runs/demo", task: str = "circle",
                **overrides) -> dict:
    """The config keys of CLIPErase on the embedded default (data prepared first): forget every
    circle, keep the other shapes (or another of DEMO_TASKS, e.g. "red-circle": forget red
    circles, keep circles of other colours). Holds the options of whichever method uses them
    (the subgroup method's calibration split), for comparisons that run several methods."""
    paths = prepare_demo(cache, progress=overrides.pop("progress", True), task=task)
    data = paths["data"]
    fields = dict(
        model="tiny-clip",
        pretrained=str(paths["pretrained"]),
        forget_data=str(paths["forget"]),
        retain_data=str(paths["retain"]),
        eval_data=str(data / "eval"),
        audit_data=str(paths["audit"]),
        forget_classes=DEMO_TASKS[task].classes,
        forget_attributes=DEMO_TASKS[task].forget_attributes,
        method="cliperase",
        steps=60,
        batch_size=64,
        lr=5e-5,
        output_dir=output_dir,
        overwrite=True,  # the demo's own directory: re-running the demo replaces it
    )
    if paths["calibration"]:
        fields["calibration_data"] = str(paths["calibration"])
    fields.update(overrides)
    return fields


def demo_config(cache: Optional[Path] = None, output_dir: str = "runs/demo", task: str = "circle",
                **overrides) -> UnlearnConfig:
    """`demo_fields` as the config of its method (default cliperase)."""
    fields = demo_fields(cache, output_dir, task, **overrides)
    return UnlearnConfig.from_dict(keys_for(fields["method"], fields))
