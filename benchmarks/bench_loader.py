"""Loader throughput (samples/s) on 10,000-sample img2dataset shards, five ways side by side:

- bare: read the tars (Python's tarfile) and decode each JPEG to RGB, nothing else (the floor
  of any loader written the usual way);
- bare_own_tar: the same with the engine's own tar reader (data.ShardReader, unchecked): the
  floor of this engine's loader; `overhead_ratio_vs_bare_own_tar` in the other rows is against it;
- pipeline: `PairStream` as a training worker runs it: its shard reader, shuffle buffer, sample
  checks, open_clip's eval preprocess split by `data.split_preprocess` (decode, resize and crop
  written into a uint8 batch; the float conversion runs later on the device), `FastTokenizer`,
  batches of 256 with positions and sample ids; one torch thread as in the DataLoader worker
  of `data.loader(stream, workers=1)` (PyTorch sets 1 thread in workers). (Iterated in a
  process with the default 2 intra-op threads on a busy 2-core machine, the old float
  ToTensor and Normalize took ~24 ms per 224px image instead of ~0.2 ms: the threads wait on a
  core the other job holds.);
- shard_reader: the robust `ShardReader` select uses (tar read + caption check + JPEG decode at
  1/8 scale), no preprocessing;
- fast: the CPU half of `engine.preprocess` as a loader worker runs it: the bare loop's tar
  read + `FastPreprocess.cpu_into(raw, batch, i)` (decode, draft, resize, crop, written straight
  into a uint8 `empty_batch` of 256) + `FastTokenizer` per 256 captions, one torch thread. It
  runs in this process, so the batch is private memory, not the shared memory a worker would
  allocate (benchmarks/README.md). The float conversion and normalisation run later on the
  device and are not part of it. Its row also holds a paired measurement (`paired_*`): bare,
  fast, and fast writing every batch into one reused buffer (which isolates the cost of fresh
  batch memory), interleaved shard by shard, so a change in the machine's load hits all three,
  with wall and CPU (process) time.

open_clip's preprocess and tokenizer are built once per process, outside the timed calls (a
worker builds them once; loading the BPE vocabulary alone takes 0.2-0.3 s).

    .venv/bin/python -m pytest benchmarks/bench_loader.py --benchmark-enable \\
        --benchmark-json=benchmarks/results/cpu-loader-fast.json

Shards are generated once into a cache under the temp dir. 32px: the embedded generator's
images. 224px (the real case): those images upscaled, plus mild pixel noise, because flat
shapes compress to ~3 KB where CC12M-like JPEGs are ~15-30 KB and decode cost follows the
bytes. One round each: a pass over 10,000 samples is long enough to time, and the machine may
be shared (the load average at the start is recorded). `overhead_ratio` in the other rows
is bare samples/s divided by their samples/s; `cpu_samples_per_s` divides by the process's CPU
time instead of wall time, which waiting for a core on a shared machine does not inflate.
"""
import functools
import io
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cliperase.engine.data import PairStream, ShardReader
from cliperase.engine.data.preprocess import FastPreprocess, FastTokenizer
from cliperase.engine.tools.synthetic import _encode, generate

N = 10_000
SHARD_SIZE = 2_500
BATCH = 256
PROVIDERS = ("bare", "bare_own_tar", "pipeline", "shard_reader", "fast")
CASES = [(px, provider) for px in (32, 224) for provider in PROVIDERS]
ONE_THREAD = ("pipeline", "fast")  # run as in a DataLoader worker
_rates = {}  # (px, provider) -> samples/s, for the overhead ratio
_cpu_rates = {}  # (px, provider) -> samples per CPU second


def _cache(px: int) -> Path:
    root = Path(tempfile.gettempdir()) / "cliperase-bench-loader" / f"{px}px-{N}"
    if (root / "done").exists():
        return root
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    rng = np.random.default_rng(0)
    import webdataset as wds

    with wds.ShardWriter(str(partial / "%05d.tar"), maxcount=SHARD_SIZE, verbose=0) as sink:
        for s in generate(N, 0):
            image = s.image
            if px != 32:
                a = np.asarray(image.resize((px, px), Image.BICUBIC), dtype=np.int16)
                image = Image.fromarray(np.clip(a + rng.integers(-10, 11, size=a.shape, dtype=np.int16), 0, 255)
                                        .astype(np.uint8))
            sink.write({"__key__": s.key, "jpg": _encode(image, "JPEG"), "txt": s.caption, "json": str(s.meta)})
    (partial / "done").write_text("ok\n")
    if root.exists():
        shutil.rmtree(root)
    partial.rename(root)
    return root


def _shards(px: int):
    return sorted(str(p) for p in _cache(px).glob("*.tar"))


def _bare(shards) -> int:
    n = 0
    for shard in shards:
        with tarfile.open(shard, mode="r|") as tar:
            for m in tar:
                if m.name.endswith(".jpg"):
                    with Image.open(io.BytesIO(tar.extractfile(m).read())) as im:
                        im.convert("RGB")
                    n += 1
    return n


def _bare_own_tar(shards) -> int:
    """The bare loop with the engine's tar reader instead of tarfile: read + decode to RGB only,
    so `pipeline` against it is the cost of everything else a training stream does."""
    n = 0
    for sample in ShardReader(shards, check_images="none", check_samples=False):
        with Image.open(io.BytesIO(sample["jpg"])) as im:
            im.convert("RGB")
        n += 1
    return n


def _one_thread(fn, *args) -> int:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def _open_clip_halves(px: int):
    """open_clip's eval preprocess and tokenizer, built once per process and outside the timed
    call: a worker builds them once and then streams (loading the BPE vocabulary alone takes
    ~0.2-0.3 s, 5-10 % of a 32px pass)."""
    import open_clip

    return open_clip.image_transform(px, is_train=False), open_clip.get_tokenizer("ViT-B-32")


def _pipeline(shards, px: int) -> int:
    preprocess, tokenizer = _open_clip_halves(px)
    return _one_thread(_pipeline_epoch, shards, px, preprocess, tokenizer)


def _pipeline_epoch(shards, px: int, preprocess, tokenizer) -> int:
    stream = PairStream(shards, preprocess, tokenizer, BATCH, seed=0)
    batches = iter(stream)
    n = 0
    for _ in range(N // BATCH):  # the stream is endless: one epoch's worth of full batches
        images, tokens, _ = next(batches)
        assert images.shape == (BATCH, 3, px, px) and images.dtype == torch.uint8 and tokens.shape[0] == BATCH
        n += BATCH
    return n


def _fast(shards, px: int) -> int:
    preprocess, tokenizer = _open_clip_halves(px)  # FastTokenizer starts with an empty word cache
    return _one_thread(_fast_epoch, shards, px, FastPreprocess.from_open_clip(preprocess), FastTokenizer(tokenizer))


def _fast_epoch(shards, px: int, preprocess: FastPreprocess, tokenizer: FastTokenizer, reuse: bool = False) -> int:
    """The bare loop's tar read, plus what a worker must hand over: uint8 image batches, each
    image decoded straight into its slot, and token batches (the last batch may be short).
    `reuse`: write every batch into the same buffer (not a usable loader: it isolates the cost
    of fresh batch memory)."""
    n, batch, texts, i = 0, preprocess.empty_batch(BATCH), [], 0
    for shard in shards:
        with tarfile.open(shard, mode="r|") as tar:
            for m in tar:
                if m.name.endswith(".jpg"):
                    preprocess.cpu_into(tar.extractfile(m).read(), batch, i)
                    i += 1
                elif m.name.endswith(".txt"):
                    texts.append(tar.extractfile(m).read().decode("utf-8").strip())
                if i == BATCH and len(texts) == BATCH:
                    n += _fast_batch(batch, texts, tokenizer, px)
                    batch, texts, i = (batch if reuse else preprocess.empty_batch(BATCH)), [], 0
    return n + (_fast_batch(batch[:i], texts, tokenizer, px) if i else 0)


def _fast_batch(images, texts, tokenizer: FastTokenizer, px: int) -> int:
    tokens = tokenizer(texts)
    assert images.shape == (len(texts), 3, px, px) and images.dtype == torch.uint8 and tokens.shape[0] == len(texts)
    return len(texts)


def _paired(shards, px: int, rounds: int = 2) -> dict:
    """bare, fast and fast with one reused batch buffer, interleaved shard by shard (the order
    rotated each time), `rounds` passes over the shards; wall and CPU seconds per provider."""
    preprocess, tokenizer = _open_clip_halves(px)
    fast_pre, fast_tok = FastPreprocess.from_open_clip(preprocess), FastTokenizer(tokenizer)
    runs = {"bare": lambda s: _bare([s]),
            "fast": lambda s: _one_thread(_fast_epoch, [s], px, fast_pre, fast_tok),
            "fast_reused_batch": lambda s: _one_thread(_fast_epoch, [s], px, fast_pre, fast_tok, True)}
    names = list(runs)
    totals = {name: [0.0, 0.0] for name in names}
    for i, shard in enumerate(shards * rounds):
        for name in names[i % 3:] + names[:i % 3]:
            wall, cpu = time.perf_counter(), time.process_time()
            runs[name](shard)
            totals[name][0] += time.perf_counter() - wall
            totals[name][1] += time.process_time() - cpu
    bare_wall, bare_cpu = totals["bare"]
    out = {"paired_rounds": rounds}
    for name, (wall, cpu) in totals.items():
        out[f"paired_{name}_samples_per_s"] = round(rounds * N / wall, 1)
        out[f"paired_{name}_cpu_samples_per_s"] = round(rounds * N / cpu, 1)
        if name != "bare":
            out[f"paired_{name}_overhead_ratio"] = round(wall / bare_wall, 3)
            out[f"paired_{name}_cpu_overhead_ratio"] = round(cpu / bare_cpu, 3)
    return out


def _shard_reader(shards) -> int:
    reader = ShardReader(shards, check_images="draft")
    n = sum(1 for _ in reader)
    assert sum(reader.skip_counts().values()) == 0
    return n


def _run(px: int, provider: str, shards) -> int:
    if provider == "bare":
        return _bare(shards)
    if provider == "bare_own_tar":
        return _bare_own_tar(shards)
    if provider == "pipeline":
        return _pipeline(shards, px)
    if provider == "fast":
        return _fast(shards, px)
    return _shard_reader(shards)


@pytest.mark.slow
@pytest.mark.parametrize("px,provider", CASES, ids=[f"{px}px-{p}" for px, p in CASES])
def test_loader_throughput(benchmark, px, provider):
    shards = _shards(px)
    _open_clip_halves(px)
    load = os.getloadavg()[0]
    cpu = time.process_time()
    n = benchmark.pedantic(_run, args=(px, provider, shards), rounds=1, iterations=1)
    cpu = time.process_time() - cpu
    rate = n / benchmark.stats.stats.mean
    _rates[(px, provider)] = rate
    _cpu_rates[(px, provider)] = n / cpu
    jpeg_bytes = sum(Path(s).stat().st_size for s in shards) / N
    benchmark.extra_info.update(
        provider=provider, image_px=px, samples=n, samples_per_s=round(rate, 1),
        mean_sample_bytes=round(jpeg_bytes), machine=f"{os.cpu_count()} CPU cores, no GPU",
        load_avg_1m_at_start=round(load, 2), torch=torch.__version__,
        torch_threads=1 if provider in ONE_THREAD else torch.get_num_threads(),
        cpu_samples_per_s=round(n / cpu, 1),
    )
    if provider != "bare":
        bare = _rates.get((px, "bare"))
        bare_cpu = _cpu_rates.get((px, "bare"))
        if bare is None:  # run alone (-k): time the bare loop once, outside the benchmark
            t, c = time.perf_counter(), time.process_time()
            bare = _bare(shards) / (time.perf_counter() - t)
            bare_cpu = N / (time.process_time() - c)
        benchmark.extra_info.update(bare_samples_per_s=round(bare, 1), overhead_ratio=round(bare / rate, 3),
                                    cpu_overhead_ratio=round(bare_cpu / (n / cpu), 3))
        own = _rates.get((px, "bare_own_tar"))
        if own is not None and provider != "bare_own_tar":
            benchmark.extra_info["overhead_ratio_vs_bare_own_tar"] = round(own / rate, 3)
    if provider == "fast":
        benchmark.extra_info.update(_paired(shards, px), load_avg_1m_at_end=round(os.getloadavg()[0], 2))
