"""The shard-split stream on a corpus shaped like img2dataset's CC12M output: 2 ranks x 2 workers.

    nice -n 10 .venv/bin/python benchmarks/bench_loader_cc12m.py [--shards 200 --per-shard 50] \\
        [--out benchmarks/results/cpu-loader-cc12m.json] [--tmp /tmp/cliperase-cc12m]

Needs pyarrow (`pip install -e .[bench]`) for the `.parquet` files.

The corpus (generated under --tmp, deleted afterwards): `{shard:05d}.tar` with `{key}.jpg`,
`.txt`, `.json` per sample (key = shard number and index, img2dataset's 9 digits), and beside
each tar img2dataset's `{shard:05d}.parquet` (one row per URL tried: url, caption, key, status,
error_message, width, height, original_width, original_height, exif, sha256; 5 % of the rows
failed downloads, absent from the tar as in real output) and `{shard:05d}_stats.json`. Images
are small (64 px JPEGs, one of 256 noise patterns); CC12M's real shape is 1,100 shards of
10,000 samples: this is scaled down to fit a shared 2-core machine in minutes (the figures
say what ran).

Reading: each rank (a process; no torch.distributed needed, PairStream takes rank/world) runs
`data.loader(PairStream(..., rank=r, world=2, split="shard"), workers=2)` with open_clip's
224 px eval preprocess (the ViT-L/H input) and tokenizer, batches of 256, until each of its two
readers has started epoch 1. Counted:
- bytes: the shard reader's `open` is wrapped (in the rank before its workers fork) so that every
  file it opens counts the bytes read from the OS and logs them when closed. Each reader owns
  shards/4 shards of an epoch; its first that many closes are epoch 0. Each shard must appear
  exactly once over the 4 readers, with its file size: each byte read once per epoch;
- samples: batch ids of epoch 0 (batches before a reader's epoch flips) never repeat;
- resume: rank 0 saves `Batches.state()` after batch 20 and the next 10 batches' ids and pixels;
  a new loader started from that state (fresh workers) must give the same 10 batches exactly;
- throughput: samples/s of the 2 x 2 readers (all samples consumed by both ranks over the
  longer rank's wall time) against a bare decode loop (tarfile + PIL decode to RGB, one
  process) over the same shards, timed right after. 4 workers + 2 rank processes share the
  machine's 2 cores, so the ratio is per machine, not per core.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
WORLD, WORKERS, BATCH, PX = 2, 2, 256, 224
RESUME_AT, RESUME_N = 20, 10
FAIL_RATE = 0.05


def _images(n: int = 256) -> list:
    from PIL import Image

    rng, out = np.random.default_rng(0), []
    for _ in range(n):
        base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)  # a blocky pattern: JPEG-like sizes
        img = Image.fromarray(base).resize((64, 64), Image.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shard(root: Path, shard: int, per_shard: int, images: list, rng: np.random.Generator) -> None:
    """One shard as img2dataset writes it: the tar of successes, the parquet of every URL tried,
    the stats json."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, t0 = [], time.time()
    with tarfile.open(root / f"{shard:05d}.tar", "w") as tar:
        for i in range(per_shard):
            key = f"{shard:05d}{i:04d}"
            url, caption = f"https://example.invalid/{shard}/{i}.jpg", f"a photo of thing {shard * per_shard + i}"
            if rng.random() < FAIL_RATE:
                rows.append(dict(url=url, caption=caption, key=key, status="failed_to_download",
                                 error_message="HTTP Error 404: Not Found", width=None, height=None,
                                 original_width=None, original_height=None, exif=None, sha256=None))
                continue
            jpg = images[int(rng.integers(len(images)))]
            meta = dict(url=url, caption=caption, key=key, status="success", error_message=None, width=64,
                        height=64, original_width=640, original_height=480, exif="{}",
                        sha256=hashlib.sha256(jpg).hexdigest())
            _add(tar, f"{key}.jpg", jpg)
            _add(tar, f"{key}.txt", caption.encode())
            _add(tar, f"{key}.json", json.dumps(meta).encode())
            rows.append(meta)
    pq.write_table(pa.Table.from_pylist(rows), root / f"{shard:05d}.parquet")
    ok = sum(r["status"] == "success" for r in rows)
    stats = {"count": len(rows), "successes": ok, "failed_to_download": len(rows) - ok, "failed_to_resize": 0,
             "duration": round(time.time() - t0, 3), "start_time": t0, "end_time": time.time(),
             "status_dict": {"success": ok, "HTTP Error 404: Not Found": len(rows) - ok}}
    (root / f"{shard:05d}_stats.json").write_text(json.dumps(stats, indent=4))


def make_corpus(root: Path, shards: int, per_shard: int) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    images, rng, t0 = _images(), np.random.default_rng(1), time.perf_counter()
    for s in range(shards):
        write_shard(root, s, per_shard, images, rng)
    tars = sorted(root.glob("*.tar"))
    return {"generate_s": round(time.perf_counter() - t0, 1),
            "tar_bytes": sum(p.stat().st_size for p in tars),
            "parquet_files": len(list(root.glob("*.parquet"))), "stats_files": len(list(root.glob("*_stats.json"))),
            "samples": sum(json.loads(p.read_text())["successes"] for p in root.glob("*_stats.json"))}


# --- one rank ---------------------------------------------------------------------------------

class _CountingFile(io.FileIO):
    """A shard file that logs (path, bytes read from the OS) to the process's log when closed."""

    log_dir = ""

    def __init__(self, path, mode="rb"):
        super().__init__(path, mode)
        self.count, self.path_ = 0, str(path)

    def readinto(self, b):
        n = super().readinto(b)
        self.count += n or 0
        return n

    def close(self):
        if not self.closed and self.log_dir:
            with open(Path(self.log_dir) / f"bytes-{os.getpid()}.jsonl", "a") as f:
                f.write(json.dumps({"url": self.path_, "bytes": self.count}) + "\n")
        super().close()


def _counting_open(path, mode="rb", buffering=-1):
    assert mode == "rb", mode
    return io.BufferedReader(_CountingFile(path), buffer_size=buffering if buffering > 0 else io.DEFAULT_BUFFER_SIZE)


def _stream(shards, rank: int, start=None):
    import open_clip

    from cliperase.engine.data import PairStream, loader

    stream = PairStream(shards, open_clip.image_transform(PX, is_train=False), open_clip.get_tokenizer("ViT-B-32"),
                        BATCH, seed=0, rank=rank, world=WORLD, split="shard", start=start)
    return loader(stream, WORKERS)


def _digest(images, last_ids) -> str:
    return hashlib.sha256(images.numpy().tobytes() + last_ids.numpy().tobytes()).hexdigest()[:16]


def run_rank(corpus: str, rank: int, log_dir: str) -> dict:
    import torch

    from cliperase.engine.data import resolve_shards, tar

    torch.set_num_threads(1)
    shards = resolve_shards(corpus, "cc12m")  # a directory: its .tar files, the parquet and json beside them ignored
    _CountingFile.log_dir = str(Path(log_dir) / "epoch")
    Path(_CountingFile.log_dir).mkdir(parents=True, exist_ok=True)
    tar.open = _counting_open  # module global: the shard reader's `open`, inherited by the forked workers
    batches = _stream(shards, rank)
    t0, n, epoch0_ids, saved, after = time.perf_counter(), 0, [], None, []
    while True:
        images, _ = next(batches)
        n += 1
        role = str((n - 1) % WORKERS)
        if batches.readers[role]["epoch"] == 0:
            epoch0_ids.append(batches.last_ids)
        if n == RESUME_AT:
            saved = json.loads(json.dumps(batches.state()))  # as a checkpoint stores it
        elif RESUME_AT < n <= RESUME_AT + RESUME_N:
            after.append(_digest(images, batches.last_ids))
        if n > RESUME_AT + RESUME_N and all(batches.readers.get(str(w), {}).get("epoch", 0) >= 1
                                            for w in range(WORKERS)):
            break
    wall = time.perf_counter() - t0
    del batches
    out = {"rank": rank, "batches": n, "samples": n * BATCH, "wall_s": round(wall, 2),
           "epoch0_ids": [[int(a), int(b)] for ids in epoch0_ids for a, b in ids.tolist()]}
    if rank == 0:
        _CountingFile.log_dir = str(Path(log_dir) / "resume")
        Path(_CountingFile.log_dir).mkdir(parents=True, exist_ok=True)
        resumed = _stream(shards, rank, start=saved)
        again = []
        for _ in range(RESUME_N):
            images, _ = next(resumed)
            again.append(_digest(images, resumed.last_ids))
        out["resume"] = {"saved_after_batch": RESUME_AT, "batches_compared": RESUME_N, "exact": again == after}
    return out


# --- the driver -------------------------------------------------------------------------------

def bare_loop(shards) -> dict:
    from PIL import Image

    t0, n = time.perf_counter(), 0
    for shard in shards:
        with tarfile.open(shard, mode="r|") as tf:
            for m in tf:
                if m.name.endswith(".jpg"):
                    with Image.open(io.BytesIO(tf.extractfile(m).read())) as im:
                        im.convert("RGB")
                    n += 1
    wall = time.perf_counter() - t0
    return {"samples": n, "wall_s": round(wall, 2), "samples_per_s": round(n / wall, 1)}


def check_bytes(log_dir: Path, shards: list) -> dict:
    """Each shard read exactly once, whole, over the readers' epoch 0 (their first shards/4 closes)."""
    per_reader = len(shards) // (WORLD * WORKERS)
    logs = sorted((log_dir / "epoch").glob("bytes-*.jsonl"))
    firsts = [[json.loads(line) for line in p.read_text().splitlines()][:per_reader] for p in logs]
    firsts = [f for f in firsts if f]  # the rank processes themselves open no shard
    seen: dict = {}
    for reader in firsts:
        for rec in reader:
            seen.setdefault(rec["url"], []).append(rec["bytes"])
    sizes = {s: Path(s).stat().st_size for s in shards}
    once = sorted(seen) == sorted(shards) and all(len(v) == 1 and v[0] == sizes[u] for u, v in seen.items())
    return {"readers_logged": len(firsts), "shards_per_reader": per_reader,
            "epoch0_bytes_read": sum(sum(v) for v in seen.values()), "corpus_tar_bytes": sum(sizes.values()),
            "each_byte_once": once}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=200)
    ap.add_argument("--per-shard", type=int, default=50)
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/cpu-loader-cc12m.json"))
    ap.add_argument("--tmp", default="/tmp/cliperase-cc12m")
    ap.add_argument("--rank", type=int, help=argparse.SUPPRESS)  # internal: run one rank
    args = ap.parse_args()
    tmp = Path(args.tmp)
    if args.rank is not None:
        res = run_rank(str(tmp / "corpus"), args.rank, str(tmp / "logs"))
        (tmp / f"rank{args.rank}.json").write_text(json.dumps(res))
        return
    if args.shards % (WORLD * WORKERS):
        raise SystemExit(f"--shards: expected a multiple of {WORLD * WORKERS} (readers), got {args.shards}")
    import open_clip
    import torch

    shutil.rmtree(tmp, ignore_errors=True)
    load = [os.getloadavg()[0]]
    try:
        corpus = make_corpus(tmp / "corpus", args.shards, args.per_shard)
        shards = sorted(str(p) for p in (tmp / "corpus").glob("*.tar"))
        t0 = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, __file__, "--rank", str(r), "--tmp", str(tmp)]) for r in range(WORLD)]
        if any(p.wait() for p in procs):
            raise SystemExit("a rank failed")
        loader_wall = time.perf_counter() - t0
        ranks = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(WORLD)]
        load.append(os.getloadavg()[0])
        bare = bare_loop(shards)
        load.append(os.getloadavg()[0])
        ids = [tuple(i) for r in ranks for i in r.pop("epoch0_ids")]
        consumed = sum(r["samples"] for r in ranks)
        rate = consumed / max(r["wall_s"] for r in ranks)
        result = {
            "command": " ".join(["python", "benchmarks/bench_loader_cc12m.py"] + sys.argv[1:]),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                        "ram_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                        "gpu": None},
            "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__,
                         "pyarrow": __import__("pyarrow").__version__},
            "shape": {"shards": args.shards, "urls_per_shard": args.per_shard, "image_px": 64,
                      "scaled_down_from": "CC12M: ~1,100 shards x 10,000 samples", **corpus},
            "readers": {"ranks": WORLD, "workers_per_rank": WORKERS, "batch": BATCH, "preprocess_px": PX,
                        "split": "shard"},
            "bytes": check_bytes(tmp / "logs", shards),
            "epoch0_samples": {"ids": len(ids), "unique": len(set(ids)), "no_repeat": len(ids) == len(set(ids))},
            "resume": ranks[0]["resume"],
            "ranks": ranks,
            "throughput": {"loader_samples_per_s": round(rate, 1), "loader_processes_wall_s": round(loader_wall, 1),
                           "bare_decode": bare, "loader_over_bare": round(rate / bare["samples_per_s"], 3)},
            "load_avg_1m": [round(x, 2) for x in load],
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "ranks"}, indent=2))


if __name__ == "__main__":
    main()
