"""Evaluation sets in CLIP_benchmark's webdataset layout: a root with `test/{0..K-1}.tar` (and
`test/nshards.txt`, which CLIP_benchmark requires) holding an image, `cls` and/or `txt` captions
(one per line), `{key}.json` attributes when present; `classnames.txt` and
`zeroshot_classification_templates.txt` for classification; `dataset_type.txt` saying
"retrieval" for a retrieval set (absent: classification, as CLIP_benchmark assumes).

CLIP_benchmark reads a folder for one task only: a classification folder's `txt` captions are
ignored there, a retrieval folder's labels and class names too. cliperase scores every task the
samples allow, except classification on a folder typed retrieval (see engine/eval/metrics.py
TASKS); the labels of a retrieval folder still decide its forget part. Read once, through the
engine's one tar reader."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, List, Optional

if TYPE_CHECKING:
    from torch import Tensor

from ..errors import ConfigError
from ..lazy import lazy_import
from .tar import DECODE_ERRORS, IMAGE_EXTS, ShardReader, decode_image

__all__ = ["EvalSet", "EvalRecord", "DATASET_TYPES", "classnames", "dataset_type", "eval_records", "eval_set_problems",
           "eval_shards", "load_eval_set"]

torch = lazy_import("torch")  # only load_eval_set needs it; the checks run before torch is imported

DEFAULT_TEMPLATES = ["a photo of a {c}."]
DATASET_TYPES = ("classification", "retrieval")  # of CLIP_benchmark's wds types, the ones cliperase reads


@dataclass
class EvalSet:
    """An evaluation set, read once: images preprocessed, labels, captions and attributes per image."""

    classnames: List[str]
    templates: List[str]
    images: Tensor  # (M, 3, H, W)
    labels: Optional[Tensor]  # (M,) int64, or None for a retrieval-only set
    captions: List[List[str]]  # per image; empty lists for a classification-only set
    attributes: Optional[List[dict]] = None  # per image, its decoded {key}.json ({} without one)
    dataset_type: str = "classification"  # the folder's dataset_type.txt (one of DATASET_TYPES)


def dataset_type(root: str) -> str:
    """The folder's `dataset_type.txt`, stripped and lower-cased as CLIP_benchmark reads it;
    "classification" without one. Not checked against DATASET_TYPES (eval_set_problems does)."""
    path = Path(root) / "dataset_type.txt"
    return path.read_text().strip().lower() if path.is_file() else "classification"


def eval_set_problems(root: Optional[str], what: str = "eval_data") -> List[str]:
    if not root:
        return [f"{what}: no evaluation set given"]
    r = Path(root)
    if not r.is_dir():
        return [f"{what}: {root!r} is not a directory (expected CLIP_benchmark's webdataset layout)"]
    if not list((r / "test").glob("*.tar")):
        return [f"{what}: no shards in {r / 'test'} (expected test/0.tar, ...)"]
    kind = dataset_type(root)
    if kind not in DATASET_TYPES:
        return [f"{what}: {r / 'dataset_type.txt'} says {kind!r}; cliperase reads {' or '.join(DATASET_TYPES)} sets"]
    return []


def eval_shards(root: str) -> List[Path]:
    """The set's shards in CLIP_benchmark's order: test/0.tar, test/1.tar, ..., test/10.tar."""
    return sorted((Path(root) / "test").glob("*.tar"), key=lambda p: (len(p.stem), p.stem))


@dataclass
class EvalRecord:
    """One image-carrying sample of an evaluation set, its image still encoded."""

    sample: dict  # the tar members, the image under `ext`
    ext: str
    label: Optional[int]  # `cls`, None without one
    captions: List[str]  # `txt`, one per non-blank line
    attributes: dict  # the decoded `{key}.json`, {} without one


def eval_records(root: str, retries: int = 2) -> Iterator[EvalRecord]:
    """The set's samples in CLIP_benchmark's order, those without an image passed over as its
    loader does; images are not decoded, so the input checks read them as cheaply as the loader."""
    reader = ShardReader([str(s) for s in eval_shards(root)], check_images="none", check_samples=False,
                         retries=retries)
    for sample in reader:
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None:
            continue
        text = sample.get("txt", b"").decode("utf-8", "replace")
        yield EvalRecord(sample, ext, int(sample["cls"]) if "cls" in sample else None,
                         [c for c in text.splitlines() if c.strip()],
                         json.loads(sample["json"]) if "json" in sample else {})


def classnames(root: str) -> List[str]:
    """The class names of `root/classnames.txt`, one per non-blank line; [] without the file."""
    return _lines(Path(root) / "classnames.txt")


def load_eval_set(root: str, preprocess: Callable) -> EvalSet:
    """Read an evaluation set (raises ConfigError naming what is wrong with it). Samples without
    an image are passed over, as CLIP_benchmark's loader does."""
    problems = eval_set_problems(root)
    if problems:
        raise ConfigError(problems)
    r = Path(root)
    images, labels, captions, attributes = [], [], [], []
    for rec in eval_records(root):
        try:
            images.append(preprocess(decode_image(rec.sample[rec.ext])))
        except DECODE_ERRORS as exc:
            raise ConfigError([f"eval_data: image {rec.sample['__key__']!r} of {rec.sample['__url__']} does not "
                               f"decode ({type(exc).__name__}: {exc})"]) from exc
        if rec.label is not None:
            labels.append(rec.label)
        captions.append(rec.captions)
        attributes.append(rec.attributes)
    shards = eval_shards(root)
    if not images:
        raise ConfigError([f"eval_data: no images in {len(shards)} shards under {r / 'test'}"])
    if labels and len(labels) != len(images):
        raise ConfigError([f"eval_data: {len(images) - len(labels)} of {len(images)} samples have no 'cls' label"])
    kind = dataset_type(root)
    if kind == "retrieval" and not any(captions):
        raise ConfigError([f"eval_data: {r} is a retrieval set (dataset_type.txt) but its samples carry no 'txt' captions"])
    return EvalSet(classnames(root), _lines(r / "zeroshot_classification_templates.txt") or DEFAULT_TEMPLATES,
                   torch.stack(images), torch.tensor(labels) if labels else None, captions, attributes, kind)


def _lines(path: Path) -> List[str]:
    if not path.is_file():
        return []
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]
