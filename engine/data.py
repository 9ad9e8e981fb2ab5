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
import logging
import os
import random
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import webdataset as wds
from PIL import Image
from torch import Tensor

from .errors import ConfigError

__all__ = ["resolve_shards", "shard_problems", "PairStream", "EvalSet", "load_eval_set", "eval_set_problems", "SkipCounter",
           "SKIP_KINDS", "ShardReader", "decode_image"]

log = logging.getLogger("cliperase.data")

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


# ---------------------------------------------------------------------------------------------
# Robust shard reading: one shard at a time, bad data skipped and counted by kind.

# Every kind a ShardReader counts; reported as a dict with all of them, zeros included, so a
# report reader can tell "none of this kind" from "not checked".
SKIP_KINDS = (
    "unreadable_shard",  # the shard could not be opened as a tar, even after retries
    "truncated_tar",  # the tar ends inside a member or without its end-of-archive block
    "corrupt_tar",  # a damaged header in the middle of a tar; the rest of the shard is lost
    "missing_image",  # a sample without jpg/png/jpeg/webp
    "corrupt_image",  # an image that does not decode
    "missing_caption",  # a sample without txt, or with an empty one
    "corrupt_caption",  # a txt that is not UTF-8
)
_IMAGE_EXTS = tuple(IMAGE_KEYS.split(";"))
_BLOCK = tarfile.BLOCKSIZE
_CHECKS = ("none", "draft", "decode")


def decode_image(raw: bytes, *, draft: bool = False) -> Image.Image:
    """Decode image bytes fully into an RGB PIL image.

    With `draft`, JPEGs decode at 1/8 scale (libjpeg's DCT scaling): every byte of the entropy
    coded data is still read, so truncated or garbled files fail, at a fraction of the cost.
    Raises OSError (PIL.UnidentifiedImageError is one) or ValueError / SyntaxError (from some
    PIL plugins) when the bytes are not a decodable image; PIL.Image.DecompressionBombError for
    images over PIL's pixel limit.
    """
    im = Image.open(io.BytesIO(raw))
    if draft:
        im.draft("RGB", (1, 1))
    im.load()
    return im.convert("RGB")


def _split_name(name: str) -> Tuple[str, str]:
    """`dir/key.ext.more` -> (`dir/key`, `ext.more`): the key ends at the first dot of the base
    name, the rule webdataset and img2dataset use, so keys with dots in extensions group right."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), (ext.lower() if dot else "")


class _BadEnd(Exception):
    """Internal: a tar that iterated to its end quietly but is damaged there; `kind` is
    "truncated_tar" or "corrupt_tar" and the message says where."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class ShardReader(torch.utils.data.IterableDataset):
    """Samples of image-caption shards, read one shard at a time, never all in memory; bad data
    is skipped and counted in `skipped` by kind (see SKIP_KINDS), never raised.

    Yields webdataset-style dicts: `__key__` (str), `__url__` (the shard path), `__shard__` (its
    index in `shards`) and one entry per file of the sample, extension -> bytes exactly as
    stored (`jpg`, `txt`, `json`, ...). With `check_images="decode"` the decoded RGB image is
    added as `__image__` (a PIL image), so a consumer need not decode it twice. An
    IterableDataset, so it can be the source of a `webdataset.DataPipeline`; it does not split
    shards between DataLoader workers (every worker would read them all), and its counts live
    in the process that iterates it.

    What is skipped:
      - a shard that cannot be opened (unreadable, not a tar) is retried `retries` times with
        exponential backoff from `backoff_s` (a missing file is not retried), then skipped
        with one warning and counted once as `unreadable_shard`; its path and reason go to
        `bad_shards`;
      - a tar that ends early is counted once as `truncated_tar` (or `corrupt_tar` for a damaged
        header); the complete samples before the damage are kept, the one in progress dropped;
      - samples without an image or caption, with an image that does not decode (unless
        `check_images="none"`), or with a non-UTF-8 caption, each counted by kind.

    Shards are opened read-only and never written. `check_images`: "none" (trust the bytes),
    "draft" (JPEGs decoded at 1/8 scale, other formats fully; the default) or "decode" (full
    decode, image attached). Raises ValueError for an unknown `check_images` or negative
    `retries`/`backoff_s`.
    """

    def __init__(self, shards: Sequence[str], *, check_images: str = "draft", retries: int = 2,
                 backoff_s: float = 0.5):
        if check_images not in _CHECKS:
            raise ValueError(f"check_images: expected one of {list(_CHECKS)}, got {check_images!r}")
        if retries < 0 or backoff_s < 0:
            raise ValueError(f"retries and backoff_s: expected >= 0, got {retries} and {backoff_s}")
        self.shards = [str(s) for s in shards]
        self.check_images, self.retries, self.backoff_s = check_images, retries, backoff_s
        self.skipped: Counter = Counter({k: 0 for k in SKIP_KINDS})
        self.bad_shards: Dict[str, str] = {}  # shard path -> what was wrong with it
        self.samples = 0  # samples yielded so far

    def skip_counts(self) -> Dict[str, int]:
        """Counts by kind, every kind of SKIP_KINDS present (zeros included)."""
        return {k: int(self.skipped[k]) for k in SKIP_KINDS}

    def __iter__(self) -> Iterator[dict]:
        for index, url in enumerate(self.shards):
            yield from self._shard(index, url)

    def _open(self, url: str):
        """Open a shard as a streaming tar, retrying; None (after counting it) when it cannot be."""
        last: Optional[BaseException] = None
        attempts = 0
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            f = None
            attempts += 1
            try:
                f = open(url, "rb")
                # Streaming mode reads forward only: no seeks, the access pattern of a pipe or an
                # object store, and memory bounded by one member. Opening reads the first header,
                # so a file that is not a tar fails here, not mid-iteration.
                return f, tarfile.open(fileobj=f, mode="r|")
            except (OSError, tarfile.TarError) as exc:  # missing, permission, I/O, not a tar
                last = exc
                if f is not None:
                    f.close()
                if isinstance(exc, FileNotFoundError):
                    # img2dataset leaves gaps in a brace range for shards it failed to write;
                    # waiting does not fill them, and hundreds of gaps would cost minutes.
                    break
        reason = f"{type(last).__name__}: {last}"
        log.warning("skipping shard %s after %d attempt(s): %s", url, attempts, reason)
        self.skipped["unreadable_shard"] += 1
        self.bad_shards[url] = reason
        return None

    def _shard(self, index: int, url: str) -> Iterator[dict]:
        opened = self._open(url)
        if opened is None:
            return
        f, tar = opened
        current: Optional[dict] = None
        try:
            try:
                for member in tar:
                    if not member.isreg():
                        continue
                    key, ext = _split_name(member.name)
                    if key.startswith("__") or not ext:  # webdataset's own metadata entries
                        continue
                    if current is not None and current["__key__"] != key:
                        # A new key: the previous sample is complete, before this member's
                        # data is read (and can fail).
                        yield from self._finish(current)
                        current = None
                    if current is None:
                        current = {"__key__": key, "__url__": url, "__shard__": index}
                    current[ext] = tar.extractfile(member).read()
                self._check_end(url, tar.offset)
            except (tarfile.TarError, EOFError, OSError, _BadEnd) as exc:
                # The sample being read when the stream broke may lack files: drop it. Python's
                # tarfile reports data cut short as ReadError("unexpected end of data").
                current = None
                kind = exc.kind if isinstance(exc, _BadEnd) else "truncated_tar"
                log.warning("shard %s: %s (%s); keeping the samples before it", url, kind.replace("_", " "), exc)
                self.skipped[kind] += 1
                self.bad_shards[url] = f"{kind}: {exc}"
            if current is not None:
                yield from self._finish(current)
        finally:
            tar.close()
            f.close()

    @staticmethod
    def _check_end(url: str, offset: int) -> None:
        """Python's tarfile ends iteration quietly at a short or damaged header past the first
        member; a complete tar has a zero block where the members end. Raises _BadEnd if not."""
        try:
            size = os.path.getsize(url)
            with open(url, "rb") as f:
                f.seek(offset)
                block = f.read(_BLOCK)
        except OSError as exc:
            raise _BadEnd("truncated_tar", f"cannot re-read the end: {exc}") from exc
        if len(block) < _BLOCK:
            raise _BadEnd("truncated_tar", f"no end-of-archive block after byte {offset} of {size}")
        if block.count(0) != _BLOCK:
            raise _BadEnd("corrupt_tar", f"damaged header at byte {offset}")

    def _finish(self, sample: dict) -> Iterator[dict]:
        image_ext = next((e for e in _IMAGE_EXTS if e in sample), None)
        if image_ext is None:
            self.skipped["missing_image"] += 1
            return
        raw_text = sample.get("txt")
        if raw_text is None:
            self.skipped["missing_caption"] += 1
            return
        try:
            if not raw_text.decode("utf-8").strip():
                self.skipped["missing_caption"] += 1
                return
        except UnicodeDecodeError:
            self.skipped["corrupt_caption"] += 1
            return
        if self.check_images != "none":
            try:
                image = decode_image(sample[image_ext], draft=self.check_images == "draft")
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
                self.skipped["corrupt_image"] += 1
                return
            if self.check_images == "decode":
                sample["__image__"] = image
        self.samples += 1
        yield sample
