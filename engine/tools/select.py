"""Choose a forget set, and the retain set beside it, from image-caption shards.

The corpus is read as a stream, one shard at a time (a CC12M-size corpus never fits in memory),
through the robust `ShardReader`: bad samples and shards are skipped and counted, and the
input shards are opened read-only. A sample is *forget* when the rule matches it and *retain*
otherwise. Rules (exactly one per run):

- keywords: the caption contains one of the keywords as whole words. A keyword matches where
  it is neither preceded nor followed by a letter, digit or underscore ("red" matches "a red
  car" and "red-brick", not "bored" or "reddish"); a phrase's words match across any run of
  whitespace ("red car" matches "red  car"). Case-insensitive unless `case_sensitive`.
- regex: Python `re.search` of any of the patterns in the caption finds a match; the same
  case rule (`case_sensitive=False` adds re.IGNORECASE).
- keys: the sample key is listed in a file, one key per line (blank lines ignored).
- concept: cosine between the concept prompt's text embedding and the sample's image or caption
  embedding from a teacher CLIP is >= `threshold`, or among the `top_k` highest (ties go to the
  sample read first). Embeddings are computed in batches on the GPU when there is one.

Output in `output_dir`: `forget/` and `retain/` shards in img2dataset layout (each sample's
files copied byte for byte under its original key), or with `keys_only` the key lists
`forget.txt` and `retain.txt`; and `manifest.json` (rule, counts, source shards, skip counts,
a sha256 per set over its keys, tool version), written last and atomically: a directory with a
manifest holds a complete selection.

When the decision for a sample cannot be made as it streams by (`top_k`, or a retain set drawn
as a random sample of `retain_size`), the scan keeps only keys and a second pass copies the
chosen samples; key lists never need the second pass.
"""
from __future__ import annotations

import hashlib
import heapq
import logging
import random
import re
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Protocol, Sequence, Set, Tuple

import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image
from torch import Tensor

from ..checkpoint import write_json
from ..data import ShardReader, expand_shards
from ..errors import ConfigError
from ..models import check_model_spec, load_model

__all__ = ["SelectConfig", "ConceptEncoder", "ClipEncoder", "select", "keys_sha256", "SELECTION_MARKERS"]

log = logging.getLogger("cliperase.select")

EMBEDDINGS = ("image", "caption")
# Entries of an output directory that belong to a selection (complete or interrupted).
SELECTION_MARKERS = ("manifest.json", "forget", "retain", "forget.txt", "retain.txt")
_STAGING = ".select-partial"  # built here, moved into place when complete

Ident = Tuple[int, str]  # (shard index, sample key): unique even when keys repeat across shards


@dataclass(frozen=True)
class SelectConfig:
    # --- input
    data: str = ""  # shards: a directory of .tar, a brace pattern, one file; '::' joins several
    # --- the rule: exactly one of keywords, regex, keys_file, concept
    keywords: Tuple[str, ...] = ()  # whole-word keywords or phrases; a caption with any of them is forget
    regex: Tuple[str, ...] = ()  # Python regular expressions searched in the caption; any match is forget
    case_sensitive: bool = False  # keywords and regex: match case exactly (default: ignore case)
    keys_file: Optional[str] = None  # file of sample keys to forget, one per line
    concept: Optional[str] = None  # concept prompt, e.g. "a photo of a dog"
    embedding: str = "image"  # concept: compare the prompt with the sample's "image" or "caption" embedding
    threshold: Optional[float] = None  # concept: forget when cosine >= threshold, in [-1, 1]
    top_k: Optional[int] = None  # concept: forget the k samples of highest cosine instead
    model: Optional[str] = None  # concept: teacher open_clip architecture name (ViT-B-32, ...)
    pretrained: Optional[str] = None  # concept: teacher's open_clip tag or checkpoint path
    batch_size: int = 256  # concept: samples per embedding batch
    device: str = "auto"  # concept: "auto" (cuda when available), "cpu", "cuda", "cuda:1", ...
    # --- output
    output_dir: str = "selection"  # forget/, retain/ (or forget.txt, retain.txt) and manifest.json go here
    keys_only: bool = False  # write key lists instead of shards
    retain_size: Optional[int] = None  # retain = a random sample of this many non-forget samples (default: all)
    seed: int = 0  # seed of the retain sample
    shard_size: int = 10000  # samples per output shard (img2dataset's default)
    overwrite: bool = False  # replace a selection already in output_dir
    # --- reading
    check_images: str = "draft"  # ShardReader image check: "none", "draft" (fast) or "decode"
    retries: int = 2  # reopen attempts of a shard that fails to open
    backoff_s: float = 0.5  # first wait before a reopen; doubles each time
    total: Optional[int] = None  # samples in the corpus, if known: the progress bar shows an ETA

    def rule_kind(self) -> Optional[str]:
        given = [k for k, v in (("keywords", self.keywords), ("regex", self.regex), ("keys", self.keys_file),
                                ("concept", self.concept)) if v]
        return given[0] if len(given) == 1 else None

    def problems(self) -> List[str]:
        """Every problem with this config, each naming the field; empty when valid. Reads only
        metadata (file existence, open_clip's model registry), never a shard or a model."""
        p: List[str] = []
        if not self.data:
            p.append("data: no shards given")
        else:
            urls = expand_shards(self.data)
            if not urls:
                p.append(f"data: {self.data!r} matches no .tar shards")
            elif not any(Path(u).is_file() for u in urls):
                p.append(f"data: none of the {len(urls)} shards of {self.data!r} exists")
        given = [n for n, v in (("keywords", self.keywords), ("regex", self.regex), ("keys_file", self.keys_file),
                                ("concept", self.concept)) if v]
        if len(given) != 1:
            p.append(f"rule: give exactly one of keywords, regex, keys_file, concept (got {given or 'none'})")
        if any(not k.strip() for k in self.keywords):
            p.append("keywords: empty keyword")
        for pattern in self.regex:
            try:
                re.compile(pattern)
            except re.error as exc:
                p.append(f"regex: {pattern!r} is not a valid Python regular expression ({exc})")
        if self.keys_file and not Path(self.keys_file).is_file():
            p.append(f"keys_file: {self.keys_file!r} does not exist")
        if self.concept:
            if (self.threshold is None) == (self.top_k is None):
                p.append("concept: give exactly one of threshold and top_k")
            if self.threshold is not None and not -1.0 <= self.threshold <= 1.0:
                p.append(f"threshold: expected a cosine in [-1, 1], got {self.threshold}")
            if self.top_k is not None and self.top_k < 1:
                p.append(f"top_k: expected >= 1, got {self.top_k}")
            if self.embedding not in EMBEDDINGS:
                p.append(f"embedding: expected one of {list(EMBEDDINGS)}, got {self.embedding!r}")
            if not self.model:
                p.append("model: concept selection needs a teacher model (e.g. ViT-B-32 with --pretrained)")
            else:

                p.extend(check_model_spec(self.model, self.pretrained))
        elif self.threshold is not None or self.top_k is not None:
            p.append("threshold, top_k: only apply to concept selection (no concept given)")
        if self.batch_size < 1:
            p.append(f"batch_size: expected >= 1, got {self.batch_size}")
        if self.retain_size is not None and self.retain_size < 0:
            p.append(f"retain_size: expected >= 0, got {self.retain_size}")
        if self.shard_size < 1:
            p.append(f"shard_size: expected >= 1, got {self.shard_size}")
        if self.check_images not in ("none", "draft", "decode"):
            p.append(f"check_images: expected one of none, draft, decode, got {self.check_images!r}")
        if self.retries < 0 or self.backoff_s < 0:
            p.append(f"retries, backoff_s: expected >= 0, got {self.retries}, {self.backoff_s}")
        if self.total is not None and self.total < 1:
            p.append(f"total: expected >= 1, got {self.total}")
        p.extend(_output_problems(self))
        return p

    def validate(self) -> "SelectConfig":
        """Raises ConfigError listing every problem."""
        problems = self.problems()
        if problems:
            raise ConfigError(problems)
        return self


def _output_problems(cfg: SelectConfig) -> List[str]:
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        return [f"output_dir: {cfg.output_dir!r} is a file"]
    held = [m for m in SELECTION_MARKERS if (out / m).exists()]
    p = []
    if held and not cfg.overwrite:
        p.append(f"output_dir: {cfg.output_dir!r} already holds a selection ({', '.join(held)}); "
                 "pass overwrite (--overwrite) to replace it")
    # Replacing a selection deletes its forget/ and retain/: never when the input is read from there.
    replaced = [(out / m).resolve() for m in SELECTION_MARKERS + (_STAGING,)]
    urls = [Path(u).resolve() for u in expand_shards(cfg.data)] if cfg.data else []
    inside = [u for u in urls if any(r == u or r in u.parents for r in replaced)]
    if inside:
        p.append(f"output_dir: input shards lie inside the selection it would write ({inside[0]}); "
                 "choose another output_dir")
    return p


class ConceptEncoder(Protocol):
    """What concept selection needs from a teacher: embeddings, any scale (cosine normalises)."""

    def encode_text(self, texts: List[str]) -> Tensor:
        """N captions -> (N, D) float embeddings."""

    def encode_images(self, images: List[Image.Image]) -> Tensor:
        """N RGB PIL images -> (N, D) float embeddings."""


class ClipEncoder:
    """An open_clip model as a ConceptEncoder: its eval preprocess and tokenizer, fp32, no grad."""

    def __init__(self, loaded, device: torch.device):
        self.loaded, self.device = loaded, device
        self.model = loaded.model.to(device)

    @classmethod
    def load(cls, name: str, pretrained: Optional[str], device: str = "auto") -> "ClipEncoder":
        """Raises ConfigError (from load_model) for an unknown model, tag or checkpoint file."""

        dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                           ("cpu" if device == "auto" else device))
        return cls(load_model(name, pretrained), dev)

    def encode_text(self, texts: List[str]) -> Tensor:
        with torch.inference_mode():
            return self.model.encode_text(self.loaded.tokenizer(texts).to(self.device)).float().cpu()

    def encode_images(self, images: List[Image.Image]) -> Tensor:
        batch = torch.stack([self.loaded.preprocess(im) for im in images]).to(self.device, non_blocking=True)
        with torch.inference_mode():
            return self.model.encode_image(batch).float().cpu()


def keys_sha256(keys: Sequence[str]) -> str:
    """The manifest's digest of a key list: sha256 of the keys, each followed by a newline, in
    output order (the bytes of the `--keys-only` file, so `sha256sum forget.txt` agrees)."""
    h = hashlib.sha256()
    for k in keys:
        h.update(k.encode("utf-8") + b"\n")
    return h.hexdigest()


def _caption(sample: dict) -> str:
    return sample["txt"].decode("utf-8").strip()


def _text_matcher(cfg: SelectConfig) -> Callable[[str], bool]:
    flags = 0 if cfg.case_sensitive else re.IGNORECASE
    if cfg.keywords:
        # Lookarounds instead of \b: \b misplaces the boundary of keywords that start or end
        # with a non-word character ("c++", "#tag").
        words = [r"\s+".join(re.escape(w) for w in k.split()) for k in cfg.keywords]
        pattern = re.compile(r"(?<!\w)(?:" + "|".join(words) + r")(?!\w)", flags)
        return lambda caption: pattern.search(caption) is not None
    patterns = [re.compile(r, flags) for r in cfg.regex]
    return lambda caption: any(p.search(caption) for p in patterns)


def _read_keys(path: str) -> Set[str]:
    return {line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()}


class _Sink:
    """One output set: shards (webdataset.ShardWriter, bytes copied unchanged) or a key list,
    with the count and the running sha256 of its keys."""

    def __init__(self, root: Path, name: str, keys_only: bool, shard_size: int):
        self.count, self._hash = 0, hashlib.sha256()
        self.name = f"{name}.txt" if keys_only else name
        if keys_only:
            self._keys, self._shards = open(root / self.name, "w", encoding="utf-8"), None
        else:
            (root / name).mkdir(parents=True)
            # encoder=False: the writer must not re-encode anything (it would gzip "*.gz" again).
            self._keys, self._shards = None, wds.ShardWriter(str(root / name / "%05d.tar"), maxcount=shard_size,
                                                             verbose=0, encoder=False)

    def write(self, sample: dict) -> None:
        key = sample["__key__"]
        if self._shards is not None:
            self._shards.write({k: v for k, v in sample.items() if not k.startswith("_")} | {"__key__": key})
        else:
            self._keys.write(key + "\n")
        self._hash.update(key.encode("utf-8") + b"\n")
        self.count += 1

    def close(self) -> dict:
        (self._shards or self._keys).close()
        return {"path": self.name, "count": self.count, "keys_sha256": self._hash.hexdigest()}


class _Reservoir:
    """A uniform random sample of `size` items from a stream, in O(size) memory: each item gets
    a random priority and the `size` smallest are kept (equivalent to reservoir sampling).
    `smallest(n, excluding)` is then a uniform n-sample of the stream minus `excluding`, as long
    as `excluding` holds at most `size - n` of the stream's items."""

    def __init__(self, size: int, seed: int):
        self.size, self._rng, self._heap = size, random.Random(seed), []  # max-heap via negation

    def add(self, ident: Ident, ordinal: int) -> None:
        item = (-self._rng.random(), ordinal, ident)
        if len(self._heap) < self.size:
            heapq.heappush(self._heap, item)
        elif self.size and item > self._heap[0]:
            heapq.heapreplace(self._heap, item)

    def smallest(self, n: int, excluding: Set[Ident] = frozenset()) -> List[Tuple[int, Ident]]:
        """(ordinal, ident) of the chosen items, in stream order."""
        kept = sorted((item for item in self._heap if item[2] not in excluding), key=lambda t: -t[0])[:n]
        return sorted((o, i) for _, o, i in kept)


def _progress(desc: str, total: Optional[int], enabled: bool):
    from tqdm.auto import tqdm

    # The rate is what a user can act on at this scale; the ETA needs a known total (counting
    # tar members up front would cost a pass over the corpus).
    return tqdm(total=total, desc=desc, unit=" samples", unit_scale=True, disable=not enabled,
                dynamic_ncols=True, mininterval=1.0)


def select(cfg: SelectConfig, *, encoder: Optional[ConceptEncoder] = None, progress: bool = True) -> dict:
    """Write the forget and retain sets of `cfg` (see the module docstring); return the manifest.

    `encoder` replaces the teacher for concept selection (tests, or a model already loaded);
    by default `cfg.model`/`cfg.pretrained` are loaded with `models.load_model`.
    Raises ConfigError for an invalid config (every problem at once), when the teacher cannot be
    loaded, or when no sample could be read at all; RuntimeError when the shards changed between
    the scan and the copying pass. Nothing in `output_dir` changes unless the run completes.
    """
    cfg.validate()
    t0 = time.perf_counter()
    shards = expand_shards(cfg.data)
    kind = cfg.rule_kind()
    if kind == "concept" and encoder is None:
        encoder = ClipEncoder.load(cfg.model, cfg.pretrained, cfg.device)
        if not cfg.pretrained:
            log.warning("concept selection with random %s weights: pass --pretrained for meaningful scores", cfg.model)
    check = "decode" if kind == "concept" and cfg.embedding == "image" else cfg.check_images
    reader = ShardReader(shards, check_images=check, retries=cfg.retries, backoff_s=cfg.backoff_s)
    out = Path(cfg.output_dir)
    staging = out / _STAGING
    if staging.exists():  # an interrupted run of ours; nothing there is anyone else's
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        scan = _scan(cfg, reader, staging, encoder, progress)
        if reader.samples == 0:
            raise ConfigError([f"data: no usable samples in {len(shards)} shards (skipped: {reader.skip_counts()})"])
        sets = scan["sets"] | _write_deferred(cfg, shards, staging, scan, check, progress)
        wall = time.perf_counter() - t0
        manifest = {
            "tool": "cliperase select",
            "version": _version(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "rule": _describe_rule(cfg, scan),
            "output": "keys" if cfg.keys_only else "shards",
            "forget": sets["forget"],
            "retain": sets["retain"] | {"sampled": scan["sampled"]},
            "source": {"data": cfg.data, "shards": shards, "samples_read": reader.samples,
                       "skipped": reader.skip_counts(), "bad_shards": reader.bad_shards},
            "shard_size": None if cfg.keys_only else cfg.shard_size,
            "wall_s": round(wall, 3),
            "samples_per_s": round(reader.samples / max(wall, 1e-9), 1),
        }
        _commit(out, staging, manifest)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return manifest


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cliperase")
    except PackageNotFoundError:
        return "unknown"


def _describe_rule(cfg: SelectConfig, scan: dict) -> dict:
    kind = cfg.rule_kind()
    if kind == "keywords":
        return {"kind": kind, "keywords": list(cfg.keywords), "whole_words": True, "case_sensitive": cfg.case_sensitive}
    if kind == "regex":
        return {"kind": kind, "regex": list(cfg.regex), "search_in": "caption", "case_sensitive": cfg.case_sensitive}
    if kind == "keys":
        return {"kind": kind, "keys_file": cfg.keys_file, **scan["rule_extra"]}
    return {"kind": kind, "concept": cfg.concept, "embedding": cfg.embedding, "threshold": cfg.threshold,
            "top_k": cfg.top_k, "model": cfg.model, "pretrained": cfg.pretrained, **scan["rule_extra"]}


def _commit(out: Path, staging: Path, manifest: dict) -> None:
    """Swap the new selection in. The old manifest goes first, so a crash halfway leaves a
    directory without a manifest (incomplete), never a manifest describing other sets."""
    old = out / "manifest.json"
    if old.exists():
        old.unlink()
    for name in SELECTION_MARKERS[1:]:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    for part in (manifest["forget"]["path"], manifest["retain"]["path"]):
        (staging / part).rename(out / part)
    write_json(manifest, out / "manifest.json")


def _batches(reader: ShardReader, size: int, bar) -> Iterator[List[dict]]:
    batch: List[dict] = []
    for sample in reader:
        bar.update(1)
        batch.append(sample)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class _Decisions:
    """Where each decided sample goes while the scan streams by: the forget / retain sinks, or (a
    sampled retain set) the reservoir of retain candidates."""

    def __init__(self, cfg: SelectConfig, staging: Path, top_k: Optional[int]):
        sampled = cfg.retain_size is not None
        self.sinks: Dict[str, _Sink] = {}
        if top_k is None:
            self.sinks["forget"] = _Sink(staging, "forget", cfg.keys_only, cfg.shard_size)
            if not sampled:
                self.sinks["retain"] = _Sink(staging, "retain", cfg.keys_only, cfg.shard_size)
        # Top-k removes at most k of the retain candidates afterwards, so a reservoir k larger than
        # the request still yields a uniform sample of the non-forget samples (see _Reservoir).
        self.reservoir = _Reservoir(cfg.retain_size + (top_k or 0), cfg.seed) if sampled else None
        self.candidates = 0

    def __call__(self, sample: dict, ordinal: int, forget: bool) -> None:
        if forget:
            self.sinks["forget"].write(sample)
        elif "retain" in self.sinks:
            self.sinks["retain"].write(sample)
        else:
            self.reservoir.add((sample["__shard__"], sample["__key__"]), ordinal)
        self.candidates += not forget


def _scan_text(cfg: SelectConfig, reader: ShardReader, decide: _Decisions, bar) -> Tuple[int, dict]:
    """Keywords, regexes or a key list: each sample decided as it streams by. Returns (samples, rule extras)."""
    kind = cfg.rule_kind()
    matcher = _text_matcher(cfg) if kind != "keys" else None
    keys = _read_keys(cfg.keys_file) if kind == "keys" else set()
    seen: Set[str] = set()
    ordinal = 0
    for sample in reader:
        bar.update(1)
        if matcher is None:
            hit = sample["__key__"] in keys
            if hit:
                seen.add(sample["__key__"])
        else:
            hit = matcher(_caption(sample))
        decide(sample, ordinal, hit)
        ordinal += 1
    if kind != "keys":
        return ordinal, {}
    missing = keys - seen
    return ordinal, {"keys_listed": len(keys), "keys_not_found": len(missing),
                     "keys_not_found_examples": sorted(missing)[:10]}


def _scan_concept(cfg: SelectConfig, reader: ShardReader, encoder, decide: _Decisions, top: List[tuple],
                  bar) -> Tuple[int, dict]:
    """A concept prompt: samples scored in batches, decided by threshold as they stream by, or kept
    in the `top` min-heap of (score, -ordinal, ident) for top-k. Returns (samples, rule extras)."""
    top_k = cfg.top_k
    lowest = None
    ordinal = 0
    prompt = F.normalize(encoder.encode_text([cfg.concept]).float(), dim=-1)[0]  # (D,)
    for batch in _batches(reader, cfg.batch_size, bar):
        if cfg.embedding == "image":
            emb = encoder.encode_images([s.pop("__image__") for s in batch])
        else:
            emb = encoder.encode_text([_caption(s) for s in batch])
        scores = (F.normalize(emb.float(), dim=-1) @ prompt).tolist()  # one host copy per batch
        for sample, score in zip(batch, scores):
            if top_k is None:
                hit = score >= cfg.threshold
                if hit and (lowest is None or score < lowest):
                    lowest = score
                decide(sample, ordinal, hit)
            else:  # on ties the later sample leaves the heap
                item = (score, -ordinal, (sample["__shard__"], sample["__key__"]))
                if len(top) < top_k:
                    heapq.heappush(top, item)
                elif item > top[0]:
                    heapq.heapreplace(top, item)
                if decide.reservoir is not None:
                    decide.reservoir.add(item[2], ordinal)
            ordinal += 1
    return ordinal, ({"lowest_forget_score": lowest} if top_k is None else {"cutoff_score": top[0][0] if top else None})


def _scan(cfg: SelectConfig, reader: ShardReader, staging: Path, encoder, progress: bool) -> dict:
    """The pass over the corpus that decides. A set whose every decision is known as a sample
    streams by is written here ("sets": name -> its manifest entry); the others come back as
    the (ordinal, ident) of their samples in stream order ("ids": name -> list), or for a
    retain set of every non-forget sample as its size ("retain_rest")."""
    top_k = cfg.top_k if cfg.rule_kind() == "concept" else None
    decide = _Decisions(cfg, staging, top_k)
    top: List[tuple] = []
    with _progress("select", cfg.total, progress) as bar:
        if cfg.rule_kind() == "concept":
            ordinal, extra = _scan_concept(cfg, reader, encoder, decide, top, bar)
        else:
            ordinal, extra = _scan_text(cfg, reader, decide, bar)
    ids: Dict[str, List[Tuple[int, Ident]]] = {}
    if top_k is not None:
        ids["forget"] = sorted((-neg, ident) for _, neg, ident in top)
        decide.candidates = ordinal - len(top)
    sampled_info = None
    if decide.reservoir is not None:
        excluded = {ident for _, ident in ids.get("forget", [])}
        ids["retain"] = decide.reservoir.smallest(cfg.retain_size, excluded)
        if len(ids["retain"]) < cfg.retain_size:
            log.warning("retain_size %d > %d non-forget samples: retain holds all of them",
                        cfg.retain_size, decide.candidates)
        sampled_info = {"requested": cfg.retain_size, "from": decide.candidates, "seed": cfg.seed,
                        "method": "reservoir"}
    # Top-k without a retain sample: retain is every other sample, written by a second pass.
    retain_rest = decide.candidates if top_k is not None and decide.reservoir is None else None
    return {"sets": {name: sink.close() for name, sink in decide.sinks.items()}, "ids": ids, "sampled": sampled_info,
            "retain_rest": retain_rest, "rule_extra": extra}


def _write_deferred(cfg: SelectConfig, shards: List[str], staging: Path, scan: dict, check_images: str,
                    progress: bool) -> Dict[str, dict]:
    """Write the sets the scan could not. Key lists chosen by identity come straight from the
    scan's ids; shards, and a retain set that is "every sample not in forget" (`top_k` without
    `retain_size`), come from a second pass over the corpus. That pass re-applies the scan's
    image check when it must tell good samples from bad ones again (the complement), and only
    copies bytes otherwise. Raises RuntimeError when the pass does not find the samples the scan
    chose (the shards changed during the run)."""
    ids, rest = scan["ids"], scan["retain_rest"]
    if not ids:
        return {}
    if cfg.keys_only and rest is None:
        sets = {}
        for name, chosen in ids.items():
            sink = _Sink(staging, name, True, cfg.shard_size)
            for _, (_, key) in chosen:
                sink.write({"__key__": key})
            sets[name] = sink.close()
        return sets
    wanted = {name: {ident for _, ident in chosen} for name, chosen in ids.items()}
    expected = {name: len(chosen) for name, chosen in wanted.items()}
    if rest is not None:
        expected["retain"] = rest
    sinks = {name: _Sink(staging, name, cfg.keys_only, cfg.shard_size) for name in expected}
    reader = ShardReader(shards, check_images=check_images if rest is not None else "none", retries=cfg.retries,
                         backoff_s=cfg.backoff_s)
    with _progress("copy", cfg.total, progress) as bar:
        for sample in reader:
            bar.update(1)
            ident = (sample["__shard__"], sample["__key__"])
            placed = False
            for name, chosen in wanted.items():
                if ident in chosen:
                    sinks[name].write(sample)
                    placed = True
            if rest is not None and not placed:
                sinks["retain"].write(sample)
    sets = {name: sink.close() for name, sink in sinks.items()}
    for name, info in sets.items():
        if info["count"] != expected[name]:
            raise RuntimeError(f"{name}: {expected[name]} samples chosen in the scan but {info['count']} found "
                               "when writing them; did the shards change during the run?")
    return sets
