"""The frozen original model's embeddings of the training samples, computed once.

The teacher never changes and preprocessing is deterministic (no augmentation), so its
embedding of a sample is a constant: one pass over the forget/retain shards, split between
ranks by shard, stores them beside the run (`<output_dir>/teacher_cache/`), and training looks
them up by sample id (`data.Batches.last_ids`) instead of running a second model every step.
After the pass the teacher can leave the GPU. A resumed run reuses the cache; any change of the
teacher's weights, the model, the shards or the preprocessing gives another key and a new cache.

Files: `<stream>-<key>/shard_<i>.pt` per shard (written atomically, so a killed pass resumes
shard by shard) and `manifest.json` (what the key covers) once every shard is there. Rows hold
L2-normalised fp32 embeddings; rows of samples that do not decode are marked invalid and are
never asked for (training skips the same samples).

Size: 2 * d * 4 bytes per sample, e.g. 8 KB at d = 1024: 0.8 GB per 100,000 samples.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Callable, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import dist as D
from .checkpoint import atomic_save, write_json
from .data import ShardReader, decode_image, sample_image, split_preprocess
from .progress import progress_bar

__all__ = ["TeacherCache", "teacher_fingerprint"]

log = logging.getLogger("cliperase.teacher_cache")
FORMAT = 1


def teacher_fingerprint(model: nn.Module) -> str:
    """A digest of the model's floating-point state: per tensor its name, shape and three moments
    (sum, sum of squares, position-weighted sum) in float64. Any real change of the weights
    changes it; computing it costs one read of the weights on their device."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        if t.is_floating_point() and t.numel():
            x = t.detach().double().flatten()
            w = torch.arange(1, x.numel() + 1, device=x.device, dtype=torch.float64) % 9973
            h.update(repr([float(x.sum()), float((x * x).sum()), float((x * w).sum())]).encode())
    return h.hexdigest()


def _shard_stat(path: str) -> list:
    st = Path(path).stat()
    return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]


class TeacherCache:
    """Normalised teacher embeddings of every sample of one stream's shards.

    `lookup(ids)` takes a (B, 2) int64 tensor of (shard index, ordinal) pairs, as data.Batches
    gives them, and returns (image (B, d), text (B, d)) fp32 rows on `device`.
    """

    def __init__(self, offsets: Tensor, img: Tensor, txt: Tensor, valid: Tensor, device: torch.device):
        self.offsets, self.valid = offsets, valid
        self.img, self.txt = img.to(device), txt.to(device)

    def lookup(self, ids: Tensor) -> Tuple[Tensor, Tensor]:
        rows = self.offsets[ids[:, 0]] + ids[:, 1]
        if not bool(self.valid[rows].all()):  # cheap (CPU, B entries); a miss means a stale or wrong cache
            raise RuntimeError("teacher cache: a batch holds samples the cache marks as undecodable; "
                               "the shards changed under the run? delete the teacher_cache directory")
        rows = rows.to(self.img.device)
        return self.img[rows], self.txt[rows]

    @classmethod
    def build_or_load(cls, directory: Path, what: str, shards: Sequence[str], teacher: nn.Module, preprocess: Callable,
                      tokenizer: Callable, *, device: torch.device, batch_size: int = 256,
                      progress: bool = True) -> "TeacherCache":
        """The cache of `shards` under `directory`, built first when missing (collective when
        distributed: each rank embeds shards `i % world == rank`, then all read all)."""
        described = {"format": FORMAT, "teacher": teacher_fingerprint(teacher), "shards": [_shard_stat(s) for s in shards],
                     "preprocess": f"{preprocess!r} {split_preprocess(preprocess)!r}", "tokenizer": f"{type(tokenizer).__name__}:"
                     f"{getattr(tokenizer, 'context_length', None)}:{getattr(tokenizer, 'vocab_size', None)}"}
        key = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]
        where = Path(directory) / f"{what}-{key}"
        if not (where / "manifest.json").is_file():
            mine = [i for i in range(len(shards)) if i % D.world_size() == D.rank()]
            todo = [i for i in mine if not (where / f"shard_{i:05d}.pt").is_file()]
            if todo:
                where.mkdir(parents=True, exist_ok=True)
                _embed_shards(where, [(i, shards[i]) for i in todo], teacher, preprocess, tokenizer, device=device,
                              batch_size=batch_size, desc=f"teacher cache[{what}]", progress=progress and D.is_main())
            D.barrier()
            if D.is_main():
                write_json({**described, "key": key}, where / "manifest.json")
            D.barrier()
        else:
            log.info("teacher cache: reusing %s", where)
        parts = [torch.load(where / f"shard_{i:05d}.pt", map_location="cpu", weights_only=True) for i in range(len(shards))]
        d = max(p["img"].shape[1] for p in parts)
        for p in parts:  # a shard without one usable sample stored no width
            if p["img"].shape[1] != d:
                p["img"] = p["txt"] = torch.zeros(p["valid"].numel(), d)
        sizes = torch.tensor([0] + [p["valid"].numel() for p in parts], dtype=torch.int64)
        return cls(sizes.cumsum(0)[:-1], torch.cat([p["img"] for p in parts]), torch.cat([p["txt"] for p in parts]),
                   torch.cat([p["valid"] for p in parts]), device)


@torch.no_grad()
def _embed_shards(where: Path, shards: List[Tuple[int, str]], teacher: nn.Module, preprocess: Callable,
                  tokenizer: Callable, *, device: torch.device, batch_size: int, desc: str, progress: bool) -> None:
    was_training = teacher.training
    teacher.eval()
    fast = split_preprocess(preprocess)  # the training streams' own pixels (data.PairStream)
    bar = progress_bar(total=len(shards), desc=desc, unit="shard", enabled=progress)
    for index, url in shards:
        reader = ShardReader([url], check_images="none", check_samples=False)
        ordinals, images, texts = [], [], []
        n = 0
        for sample in reader:
            n = max(n, sample["__ordinal__"] + 1)
            image, kind = sample_image(sample, fast.cpu if fast is not None else lambda raw: preprocess(decode_image(raw)))
            if kind is not None:
                continue
            ordinals.append(sample["__ordinal__"])
            images.append(image)
            texts.append(sample["txt"].decode("utf-8").strip())
        img_rows, txt_rows = [], []
        for start in range(0, len(images), batch_size):
            x = torch.stack(images[start : start + batch_size]).to(device)
            x = fast.device(x) if fast is not None else x
            t = tokenizer(texts[start : start + batch_size]).to(device)
            img_rows.append(F.normalize(teacher.encode_image(x).float(), dim=-1).cpu())
            txt_rows.append(F.normalize(teacher.encode_text(t).float(), dim=-1).cpu())
        d = img_rows[0].shape[1] if img_rows else 0
        img, txt = torch.zeros(n, d), torch.zeros(n, d)
        valid = torch.zeros(n, dtype=torch.bool)
        if ordinals:
            at = torch.tensor(ordinals)
            img[at], txt[at], valid[at] = torch.cat(img_rows), torch.cat(txt_rows), True
        atomic_save({"img": img, "txt": txt, "valid": valid}, where / f"shard_{index:05d}.pt")
        bar.update(1)
    bar.close()
    teacher.train(was_training)
