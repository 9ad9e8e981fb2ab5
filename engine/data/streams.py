"""Training streams: endless batches of (images, tokens) from image-caption shards, split between
ranks and data-loader workers, resumable from a saved position."""
from __future__ import annotations

import functools
import multiprocessing
import os
import pickle
import random
import select
import signal
import threading
import time
from collections import Counter
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..errors import ConfigError
from ..telemetry import proc_status
from .preprocess import FastPreprocess, FastTokenizer
from .shards import DATA_SPLITS
from .tar import SKIP_KINDS, ShardReader, decode_image, sample_image

__all__ = ["DATA_SPLITS", "SHARDS_PER_READER", "PairStream", "Batches", "loader", "split_preprocess"]

# split="auto" reads by shard from this many shards a reader per epoch: below it, readers' epochs
# (a few shards each) would differ by a large fraction, and a one-shard forget set must still split.
SHARDS_PER_READER = 4


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
    entry identifies the batch's samples (`Batches.last_ids`). `teacher`, when given, is called
    with those ids where the batch is built (in the loader worker) and its rows travel with the
    batch (`Batches.last_teacher`): a teacher cache's memory-mapped rows (teacher_cache.ShardRows).
    Raises ConfigError when an epoch holds no usable sample (or a reader finds none of its own
    in three epochs).
    """

    def __init__(self, shards: Sequence[str], preprocess: Callable, tokenizer: Callable, batch_size: int,
                 *, seed: int = 0, shuffle_buffer: int = 1000, what: str = "data", rank: int = 0, world: int = 1,
                 start: Optional[dict] = None, resampled: bool = False, split: str = "auto",
                 teacher: Optional[Callable[[Tensor], Tensor]] = None):
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
        self.teacher = teacher

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
                    if self.teacher is not None:
                        position["teacher"] = self.teacher(position["ids"])
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
        # The stream's `teacher` rows of the last batch (B, 2, d), as stored; None without one
        self.last_teacher: Optional[Tensor] = None

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
        self.last_teacher = position.pop("teacher", None)
        self.readers[str(position.pop("role"))] = position
        self.consumed += 1
        return self._finish(images), tokens

    def state(self) -> dict:
        return {"workers": self.workers, "consumed": self.consumed, "readers": {k: dict(v) for k, v in self.readers.items()}}

    def close(self) -> None:
        """Stop the data workers now. Left to the garbage collector, the DataLoader iterator is
        often freed inside a reference cycle whose index queues were finalised first; its workers
        then never hear the stop and each waits out a 5 s join (10 s per run with 2 streams,
        measured). Iterating a closed Batches raises StopIteration."""
        it, self._it = self._it, iter(())
        shutdown = getattr(it, "_shutdown_workers", None)  # torch's multi-process iterator; a generator has none
        if shutdown is not None:
            shutdown()

    def skipped(self) -> Dict[str, int]:
        total: Counter = Counter()
        for position in self.readers.values():
            total.update(position.get("skipped", {}))
        return {k: int(total[k]) for k in SKIP_KINDS}


def _worker_init(rank_pid: int, worker_id: int) -> None:
    """Ctrl-C reaches the workers too (the terminal signals the whole process group); they would
    stop and the run fail mid-step instead of saving its checkpoint. The main process answers it
    and shuts its workers down. SIGTERM keeps its default: it is how a parent ends its workers.

    A worker started from the forkserver is the server's child, not the rank's, and the two keep
    each other alive (the server's liveness pipe stays open in every child it starts), so torch's
    watchdog, which watches the worker's parent, never sees a SIGKILLed rank go: worker and
    server lived on, ~0.9 GB, until someone killed them. Each worker watches the rank itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=(rank_pid,), name="rank-watch", daemon=True).start()


def _exit_with(pid: int) -> None:
    """Return never; end this process once process `pid` has ended."""
    try:
        fd = os.pidfd_open(pid)  # Linux >= 5.3: readable when the process ends, immune to pid reuse
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        select.select([fd], [], [])
    else:
        while _alive(pid):
            time.sleep(1.0)
    os._exit(1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def split_preprocess(preprocess: Callable) -> Optional[FastPreprocess]:
    """open_clip's eval preprocess as a FastPreprocess (bit-identical up to JPEG draft decoding of
    images over twice the target size; see engine/preprocess.py), or None for one it cannot
    split (training augmentations, a plain function): then the loader runs it whole."""
    try:
        fast = FastPreprocess.from_open_clip(preprocess)
    except (ValueError, TypeError, AttributeError):
        return None
    return fast if fast.image_size is not None else None


# Below this much anonymous memory a rank forks its workers: that is all a fork can pin.
FORK_BELOW_BYTES = 1 << 30


def _worker_context():
    """How workers start. A forked child shares the rank's pages copy-on-write, and every page the
    rank rewrites while the child lives then exists twice; each optimizer step rewrites the model
    states, which on CPU (or with optimizer offload) are anonymous host memory. ViT-H-14 under
    ZeRO-3 on 2 CPU ranks was OOM-killed that way in its first step. So a rank holding
    FORK_BELOW_BYTES or more starts them from a forkserver that has imported this module (it
    inherits nothing of the rank; its start costs a torch import, 2-3 s of a short run, which is
    why small ranks still fork)."""
    if proc_status().get("RssAnon", 0) < FORK_BELOW_BYTES:
        return multiprocessing.get_context("fork")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])  # no effect once this process's server runs
    return ctx


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
    try:  # whichever way workers start (_worker_context), a stream that only forks is refused alike
        pickle.dumps(stream)
    except (AttributeError, TypeError, pickle.PicklingError) as exc:  # what pickle raises for a lambda or a lock
        raise ConfigError([f"{stream.what}: data workers may receive the stream pickled, and it does not pickle "
                           f"({exc}): give PairStream module-level preprocess and tokenizer functions, or use 0 "
                           "workers"]) from exc
    dl = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers, prefetch_factor=4,
                                     persistent_workers=False, pin_memory=pin_memory,
                                     worker_init_fn=functools.partial(_worker_init, os.getpid()),
                                     multiprocessing_context=_worker_context())
    return Batches(iter(dl), workers, stream.start, finish)
