"""The frozen original model's embeddings of the training samples, computed once, kept on disk.

The teacher never changes and preprocessing is deterministic (no augmentation), so its
embedding of a sample is a constant: one pass over the forget/retain shards, split between
ranks by shard, stores them beside the run (`<output_dir>/teacher_cache/`), and training looks
them up by sample id instead of running a second model every step. After the pass the teacher
can leave the GPU.

Layout (memory-mappable, one file per shard; nothing is ever loaded whole):

    teacher_cache/<model key>/manifest.json         what the key covers (teacher, preprocess, precision)
    teacher_cache/<model key>/index-<stream>.json   the stream's shards, in order, and their fingerprints
    teacher_cache/<model key>/<shard fingerprint>.npy   (n, 2, d): row o = sample o of the shard,
                                                    [0] its image, [1] its text embedding

The model key digests the teacher's weights, the preprocessing, the tokenizer and the storage
precision; a shard's fingerprint digests its size, mtime and first and last 64 KiB (hashing
whole shards would read a CC12M corpus once more at every start). So a changed shard rebuilds
that shard alone, another teacher or precision another directory, and a pass killed mid-way
resumes from the shards already written (each written to a temporary name and renamed).

Rows are the L2-normalised embeddings rounded to `precision` ("fp16", the default: relative
error <= 2^-11 per element; "bf16": <= 2^-8, stored as its raw uint16 bits since numpy has no
bfloat16; "fp32": exact); the consumer upcasts and re-normalises (`teacher_rows`). A sample that
does not decode has a zero row (no normalised row is zero) and is never asked for: training
skips the same samples.

Reading: `TeacherCache.rows` is a small picklable object the data-loader workers call on each
batch's sample ids (data.PairStream's `teacher`): each worker memory-maps the few shards it is
reading (at most `ShardRows.open_shards` at a time) and the rows travel to the device with the
batch. Resident memory is bounded by the open maps, whatever the corpus size.

Size on disk: 2 * d * 2 bytes per sample in fp16, e.g. 4 KB at d = 1024: 41 GB for CC12M's 10M.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import dist as D
from .checkpoint import atomic_write_bytes, write_json
from .data import ShardReader, decode_image, sample_image, split_preprocess
from .progress import progress_bar

__all__ = ["CACHE_PRECISIONS", "TeacherCache", "ShardRows", "teacher_rows", "teacher_fingerprint", "shard_fingerprint"]

log = logging.getLogger("cliperase.teacher_cache")
FORMAT = 2
# Stored dtype per precision (bf16 as its bits) and the torch dtype those bytes are read back as.
CACHE_PRECISIONS = {"fp16": (np.float16, torch.float16), "bf16": (np.uint16, torch.bfloat16),
                    "fp32": (np.float32, torch.float32)}
_EDGE = 64 * 1024  # bytes of each end of a shard its fingerprint reads


def teacher_fingerprint(model: nn.Module) -> str:
    """A digest of the model's floating-point state: per tensor its name, shape and three moments
    (sum, sum of squares, position-weighted sum) in float64. Any real change of the weights
    changes it; computing it costs one read of the weights on their device. A ZeRO-3 partitioned
    model's tensors are gathered one at a time (collective), giving the digest of the same
    weights held whole."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict(keep_vars=True).items()):
        gathered = contextlib.nullcontext()
        if hasattr(t, "ds_id"):
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters([t])
        with gathered:
            shape = tuple(t.ds_shape) if hasattr(t, "ds_id") else tuple(t.shape)
            h.update(f"{name}{shape}{t.dtype}".encode())
            if t.is_floating_point() and t.numel():
                x = t.detach().double().flatten()
                w = torch.arange(1, x.numel() + 1, device=x.device, dtype=torch.float64) % 9973
                h.update(repr([float(x.sum()), float((x * x).sum()), float((x * w).sum())]).encode())
    return h.hexdigest()


def shard_fingerprint(path: str) -> str:
    """Size, mtime and the first and last 64 KiB of a shard, digested: its cache file's name. A
    rewritten shard (new mtime or size, or other bytes at either end) gets another."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        h.update(f.read(_EDGE))
        if st.st_size > _EDGE:
            f.seek(max(_EDGE, st.st_size - _EDGE))
            h.update(f.read())
    return h.hexdigest()[:24]


def teacher_rows(stored: Tensor, device: torch.device) -> Tuple[Tensor, Tensor]:
    """(image, text) fp32 unit rows on `device` from a batch's stored (B, 2, d) rows (any precision):
    16-bit rows re-normalised after the upcast, fp32 rows as stored (already unit rows)."""
    x = stored.to(device, non_blocking=True)
    if x.dtype == torch.float32:
        return x[:, 0], x[:, 1]
    x = x.float()
    return F.normalize(x[:, 0], dim=-1), F.normalize(x[:, 1], dim=-1)


class ShardRows:
    """The cached rows of one stream's shards, read by memory map: `rows(ids)` with ids a (B, 2)
    int64 tensor of (index in the stream's shard list, ordinal), as data.PairStream numbers its
    samples, returns the (B, 2, d) stored rows (fp16/bf16/fp32). Picklable (the maps are not
    pickled: each process opens its own), so a DataLoader worker calls it where it builds the
    batch. Keeps the `open_shards` most recently read shards mapped: a reader reads a few at a
    time (a shuffle buffer spans about two), and a closed map leaves the process's memory."""

    open_shards = 4

    def __init__(self, files: Sequence[str], precision: str):
        self.files, self.precision = list(files), precision
        self._maps: "OrderedDict[int, np.ndarray]" = OrderedDict()

    def __getstate__(self):
        return {"files": self.files, "precision": self.precision}

    def __setstate__(self, state):
        self.__init__(state["files"], state["precision"])

    def _map(self, shard: int) -> np.ndarray:
        m = self._maps.pop(shard, None)
        if m is None:
            m = np.load(self.files[shard], mmap_mode="r")
            while len(self._maps) >= self.open_shards:
                self._maps.popitem(last=False)  # dropping the last reference unmaps it
        self._maps[shard] = m
        return m

    def __call__(self, ids: Tensor) -> Tensor:
        ids = ids.numpy()
        parts, order = [], []
        for shard in np.unique(ids[:, 0]):
            at = np.nonzero(ids[:, 0] == shard)[0]
            m, ordinals = self._map(int(shard)), ids[at, 1]
            got = np.asarray(m[ordinals]) if m.shape[2] and int(ordinals.max()) < m.shape[0] else None
            if got is None or not got.any(axis=(1, 2)).all():
                raise RuntimeError(f"teacher cache: a batch holds samples that {self.files[shard]} has no row for "
                                   "(undecodable when cached); the shards changed under the run? delete the "
                                   "teacher_cache directory")
            parts.append(got)
            order.append(at)
        rows = np.concatenate(parts)[np.argsort(np.concatenate(order), kind="stable")]
        return torch.from_numpy(rows).view(CACHE_PRECISIONS[self.precision][1])


class TeacherCache:
    """One stream's on-disk teacher cache: `rows` (a ShardRows, for the data workers) and where
    it lives. `lookup(ids)` = teacher_rows(rows(ids)) on CPU, for callers outside a stream."""

    def __init__(self, rows: ShardRows, where: Path):
        self.rows, self.where = rows, where

    def lookup(self, ids: Tensor) -> Tuple[Tensor, Tensor]:
        return teacher_rows(self.rows(ids), torch.device("cpu"))

    @classmethod
    def build_or_load(cls, directory: Path, what: str, shards: Sequence[str], teacher: nn.Module, preprocess: Callable,
                      tokenizer: Callable, *, device: torch.device, precision: str = "fp16", batch_size: int = 256,
                      progress: bool = True) -> "TeacherCache":
        """The cache of `shards` under `directory`, the shards without a current file embedded first
        (collective when distributed: rank 0 decides which, rank r embeds the r-th of every
        world-size of them)."""
        if precision not in CACHE_PRECISIONS:
            raise ValueError(f"precision: expected one of {list(CACHE_PRECISIONS)}, got {precision!r}")
        described = {"format": FORMAT, "teacher": teacher_fingerprint(teacher), "precision": precision,
                     "preprocess": f"{preprocess!r} {split_preprocess(preprocess)!r}", "tokenizer": f"{type(tokenizer).__name__}:"
                     f"{getattr(tokenizer, 'context_length', None)}:{getattr(tokenizer, 'vocab_size', None)}"}
        key = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]
        where = Path(directory) / key
        plan = None
        if D.is_main():
            prints = [shard_fingerprint(s) for s in shards]
            plan = (prints, [i for i, p in enumerate(prints) if not (where / f"{p}.npy").is_file()])
        prints, todo = D.broadcast(plan)  # sync point: every rank embeds its part of the same list
        mine = todo[D.rank()::D.world_size()]
        if mine or (todo and hasattr(teacher, "idle")):  # a collective teacher needs every rank in the pass
            where.mkdir(parents=True, exist_ok=True)
            _embed_shards([(where / f"{prints[i]}.npy", shards[i]) for i in mine], teacher, preprocess, tokenizer,
                          device=device, precision=precision, batch_size=batch_size,
                          desc=f"teacher cache[{what}]", progress=progress and D.is_main())
        elif not todo:
            log.info("teacher cache: reusing %s for %s", where, what)
        D.barrier()
        if D.is_main():
            write_json({**described, "key": key}, where / "manifest.json")
            write_json({"stream": what, "shards": [[str(s), p] for s, p in zip(shards, prints)]},
                       where / f"index-{what}.json")
        D.barrier()
        return cls(ShardRows([str(where / f"{p}.npy") for p in prints], precision), where)


def _shard_batches(jobs: List[Tuple[Path, str]], preprocess: Callable, tokenizer: Callable, *, precision: str,
                   batch_size: int, bar):
    """Per (file, shard) job, its decodable samples as (images, tokens, rows) batches; the caller
    appends each batch's (B, 2, d) rows to `rows`, and the file is written (atomically) once the
    shard's last batch is in."""
    fast = split_preprocess(preprocess)  # the training streams' own pixels (data.PairStream)
    cpu = fast.cpu if fast is not None else lambda raw: preprocess(decode_image(raw))
    for path, url in jobs:
        ordinals, images, texts, n = [], [], [], 0
        for sample in ShardReader([url], check_images="none", check_samples=False):
            n = max(n, sample["__ordinal__"] + 1)
            image, kind = sample_image(sample, cpu)
            if kind is None:
                ordinals.append(sample["__ordinal__"])
                images.append(image)
                texts.append(sample["txt"].decode("utf-8").strip())
        rows: List[Tensor] = []
        for start in range(0, len(images), batch_size):
            yield torch.stack(images[start : start + batch_size]), tokenizer(texts[start : start + batch_size]), rows
        _write_rows(path, n, ordinals, torch.cat(rows) if rows else None, precision)
        bar.update(1)


def _in_lockstep(items, idle: Optional[Callable[[], None]]):
    """`items`, but when `idle` is given (a collective teacher: a ZeRO-3 forward needs every
    rank) ranks agree before each item whether anyone still has one (sync point), and a rank
    whose own items ran out calls `idle` meanwhile, so every rank runs as many forwards."""
    if idle is None:
        yield from items
        return
    items = iter(items)
    while True:
        item = next(items, None)
        more = torch.tensor([item is not None], dtype=torch.int64)
        torch.distributed.all_reduce(more, op=torch.distributed.ReduceOp.MAX)
        if not more.item():
            return
        if item is None:
            idle()
        else:
            yield item


@torch.no_grad()
def _embed_shards(jobs: List[Tuple[Path, str]], teacher: nn.Module, preprocess: Callable, tokenizer: Callable, *,
                  device: torch.device, precision: str, batch_size: int, desc: str, progress: bool) -> None:
    """Embed each (file, shard) job's samples and write the file, shard by shard."""
    was_training = teacher.training
    teacher.eval()
    fast = split_preprocess(preprocess)
    bar = progress_bar(total=len(jobs), desc=desc, unit="shard", enabled=progress)
    batches = _shard_batches(jobs, preprocess, tokenizer, precision=precision, batch_size=batch_size, bar=bar)
    # A ZeRO-3 original (dist.partitioned.ShardedOriginal) embeds both towers in one collective forward.
    encode = getattr(teacher, "encode", None) or (lambda x, t: (teacher.encode_image(x), teacher.encode_text(t)))
    idle = teacher.idle() if hasattr(teacher, "idle") else None
    for x, t, rows in _in_lockstep(batches, idle):
        x = x.to(device)
        img, txt = encode(fast.device(x) if fast is not None else x, t.to(device))
        rows.append(torch.stack([F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)], 1).cpu())
    bar.close()
    teacher.train(was_training)


def _write_rows(path: Path, n: int, ordinals: List[int], rows: Optional[Tensor], precision: str) -> None:
    """The (n, 2, d) file of a shard: `rows` at their ordinals, zeros elsewhere (d = 0 when no
    sample decoded), rounded to `precision`."""
    table = torch.zeros(n, 2, 0 if rows is None else rows.shape[2])
    if rows is not None:
        table[torch.tensor(ordinals)] = rows
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    array = table.to(dtype).view(torch.int16 if precision == "bf16" else dtype).numpy()
    buf = io.BytesIO()  # one shard's rows: 40 MB for 10,000 samples at d = 1024 in fp16
    np.save(buf, array.view(CACHE_PRECISIONS[precision][0]), allow_pickle=False)
    atomic_write_bytes(buf.getvalue(), path)
