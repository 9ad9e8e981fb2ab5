"""Data in the layouts users have.

- Training pairs: img2dataset webdataset shards (`{key}.jpg|png|webp`, `{key}.txt`, `{key}.json`),
  given as a directory of `.tar` files, a brace pattern (`shards/{00000..00099}.tar`), one file,
  or several specs joined with `::`.
- Evaluation sets: CLIP_benchmark's webdataset layout, a root with `classnames.txt`,
  `zeroshot_classification_templates.txt` and `test/{0..K-1}.tar` holding an image, `cls` and,
  for retrieval, `txt` captions (one per line).
"""
from __future__ import annotations

import io
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch
import webdataset as wds
from PIL import Image
from torch import Tensor

from .errors import ConfigError

__all__ = ["resolve_shards", "shard_problems", "PairStream", "EvalSet", "load_eval_set", "eval_set_problems", "SkipCounter"]

IMAGE_KEYS = "jpg;png;jpeg;webp"


def _expand(spec: str) -> List[str]:
    out: List[str] = []
    for part in str(spec).split("::"):
        p = Path(part)
        if p.is_dir():
            out.extend(sorted(str(x) for x in p.glob("*.tar")))
        else:
            out.extend(wds.shardlists.expand_urls(part))
    return out


def shard_problems(spec: Optional[str], what: str) -> List[str]:
    """Problems with a shard spec, without reading the shards."""
    if not spec:
        return [f"{what}: no shards given"]
    urls = _expand(spec)
    if not urls:
        return [f"{what}: {spec!r} matches no .tar shards"]
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        return [f"{what}: {len(missing)} of {len(urls)} shards do not exist: {shown}"]
    return []


def resolve_shards(spec: str, what: str) -> List[str]:
    problems = shard_problems(spec, what)
    if problems:
        raise ConfigError(problems)
    return _expand(spec)


@dataclass
class SkipCounter:
    """A webdataset error handler that skips bad samples and counts them by kind."""

    counts: Counter = field(default_factory=Counter)

    def __call__(self, exn: Exception) -> bool:
        self.counts[type(exn).__name__] += 1
        return True


class PairStream(torch.utils.data.IterableDataset):
    """Endless batches of (images, tokens) from image-caption shards, epoch after epoch.

    Deterministic in `seed`: epoch `e` shuffles shard order and samples with seed `seed + e`.
    Batches run across epoch boundaries, so a forget set smaller than the batch still works.
    Raises ConfigError when a whole epoch yields no usable sample.
    """

    def __init__(self, shards: Sequence[str], preprocess: Callable, tokenizer: Callable, batch_size: int,
                 *, seed: int = 0, shuffle_buffer: int = 1000, what: str = "data"):
        self.shards = list(shards)
        self.preprocess, self.tokenizer = preprocess, tokenizer
        self.batch_size, self.seed, self.shuffle_buffer, self.what = batch_size, seed, shuffle_buffer, what
        self.skipped = SkipCounter()

    def _epoch(self, epoch: int) -> Iterator[Tuple[Tensor, str]]:
        rng = random.Random(self.seed + epoch)
        shards = self.shards[:]
        rng.shuffle(shards)
        pipe = wds.DataPipeline(
            wds.SimpleShardList(shards),
            wds.tarfile_to_samples(handler=self.skipped),
            wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng),
            # Pick the two fields before decoding: autodecoding every key (json too) costs more
            # than the image decode itself on small images.
            wds.to_tuple(IMAGE_KEYS, "txt", handler=self.skipped),
            wds.map_tuple(self._image, _text, handler=self.skipped),
        )
        return iter(pipe)

    def _image(self, raw: bytes) -> Tensor:
        with Image.open(io.BytesIO(raw)) as im:
            return self.preprocess(im.convert("RGB"))

    def __iter__(self) -> Iterator[Tuple[Tensor, Tensor]]:
        epoch, images, texts = 0, [], []
        while True:
            seen = 0
            for image, text in self._epoch(epoch):
                seen += 1
                images.append(image)
                texts.append(text)
                if len(images) == self.batch_size:
                    yield torch.stack(images), self.tokenizer(texts)
                    images, texts = [], []
            if seen == 0:
                raise ConfigError([f"{self.what}: no usable samples in {len(self.shards)} shards "
                                   f"(skipped: {dict(self.skipped.counts) or 'none'})"])
            epoch += 1


def _text(raw: bytes) -> str:
    return raw.decode("utf-8").strip()


def loader(stream: "PairStream", workers: int) -> Iterator[Tuple[Tensor, Tensor]]:
    """Iterate a stream, decoding in a background process when `workers` is 1.

    One worker at most for now: a stream is one ordered sequence of batches, and the worker
    overlaps its decoding with the training step.
    """
    if workers == 0:
        return iter(stream)
    return iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=1, prefetch_factor=4,
                                            persistent_workers=False))


@dataclass
class EvalSet:
    """An evaluation set, read once: images preprocessed, labels, captions per image."""

    classnames: List[str]
    templates: List[str]
    images: Tensor  # (M, 3, H, W)
    labels: Optional[Tensor]  # (M,) int64, or None for a retrieval-only set
    captions: List[List[str]]  # per image; empty lists for a classification-only set


def eval_set_problems(root: Optional[str], what: str = "eval_data") -> List[str]:
    if not root:
        return [f"{what}: no evaluation set given"]
    r = Path(root)
    if not r.is_dir():
        return [f"{what}: {root!r} is not a directory (expected CLIP_benchmark's webdataset layout)"]
    if not list((r / "test").glob("*.tar")):
        return [f"{what}: no shards in {r / 'test'} (expected test/0.tar, ...)"]
    return []


def load_eval_set(root: str, preprocess: Callable) -> EvalSet:
    problems = eval_set_problems(root)
    if problems:
        raise ConfigError(problems)
    r = Path(root)
    classnames = _lines(r / "classnames.txt")
    templates = _lines(r / "zeroshot_classification_templates.txt") or ["a photo of a {c}."]
    shards = sorted((r / "test").glob("*.tar"), key=lambda p: (len(p.stem), p.stem))
    images, labels, captions = [], [], []
    pipe = wds.DataPipeline(wds.SimpleShardList([str(s) for s in shards]), wds.tarfile_to_samples(), wds.decode("pilrgb"))
    for sample in pipe:
        image = next((sample[k] for k in IMAGE_KEYS.split(";") if k in sample), None)
        if image is None:
            continue
        images.append(preprocess(image))
        if "cls" in sample:
            labels.append(int(sample["cls"]))
        captions.append([c for c in str(sample.get("txt", "")).splitlines() if c.strip()])
    if not images:
        raise ConfigError([f"eval_data: no images in {len(shards)} shards under {r / 'test'}"])
    if labels and len(labels) != len(images):
        raise ConfigError([f"eval_data: {len(images) - len(labels)} of {len(images)} samples have no 'cls' label"])
    return EvalSet(classnames, templates, torch.stack(images), torch.tensor(labels) if labels else None, captions)


def _lines(path: Path) -> List[str]:
    if not path.is_file():
        return []
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]
