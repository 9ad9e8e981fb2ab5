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
import random
import signal
import re
import struct
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar
from zlib import adler32

import torch
import webdataset as wds
from PIL import Image
from torch import Tensor

from .config import DATA_SPLITS
from .errors import ConfigError
from .preprocess import FastPreprocess, FastTokenizer

__all__ = ["resolve_shards", "shard_problems", "PairStream", "EvalSet", "load_eval_set", "eval_set_problems", "SkipCounter",
           "SKIP_KINDS", "ShardReader", "decode_image", "Batches", "loader", "split_preprocess"]

log = logging.getLogger("cliperase.data")
T = TypeVar("T")

IMAGE_KEYS = "jpg;png;jpeg;webp"
# split="auto" reads by shard from this many shards a reader per epoch: below it, readers' epochs
# (a few shards each) would differ by a large fraction, and a one-shard forget set must still split.
SHARDS_PER_READER = 4


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
    """Endless batches of (images, tokens, position) from image-caption shards, epoch after epoch.

    Order: epoch `e` reads the shards in an order shuffled with seed `seed + e` (`resampled`:
    as many shards drawn with replacement with that seed, webdataset's resampled mode, so a
    "round" is not an epoch) and shuffles samples through a `shuffle_buffer`; that raw sequence depends only on the seed and the shard
    list. Ranks and DataLoader workers (reader `rank * workers + worker` of `world * workers`)
    see disjoint samples, and together every sample once per epoch, split one of two ways
    (`split`, default "auto": by shard when every reader gets at least SHARDS_PER_READER shards):
    - "sample": samples are numbered along the raw sequence across epochs and sample `g` belongs
      to reader `g % readers`. Every reader reads the tar bytes of all shards and decodes only its
      own samples, so this holds for any number of shards (a one-shard forget set), and one
      process with `world * batch_size` rows per batch sees the same samples per step as `world`
      ranks with `batch_size` each (in another row order). The reads grow with the readers.
    - "shard": reader r reads only shards r, r + readers, ... of the epoch's shuffled list and
      shuffles its own samples: each byte is read once per epoch, whatever the number of readers
      (a CC12M-size corpus on 8 GPUs x 8 workers), and readers' epochs differ by up to a shard.
    Batches run across epoch boundaries.

    Bad data is skipped, never raised (see SKIP_KINDS): each reader counts its own bad samples
    in the first epoch; damaged or vanished shards are counted once each: by reader 0 ("sample",
    over the whole run) or by the reader that read them in the first epoch ("shard"; a shard
    that vanishes later is skipped with a warning but not counted).

    `position` (a dict) says where this reader is after the batch: what `start` takes back
    (through `Batches.state()`) to continue the stream where it stopped, on resume. Its "ids"
    entry identifies the batch's samples (`Batches.last_ids`): a teacher cache looks them up.
    Raises ConfigError when an epoch holds no usable sample (or a reader finds none of its own
    in three epochs).
    """

    def __init__(self, shards: Sequence[str], preprocess: Callable, tokenizer: Callable, batch_size: int,
                 *, seed: int = 0, shuffle_buffer: int = 1000, what: str = "data", rank: int = 0, world: int = 1,
                 start: Optional[dict] = None, resampled: bool = False, split: str = "auto"):
        if not 0 <= rank < world:
            raise ValueError(f"rank: expected 0 <= rank < world ({world}), got {rank}")
        if split not in DATA_SPLITS:
            raise ValueError(f"split: expected one of {list(DATA_SPLITS)}, got {split!r}")
        self.shards = list(shards)
        self.preprocess = preprocess
        # open_clip's preprocess split: uint8 pixels here (in the loader worker), the float
        # conversion and normalisation where the model is (Batches); None when it cannot be split.
        self.fast = split_preprocess(preprocess)
        self.tokenizer = FastTokenizer(tokenizer)  # open_clip's tokens, exactly, at a tenth of the time
        self.batch_size, self.seed, self.shuffle_buffer, self.what = batch_size, seed, shuffle_buffer, what
        self.rank, self.world, self.start, self.resampled, self.split = rank, world, start, resampled, split

    def by_shard(self, readers: int) -> bool:
        """Whether `readers` readers split this stream by shard (else by sample; one reader has
        nothing to split and reads as "sample" does)."""
        if readers == 1:
            return False
        if self.split == "auto":
            return len(self.shards) >= SHARDS_PER_READER * readers
        return self.split == "shard"

    def _raw(self, epoch: int, reader: ShardReader, part: Optional[Tuple[int, int]] = None) -> Iterator[dict]:
        """Epoch `epoch`'s raw samples in their shuffled order (tar-level damage skipped); `part`
        = (reader, readers): only that reader's shards of the epoch's order."""
        rng = random.Random(self.seed + epoch)
        if self.resampled:  # as many shards drawn with replacement: no epochs, for corpora too big for one
            shards = rng.choices(self.shards, k=len(self.shards))
        else:
            shards = self.shards[:]
            rng.shuffle(shards)
        if part is not None:
            shards = shards[part[0]::part[1]]
            rng = random.Random(f"{self.seed + epoch}/{part[0]}")  # each reader its own sample shuffle
        reader.shards = shards
        return _shuffled(iter(reader), self.shuffle_buffer, rng)

    def _add(self, sample: dict, images: list, batch: Optional[Tensor], n: int) -> Optional[str]:
        """Put the sample's image at row `n` of `batch` (fast path) or append it to `images`;
        returns the skip kind of a sample that has none usable, else None."""
        if batch is not None:
            return sample_image(sample, lambda raw: self.fast.cpu_into(raw, batch, n))[1]
        image, kind = sample_image(sample, lambda raw: self.preprocess(decode_image(raw)))
        if kind is None:
            images.append(image)
        return kind

    def __iter__(self) -> Iterator[Tuple[Tensor, Tensor, dict]]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        start = self.start or {}
        if start and start.get("workers", workers) != workers:
            raise ConfigError([f"{self.what}: the stream was saved with {start['workers']} data workers per rank, "
                               f"now {workers}: resume with the same number"])
        # After `consumed` batches the consumer expects the next one from the reader whose turn
        # it is; the DataLoader starts at worker 0, so worker w takes that reader's role.
        role = (worker + int(start.get("consumed", 0))) % workers
        pos = dict(start.get("readers", {}).get(str(role), {}))
        epoch, index, seen = pos.get("epoch", 0), pos.get("index", 0), pos.get("seen", 0)
        skipped = Counter(pos.get("skipped", {}))
        bad_shards = dict(pos.get("bad_shards", {}))  # shard path -> skip kind, kept by the reader that counts it
        readers, me = self.world * workers, self.rank * workers + role
        by_shard = self.by_shard(readers)
        reader = ShardReader([], check_images="none", check_samples=False)
        images: List[Tensor] = []
        texts: List[str] = []
        ids: List[Tuple[int, int]] = []
        # Made here, in the worker: empty_batch then allocates in shared memory (no copy to hand it over).
        batch = self.fast.empty_batch(self.batch_size) if self.fast else None
        shard_ids = {url: i for i, url in enumerate(self.shards)}
        idle_epochs = 0
        while True:
            total = taken = 0
            raw = self._raw(epoch, reader, (me, readers) if by_shard else None)
            for _ in range(index):  # resume: skip what was consumed, without decoding it
                next(raw, None)
                total += 1
            for sample in raw:
                total += 1
                index += 1
                seen += 1
                if not by_shard and (seen - 1) % readers != me:
                    continue
                kind = self._add(sample, images, batch, len(texts))
                if kind is not None:
                    if epoch == 0:
                        skipped[kind] += 1
                    continue
                taken += 1
                texts.append(sample["txt"].decode("utf-8").strip())
                ids.append((shard_ids[sample["__url__"]], sample["__ordinal__"]))
                if len(texts) == self.batch_size:
                    if (epoch == 0) if by_shard else (me == 0):  # who counts damaged shards: see the docstring
                        bad_shards.update({url: _shard_kind(why) for url, why in reader.bad_shards.items()})
                    counts = skipped + Counter(bad_shards.values())
                    position = {"role": role, "epoch": epoch, "index": index, "seen": seen,
                                "skipped": {k: counts[k] for k in SKIP_KINDS if counts[k]},
                                "bad_shards": bad_shards}
                    position["ids"] = torch.tensor(ids, dtype=torch.int64)
                    yield (batch if batch is not None else torch.stack(images)), self.tokenizer(texts), position
                    images, texts, ids = [], [], []
                    batch = self.fast.empty_batch(self.batch_size) if self.fast else None
            if by_shard and epoch == 0:  # the first epoch's damaged shards read after its last batch
                bad_shards.update({url: _shard_kind(why) for url, why in reader.bad_shards.items()})
            if total == 0 and not by_shard:  # by shard, one reader's few shards may all be damaged: idle
                raise ConfigError([f"{self.what}: no samples in {len(self.shards)} shards "
                                   f"(skipped: {dict(+skipped) or 'none'}; bad shards: {reader.bad_shards or 'none'})"])
            idle_epochs = 0 if taken else idle_epochs + 1
            if idle_epochs == 3:
                raise ConfigError([f"{self.what}: no usable samples in {len(self.shards)} shards over three epochs "
                                   f"(skipped: {dict(+skipped) or 'none'})"])
            epoch, index = epoch + 1, 0


def _shard_kind(reason: str) -> str:
    """The skip kind of a ShardReader.bad_shards reason ("truncated_tar: ..." or "OSError: ...")."""
    kind = reason.split(":")[0]
    return kind if kind in SKIP_KINDS else "unreadable_shard"


def _shuffled(items: Iterator, bufsize: int, rng: random.Random) -> Iterator:
    """Reservoir shuffle: fill a buffer of `bufsize`, then emit a random element per new item.
    Owned here (not webdataset's) so a saved stream position means the same samples across
    library versions."""
    buf: list = []
    for item in items:
        if len(buf) < bufsize:
            buf.append(item)
            continue
        j = rng.randrange(len(buf))
        buf[j], item = item, buf[j]
        yield item
    rng.shuffle(buf)
    yield from buf


class Batches:
    """The consumer's end of a PairStream: iterates (images, tokens) and tracks where the
    stream is. `state()` is what `PairStream(start=...)` takes to continue after the last batch
    taken (JSON-able); `skipped()` the bad-sample counts of this rank's readers so far."""

    def __init__(self, it: Iterator[Tuple[Tensor, Tensor, dict]], workers: int, start: Optional[dict],
                 finish: Callable[[Tensor], Tensor]):
        self._it, self.workers, self._finish = it, workers, finish
        self.consumed = int((start or {}).get("consumed", 0))
        self.readers: Dict[str, dict] = {k: dict(v) for k, v in (start or {}).get("readers", {}).items()}
        # (B, 2) int64 of the last batch: each sample's (index in the stream's shard list, __ordinal__)
        self.last_ids: Optional[Tensor] = None

    def __iter__(self) -> "Batches":
        return self

    def __next__(self) -> Tuple[Tensor, Tensor]:
        try:
            images, tokens, position = next(self._it)
        except ConfigError as exc:
            # From a DataLoader worker the message is wrapped in the worker's traceback: keep
            # what the stream said.
            marker = "ConfigError: "
            text = str(exc)
            if "DataLoader worker" in text and marker in text:
                raise ConfigError(text[text.rindex(marker) + len(marker):].strip().splitlines()) from None
            raise
        self.last_ids = position.pop("ids")
        self.readers[str(position.pop("role"))] = position
        self.consumed += 1
        return self._finish(images), tokens

    def state(self) -> dict:
        return {"workers": self.workers, "consumed": self.consumed, "readers": {k: dict(v) for k, v in self.readers.items()}}

    def skipped(self) -> Dict[str, int]:
        total: Counter = Counter()
        for position in self.readers.values():
            total.update(position.get("skipped", {}))
        return {k: int(total[k]) for k in SKIP_KINDS}


def _leave_signals(worker_id: int) -> None:
    """Ctrl-C reaches the workers too (the terminal signals the whole process group); they would
    stop and the run fail mid-step instead of saving its checkpoint. The main process answers it
    and shuts its workers down. SIGTERM keeps its default: it is how a parent ends its workers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def split_preprocess(preprocess: Callable) -> Optional[FastPreprocess]:
    """open_clip's eval preprocess as a FastPreprocess (bit-identical up to JPEG draft decoding of
    images over twice the target size; see engine/preprocess.py), or None for one it cannot
    split (training augmentations, a plain function): then the loader runs it whole."""
    try:
        fast = FastPreprocess.from_open_clip(preprocess)
    except (ValueError, TypeError, AttributeError):
        return None
    return fast if fast.image_size is not None else None


def loader(stream: "PairStream", workers: int, *, pin_memory: bool = False,
           device: Optional[torch.device] = None) -> Batches:
    """Iterate a stream in `workers` background processes (0: in this process), each decoding
    its own share of the samples (see PairStream), batches handed out in a fixed round-robin
    order, so the sequence of batches depends on the seed, world size and `workers`, nothing
    else. The stream's `start` position (on resume) must come from the same worker count.
    Images come out as float32 on `device` (default CPU), normalised there: the workers send
    uint8 pixels, a quarter of the bytes."""
    device = torch.device(device or "cpu")
    if stream.fast is not None:
        finish = lambda x: stream.fast.device(x.to(device, non_blocking=True))  # noqa: E731
    else:
        finish = lambda x: x.to(device, non_blocking=True)  # noqa: E731
    saved = (stream.start or {}).get("workers", max(workers, 1))
    if saved != max(workers, 1):
        raise ConfigError([f"{stream.what}: the stream was saved with {saved} data workers per rank, now "
                           f"{max(workers, 1)}: resume with the same number"])
    if workers == 0:
        return Batches(iter(stream), 1, stream.start, finish)
    dl = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers, prefetch_factor=4,
                                     persistent_workers=False, pin_memory=pin_memory, worker_init_fn=_leave_signals)
    return Batches(iter(dl), workers, stream.start, finish)


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
_CHUNK = 1 << 20  # shard reads: 1 MB each, headers and members are then copies out of the buffer
_ZEROS = bytes(_BLOCK)
_REGULAR = frozenset(b"07\0")  # tar types: regular file, contiguous file, old-style regular file
_NO_DATA = frozenset(b"123456")  # hard link, symlink, character / block device, directory, fifo
_PAX_RECORD = re.compile(rb"(\d+) ([^=]+)=")  # tarfile's: "%d %s=%s\n" % (length, keyword, value)
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
    """Internal: damage found while reading a tar; `kind` is "truncated_tar" or "corrupt_tar"
    and the message says where. `member`: the regular file whose header was whole but whose
    data was cut short, else None."""

    def __init__(self, kind: str, message: str, member: Optional[str] = None):
        super().__init__(message)
        self.kind, self.member = kind, member


def _number(field: bytes) -> int:
    """A numeric tar header field as tarfile reads it: octal digits up to a NUL (blanks around
    them allowed, none = 0), or base-256 when the first byte is 0x80 (0xff: negative). Raises
    ValueError for anything else."""
    if field[0] in (0x80, 0xFF):
        n = int.from_bytes(field[1:], "big")
        return n - 256 ** (len(field) - 1) if field[0] == 0xFF else n
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _checked_size(block: bytes, at: int) -> int:
    """The member size of a header that failed _tar_files's fast checks, by tarfile's rules:
    the stored checksum in any form tarfile accepts, against the unsigned or the signed byte
    sum (some old tars sum signed chars); the size in octal or base-256. Raises
    _BadEnd("corrupt_tar") when the header is damaged."""
    try:
        stored = _number(block[148:156])
    except ValueError:
        stored = None
    if stored not in (256 + sum(struct.unpack_from("148B8x356B", block)),
                      256 + sum(struct.unpack_from("148b8x356b", block))):
        raise _BadEnd("corrupt_tar", f"damaged header at byte {at} (bad checksum)")
    try:
        size = _number(block[124:136])
    except ValueError:
        size = -1
    if size < 0:
        raise _BadEnd("corrupt_tar", f"damaged header at byte {at} (size field {block[124:136]!r})")
    return size


def _pax_records(data: bytes, at: int) -> Dict[str, str]:
    """The records of a pax extended header, parsed as tarfile parses them (UTF-8; bytes that
    are not UTF-8 kept as surrogates). Raises _BadEnd("corrupt_tar") for a record of length 0."""
    records: Dict[str, str] = {}
    pos = 0
    while True:
        match = _PAX_RECORD.match(data, pos)
        if match is None:
            return records
        length = int(match.group(1))
        if length == 0:
            raise _BadEnd("corrupt_tar", f"damaged pax header at byte {at}")
        value = data[match.end(2) + 1:match.start(1) + length - 1]
        records[match.group(2).decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length


def _read_up_to(read: Callable[[int], bytes], n: int) -> bytes:
    """`n` bytes, fewer where the stream ends first. Over _CHUNK it reads in pieces: a read(n)
    allocates n bytes first, and a damaged size field can claim gigabytes."""
    if n <= _CHUNK:
        return read(n)
    parts = []
    while n > 0:
        part = read(min(n, _CHUNK))
        if not part:
            break
        parts.append(part)
        n -= len(part)
    return b"".join(parts)


def _tar_files(read: Callable[[int], bytes]) -> Iterator[Tuple[str, bytes]]:
    """(name, bytes) of each regular file of the tar stream that `read(n)` reads, in order.

    A streaming ustar / pax / GNU reader, forward only (no seeks: a pipe or an object store is
    read the same way), which gets each member from a few slices of its 512-byte header. It
    replaces Python's tarfile here, which parses every field of every header in Python: 40% of
    the loader's time at 32 px (webdataset writes a pax header before each member, so three
    files per sample are six headers). Names and sizes come out as tarfile reads them (ustar
    prefix, pax `path` and `size`, GNU long names, undecodable bytes kept as surrogates).
    Directories, links, devices, fifos, sparse files, pax global headers and unknown types are
    passed over.

    The archive ends at its first all-zero block, as in tarfile. Raises _BadEnd:
    "truncated_tar" when the stream ends before it (inside a header, an extended header, member
    data or padding, or where a header should be); "corrupt_tar" for a header with a bad
    checksum or size field, a pax record of length 0, or extended headers with no member after.
    """
    at = 0  # byte offset of the next header, for messages
    long_name: Optional[str] = None  # for the next member, from a pax `path` or a GNU 'L' entry
    long_size: Optional[int] = None  # for the next member, from a pax `size`
    sparse = False  # pax GNU.sparse.* records: the next member is a sparse file
    pending = False  # extended headers wait for their member
    while True:
        block = read(_BLOCK)
        if len(block) != _BLOCK:
            what = f"header cut short at byte {at + len(block)}" if block else f"no end-of-archive block at byte {at}"
            raise _BadEnd("truncated_tar", what)
        # Fast path: octal size and checksum, the unsigned byte sum from zlib's adler32 (its low
        # 16 bits are 1 + the byte sum mod 65521, and half a block sums to at most 65,280).
        try:
            size = int(block[124:136].split(b"\0", 1)[0], 8)
            ok = size >= 0 and int(block[148:156].split(b"\0", 1)[0], 8) == \
                (adler32(block[:256]) & 0xFFFF) + (adler32(block[256:]) & 0xFFFF) + 254 - sum(block[148:156])
        except ValueError:
            ok = False
        if not ok:
            if block == _ZEROS:
                if pending:
                    raise _BadEnd("corrupt_tar", f"extended header with no member after it, at byte {at}")
                return
            size = _checked_size(block, at)
        kind = block[156]
        header_at = at
        at += _BLOCK
        padded = -(-size // _BLOCK) * _BLOCK
        if kind in b"xXLgK":  # pax extended ('X': Solaris), GNU long name, pax global, GNU long link
            data = _read_up_to(read, padded)
            at += len(data)
            if len(data) != padded:
                raise _BadEnd("truncated_tar", f"extended header cut short at byte {at}")
            pending = True
            if kind == 0x4C:  # 'L'
                if long_name is None:  # of several, the first wins, as in tarfile
                    long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            elif kind in b"xX" and (b"path=" in data or b"size=" in data or b"GNU.sparse." in data):
                # (webdataset's pax headers hold only an mtime: they are not parsed at all)
                records = _pax_records(data, header_at)
                if long_name is None and "path" in records:
                    long_name = records["path"].rstrip("/")
                if long_size is None and "size" in records:
                    try:
                        long_size = int(records["size"])
                    except ValueError:
                        long_size = 0
                sparse = sparse or any(k.startswith("GNU.sparse.") for k in records)
            continue
        if long_size is not None:
            size = long_size
            padded = -(-size // _BLOCK) * _BLOCK
        name, was_sparse = long_name, sparse
        long_name, long_size, sparse, pending = None, None, False, False
        if kind in _REGULAR:
            if kind == 0 and block[:100].split(b"\0", 1)[0].endswith(b"/"):
                continue  # the old way to store a directory: no data
            if not was_sparse:
                if name is None:
                    raw = block[:100].split(b"\0", 1)[0]
                    # ustar's prefix/name; only under the POSIX magic (GNU headers keep times there)
                    if block[345] and block[257:263] == b"ustar\0":
                        raw = block[345:500].split(b"\0", 1)[0] + b"/" + raw
                    name = raw.decode("utf-8", "surrogateescape")
                data = _read_up_to(read, size)
                at += len(data)
                if len(data) != size:
                    raise _BadEnd("truncated_tar", f"{name!r} cut short at byte {at}", member=name)
                # Yielded before its padding is read: a stream cut there loses this member's
                # sample, not the one its header completed.
                yield name, data
                if padded != size:
                    got = len(read(padded - size))
                    at += got
                    if got != padded - size:
                        raise _BadEnd("truncated_tar", f"padding after {name!r} cut short at byte {at}")
                continue
        elif kind in _NO_DATA:
            continue  # their size fields describe no data (POSIX; tarfile agrees)
        elif kind == 0x53:  # 'S' old GNU sparse: blocks of the sparse map, then the data
            more = block[482]
            while more:
                ext = read(_BLOCK)
                at += len(ext)
                if len(ext) != _BLOCK:
                    raise _BadEnd("truncated_tar", f"sparse header cut short at byte {at}")
                more = ext[504]
        skipped = 0
        while skipped < padded:
            got = len(read(min(padded - skipped, _CHUNK)))
            if not got:
                raise _BadEnd("truncated_tar", f"member data cut short at byte {at + skipped}")
            skipped += got
        at += padded


class ShardReader(torch.utils.data.IterableDataset):
    """Samples of image-caption shards, read one shard at a time, never all in memory; bad data
    is skipped and counted in `skipped` by kind (see SKIP_KINDS), never raised.

    Yields webdataset-style dicts: `__key__` (str), `__url__` (the shard path), `__shard__` (its
    index in `shards`), `__ordinal__` (the sample's number in its shard, counting every sample
    the tar holds, skipped ones included) and one entry per file of the sample, extension -> bytes exactly as
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
    decode, image attached). `check_samples=False` yields every complete sample unchecked (tar
    damage is still skipped): for a consumer that checks only its own share. Raises ValueError for an unknown `check_images` or negative
    `retries`/`backoff_s`.
    """

    def __init__(self, shards: Sequence[str], *, check_images: str = "draft", retries: int = 2,
                 backoff_s: float = 0.5, check_samples: bool = True):
        if check_images not in _CHECKS:
            raise ValueError(f"check_images: expected one of {list(_CHECKS)}, got {check_images!r}")
        if retries < 0 or backoff_s < 0:
            raise ValueError(f"retries and backoff_s: expected >= 0, got {retries} and {backoff_s}")
        self.shards = [str(s) for s in shards]
        self.check_images, self.retries, self.backoff_s = check_images, retries, backoff_s
        self.check_samples = check_samples
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
        """Open a shard for streaming, retrying; None (after counting it) when it cannot be."""
        last: Optional[BaseException] = None
        attempts = 0
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            f = None
            attempts += 1
            try:
                f = open(url, "rb", buffering=_CHUNK)
                # Whether the file is a tar at all stays Python's tarfile's call on its first
                # member's headers, as before: the same files fail, with the same messages, and
                # are retried. It parses them from the first 1 MB, already buffered (peek
                # consumes nothing, nothing seeks); _tar_files then reads the members.
                tarfile.open(fileobj=io.BytesIO(f.peek(_BLOCK)), mode="r|").close()
                return f
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
        f = self._open(url)
        if f is None:
            return
        current: Optional[dict] = None
        ordinal = 0  # the sample's place in its shard: with the shard, an id stable across reads
        try:
            try:
                for name, data in _tar_files(f.read):
                    key, ext = _split_name(name)
                    if key.startswith("__") or not ext:  # webdataset's own metadata entries
                        continue
                    if current is not None and current["__key__"] != key:
                        # A new key: the previous sample is complete.
                        yield from self._finish(current)
                        current = None
                    if current is None:
                        current = {"__key__": key, "__url__": url, "__shard__": index, "__ordinal__": ordinal}
                        ordinal += 1
                    current[ext] = data
            except (OSError, _BadEnd) as exc:
                # The sample being read when the stream broke may lack files: drop it. A file
                # cut inside its data still had a whole header: if that opens a new key, the
                # sample before it is complete, as a new key's header always says here.
                member = exc.member if isinstance(exc, _BadEnd) else None
                if current is not None and member is not None:
                    key, ext = _split_name(member)
                    if ext and not key.startswith("__") and current["__key__"] != key:
                        yield from self._finish(current)
                current = None
                kind = exc.kind if isinstance(exc, _BadEnd) else "truncated_tar"  # (an I/O error mid-read)
                log.warning("shard %s: %s (%s); keeping the samples before it", url, kind.replace("_", " "), exc)
                self.skipped[kind] += 1
                self.bad_shards[url] = f"{kind}: {exc}"
            if current is not None:
                yield from self._finish(current)
        finally:
            f.close()

    def _finish(self, sample: dict) -> Iterator[dict]:
        if self.check_samples:
            kind = _sample_problem(sample)
            if kind is None and self.check_images != "none":
                try:
                    image = decode_image(sample[_image_ext(sample)], draft=self.check_images == "draft")
                except DECODE_ERRORS:
                    kind = "corrupt_image"
                else:
                    if self.check_images == "decode":
                        sample["__image__"] = image
            if kind is not None:
                self.skipped[kind] += 1
                return
        self.samples += 1
        yield sample


def _image_ext(sample: dict) -> Optional[str]:
    return next((e for e in _IMAGE_EXTS if e in sample), None)


# What PIL raises for bytes that are not a decodable image (UnidentifiedImageError is an OSError).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def sample_image(sample: dict, read: Callable[[bytes], T]) -> Tuple[Optional[T], Optional[str]]:
    """`(read(image bytes), None)` for a sample with a caption and a decodable image, else
    `(None, skip kind)`: the one rule training streams and the teacher cache share."""
    kind = _sample_problem(sample)
    if kind is not None:
        return None, kind
    try:
        return read(sample[_image_ext(sample)]), None
    except DECODE_ERRORS:
        return None, "corrupt_image"


def _sample_problem(sample: dict) -> Optional[str]:
    """The skip kind of a sample without a usable image entry or caption, else None (the image
    bytes are not decoded here)."""
    if _image_ext(sample) is None:
        return "missing_image"
    raw_text = sample.get("txt")
    if raw_text is None:
        return "missing_caption"
    try:
        return None if raw_text.decode("utf-8").strip() else "missing_caption"
    except UnicodeDecodeError:
        return "corrupt_caption"
