"""The on-disk teacher cache at 10x different sizes: resident memory must not follow the corpus.

    nice -n 10 .venv/bin/python benchmarks/bench_teacher_cache_scale.py \\
        [--out benchmarks/results/cpu-teacher-cache-scale.json] [--tmp /tmp/cliperase-cache-scale]

1. Sweep. For N = 20,000 and 200,000 generated pairs (shards of 2,000) at d = 1024: tiny
   image-caption tars (one 16 px JPEG repeated, so generation is cheap: the data is not the
   point) and their cache files in the engine's layout (engine/teacher_cache.py), fp16 rows
   drawn at random and normalised (a fake teacher: building them for real needs a d = 1024
   model). Then, in a fresh process per size, a training-loop-shaped read: `data.loader` with
   2 workers over the shard-split stream with the cache's `ShardRows` as its `teacher`
   (lookups in the workers), `STEPS` batches of 256, each batch's rows moved to the device and
   re-normalised (`teacher_rows`) and a matmul against them (a stand-in for the loss). Peak RSS
   is sampled every 20 ms over the main process and its workers (RssAnon + RssFile, summed),
   and each process's VmHWM is read. The device is the CPU here (no GPU on this machine): the
   device memory is the main process's own, reported as `main_peak_rss_mb`.
   Stated bound: the larger may cost at most `workers x ShardRows.open_shards x shard file
   bytes` (the pages of the maps a worker holds open) + 64 MB (allocator noise) more.
2. Build throughput of the real pass (`TeacherCache.build_or_load`, tiny-clip, CPU) on the
   embedded demo's retain shards, and its share of a demo-shaped run's wall time (the demo's
   settings: CLIPErase, 60 steps, batch 64; tiny-clip at random init, which costs what the
   pretrained one does).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np

from cliperase.engine.telemetry import proc_status

REPO = Path(__file__).resolve().parent.parent

D, SHARD, BATCH, STEPS, WORKERS = 1024, 2_000, 256, 60, 2
SIZES = (20_000, 200_000)
NOISE_MB = 64


def _tiny_jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_corpus(root: Path, n: int) -> dict:
    """n pairs as tars of SHARD and their fp16 cache files; returns the paths and timings."""
    from cliperase.engine.teacher_cache import _write_rows
    import torch

    root.mkdir(parents=True, exist_ok=True)
    jpeg, rng = _tiny_jpeg(), np.random.default_rng(n)
    tars, files, t0 = [], [], time.perf_counter()
    for s in range(n // SHARD):
        path = root / f"{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(SHARD):
                key = f"{s:05d}{i:04d}"
                _add(tar, f"{key}.jpg", jpeg)
                _add(tar, f"{key}.txt", f"a generated caption {s} {i}".encode())
        rows = torch.from_numpy(rng.standard_normal((SHARD, 2, D), dtype=np.float32))
        rows = torch.nn.functional.normalize(rows, dim=-1)
        _write_rows(root / f"{s:05d}.npy", SHARD, list(range(SHARD)), rows, "fp16")
        tars.append(str(path))
        files.append(str(root / f"{s:05d}.npy"))
    return {"tars": tars, "files": files, "generate_s": round(time.perf_counter() - t0, 1),
            "cache_bytes": sum(Path(f).stat().st_size for f in files)}


def _children(pid: int) -> list:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


class Sampler(threading.Thread):
    """Peak of the summed RSS of this process and its children, and each one's VmHWM."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.hwm, self.stop = 0, {}, threading.Event()

    def run(self):
        me = os.getpid()
        while not self.stop.is_set():
            total = 0
            for pid in [me] + _children(me):
                st = proc_status(pid)
                total += st.get("RssAnon", 0) + st.get("RssFile", 0) + st.get("RssShmem", 0)
                if "VmHWM" in st:
                    self.hwm[pid] = max(self.hwm.get(pid, 0), st["VmHWM"])
            self.peak = max(self.peak, total)
            time.sleep(0.02)


def read_run(spec_path: str) -> dict:
    """The training-loop-shaped read (run in a fresh process): see the module docstring."""
    import open_clip
    import torch

    from cliperase.engine.data import PairStream, loader
    from cliperase.engine.teacher_cache import ShardRows, teacher_rows

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    preprocess, tokenizer = open_clip.image_transform(32, is_train=False), open_clip.get_tokenizer("ViT-B-32")
    rows = ShardRows(spec["files"], "fp16")
    stream = PairStream(spec["tars"], preprocess, tokenizer, BATCH, seed=0, shuffle_buffer=1000, teacher=rows,
                        split="shard")
    weight = torch.randn(D, D) / D ** 0.5  # the "model": what the rows meet on the device
    before = proc_status(os.getpid())
    sampler = Sampler()
    sampler.start()
    t0 = time.perf_counter()
    batches, checksum = loader(stream, WORKERS), 0.0
    for _ in range(STEPS):
        images, tokens = next(batches)
        img, txt = teacher_rows(batches.last_teacher, torch.device("cpu"))
        checksum += float((img @ weight * txt).sum())
        assert images.shape[0] == BATCH and img.shape == (BATCH, D)
    wall = time.perf_counter() - t0
    time.sleep(0.1)
    sampler.stop.set()
    sampler.join()
    main = sampler.hwm.pop(os.getpid(), 0)
    return {"steps": STEPS, "batch": BATCH, "workers": WORKERS, "read_s": round(wall, 2),
            "samples_per_s": round(STEPS * BATCH / wall, 1), "rss_before_mb": round(before["VmRSS"] / 2**20, 1),
            "peak_total_rss_mb": round(sampler.peak / 2**20, 1), "main_peak_rss_mb": round(main / 2**20, 1),
            "worker_peak_rss_mb": sorted(round(v / 2**20, 1) for v in sampler.hwm.values()),
            "checksum": checksum}


def build_throughput(tmp: Path) -> dict:
    """The real pass on the demo's retain shards, then a demo-shaped run (whose own pass is timed)."""
    import torch

    from cliperase.engine import UnlearnConfig, unlearn
    from cliperase.engine.checkpoint import export_open_clip
    from cliperase.engine.models import load_model
    from cliperase.engine.teacher_cache import TeacherCache
    from cliperase.engine.tools.synthetic import write_default

    data = tmp / "demo-data"
    write_default(data, forget=lambda s: s.shape == "circle", progress=lambda *_: None)
    torch.manual_seed(0)
    loaded = load_model("tiny-clip")
    export_open_clip(loaded.model, tmp / "tiny.pt")
    shards = sorted(str(p) for p in (data / "retain").glob("*.tar"))
    pairs = sum(1 for _ in __import__("cliperase.engine.data", fromlist=["ShardReader"]).ShardReader(shards))
    t0 = time.perf_counter()
    TeacherCache.build_or_load(tmp / "tc", "retain", shards, loaded.model.eval(), loaded.preprocess, loaded.tokenizer,
                               device=torch.device("cpu"), progress=False)
    build_s = time.perf_counter() - t0
    cfg = UnlearnConfig(model="tiny-clip", pretrained=str(tmp / "tiny.pt"), forget_data=str(data / "forget"),
                        retain_data=str(data / "retain"), eval_data=str(data / "eval"), forget_classes=("circle",),
                        method="cliperase", steps=60, batch_size=64, lr=5e-5, output_dir=str(tmp / "demo-run"),
                        overwrite=True, save_every=0)
    t0 = time.perf_counter()
    report = unlearn(cfg, progress=False)
    wall = time.perf_counter() - t0
    return {"model": "tiny-clip", "device": "cpu", "retain_pairs": pairs, "build_s": round(build_s, 2),
            "build_pairs_per_s": round(pairs / build_s, 1),
            "demo_run": {"steps": 60, "batch": "64+64", "wall_s": round(wall, 1),
                         "cache_s": round(report["teacher"]["cache_s"], 2),
                         "cache_share_of_wall": round(report["teacher"]["cache_s"] / wall, 4)}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/cpu-teacher-cache-scale.json"))
    ap.add_argument("--tmp", default="/tmp/cliperase-cache-scale")
    ap.add_argument("--read", help=argparse.SUPPRESS)  # internal: the read run's spec file
    args = ap.parse_args()
    if args.read:
        print(json.dumps(read_run(args.read)))
        return
    import torch
    from cliperase.engine.teacher_cache import ShardRows

    tmp = Path(args.tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    load = [os.getloadavg()[0]]
    result = {"command": " ".join(["python", "benchmarks/bench_teacher_cache_scale.py"] + sys.argv[1:]),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "ram_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                          "gpu": None},
              "versions": {"torch": torch.__version__, "numpy": np.__version__,
                           "open_clip": __import__("open_clip").__version__},
              "d": D, "precision": "fp16", "shard_pairs": SHARD, "sizes": {}}
    try:
        for n in SIZES:
            corpus = make_corpus(tmp / f"n{n}", n)
            spec = tmp / f"n{n}.json"
            spec.write_text(json.dumps(corpus))
            run = subprocess.run([sys.executable, __file__, "--read", str(spec)], capture_output=True, text=True,
                                 check=True)
            result["sizes"][str(n)] = {"shards": n // SHARD, "cache_mb": round(corpus["cache_bytes"] / 2**20, 1),
                                       "full_table_fp32_mb": round(n * 2 * D * 4 / 2**20, 1),
                                       "generate_s": corpus["generate_s"],
                                       **json.loads(run.stdout.strip().splitlines()[-1])}
            load.append(os.getloadavg()[0])
            shutil.rmtree(tmp / f"n{n}")
        small, large = (result["sizes"][str(n)] for n in SIZES)
        bound = WORKERS * ShardRows.open_shards * SHARD * 2 * D * 2 / 2**20 + NOISE_MB
        growth = large["peak_total_rss_mb"] - small["peak_total_rss_mb"]
        result["bound"] = {"rule": "peak_total_rss(200k) <= peak_total_rss(20k) + workers * open_shards * "
                                   f"shard file bytes + {NOISE_MB} MB", "bound_mb": round(bound, 1),
                           "growth_mb": round(growth, 1), "holds": growth <= bound}
        result["build"] = build_throughput(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load.append(os.getloadavg()[0])
    result["load_avg_1m"] = [round(x, 2) for x in load]
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
