"""Loader throughput (samples/s) on 10,000-sample img2dataset shards, three ways side by side:

- bare: read the tars and decode each JPEG to RGB, nothing else (the floor of any loader);
- pipeline: `PairStream` as training uses it: decode + open_clip eval preprocess + tokenize,
  batched (256), shuffle buffer included, with one torch thread as in the DataLoader worker
  of `data.loader(stream, workers=1)` (PyTorch sets 1 thread in workers). Iterated in a
  process with the default 2 intra-op threads on a busy 2-core machine, ToTensor and Normalize
  took ~24 ms per 224px image instead of ~0.2 ms (the threads wait on a core the other job
  holds): 28 samples/s, 60x below the bare loop; see the report of the run that added this;
- shard_reader: the robust `ShardReader` select uses (tar read + caption check + JPEG decode at
  1/8 scale), no preprocessing.

    .venv/bin/python -m pytest benchmarks/bench_loader.py --benchmark-enable \\
        --benchmark-json=benchmarks/results/cpu-loader.json

Shards are generated once into a cache under the temp dir. 32px: the embedded generator's
images. 224px (the real case): those images upscaled, plus mild pixel noise, because flat
shapes compress to ~3 KB where CC12M-like JPEGs are ~15-30 KB and decode cost follows the
bytes. One round each: a pass over 10,000 samples is long enough to time, and the machine may
be shared (the load average at the start is recorded). `overhead_ratio` in the pipeline rows
is bare samples/s divided by pipeline samples/s.
"""
import io
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cliperase.engine.data import PairStream, ShardReader
from cliperase.engine.synthetic import _encode, generate

N = 10_000
SHARD_SIZE = 2_500
BATCH = 256
CASES = [(px, provider) for px in (32, 224) for provider in ("bare", "pipeline", "shard_reader")]
_rates = {}  # (px, provider) -> samples/s, for the overhead ratio


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


def _pipeline(shards, px: int) -> int:
    import open_clip
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _pipeline_epoch(shards, px, open_clip)
    finally:
        torch.set_num_threads(threads)


def _pipeline_epoch(shards, px: int, open_clip) -> int:
    stream = PairStream(shards, open_clip.image_transform(px, is_train=False), open_clip.get_tokenizer("ViT-B-32"),
                        BATCH, seed=0)
    batches = iter(stream)
    n = 0
    for _ in range(N // BATCH):  # the stream is endless: one epoch's worth of full batches
        images, tokens = next(batches)
        assert images.shape == (BATCH, 3, px, px) and tokens.shape[0] == BATCH
        n += BATCH
    return n


def _shard_reader(shards) -> int:
    reader = ShardReader(shards, check_images="draft")
    n = sum(1 for _ in reader)
    assert sum(reader.skip_counts().values()) == 0
    return n


def _run(px: int, provider: str, shards) -> int:
    if provider == "bare":
        return _bare(shards)
    if provider == "pipeline":
        return _pipeline(shards, px)
    return _shard_reader(shards)


@pytest.mark.slow
@pytest.mark.parametrize("px,provider", CASES, ids=[f"{px}px-{p}" for px, p in CASES])
def test_loader_throughput(benchmark, px, provider):
    import torch

    shards = _shards(px)
    load = os.getloadavg()[0]
    n = benchmark.pedantic(_run, args=(px, provider, shards), rounds=1, iterations=1)
    rate = n / benchmark.stats.stats.mean
    _rates[(px, provider)] = rate
    jpeg_bytes = sum(Path(s).stat().st_size for s in shards) / N
    benchmark.extra_info.update(
        provider=provider, image_px=px, samples=n, samples_per_s=round(rate, 1),
        mean_sample_bytes=round(jpeg_bytes), machine=f"{os.cpu_count()} CPU cores, no GPU",
        load_avg_1m_at_start=round(load, 2), torch=torch.__version__,
        torch_threads=1 if provider == "pipeline" else torch.get_num_threads(),
    )
    if provider != "bare":
        bare = _rates.get((px, "bare"))
        if bare is None:  # run alone (-k): time the bare loop once, outside the benchmark
            import time

            t = time.perf_counter()
            bare = _bare(shards) / (time.perf_counter() - t)
        benchmark.extra_info.update(bare_samples_per_s=round(bare, 1), overhead_ratio=round(bare / rate, 3))
