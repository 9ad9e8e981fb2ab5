"""Step time with the teacher-embedding cache against the live teacher, side by side in one run.

    .venv/bin/python -m pytest benchmarks/bench_teacher_cache.py --benchmark-enable \\
        --benchmark-json=benchmarks/results/cpu-teacher-cache.json

CLIPErase on ViT-B-32 (random weights, 224 px after preprocessing) with 8 forget + 8 retain
pairs per step, the same seed and data for both. The cache is built before training (its pass
is timed separately as `cache_build_s`); the live teacher runs one more forward of the retain
batch every step. `step_s` is the median step time over steps 3.. (the first two warm up),
read from each run's own log; `ratio_cache_over_live` is recorded on the second case.
"""
import json
import os
import statistics

import pytest

from cliperase.engine import UnlearnConfig, unlearn
from cliperase.engine.checkpoint import export_open_clip
from cliperase.engine.models import load_model
from cliperase.engine.tools.synthetic import write_default

MODEL, STEPS, BATCH = "ViT-B-32", 8, 8
_step_s = {}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher-cache")
    write_default(root / "data", forget=lambda s: s.shape == "circle", n_train=480, n_eval=36, seed=1)
    import torch

    torch.manual_seed(0)
    export_open_clip(load_model(MODEL).model, root / "vitb32.pt")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("teacher", ["live", "cache"])
def test_step_time_cache_vs_live(benchmark, setup, teacher):
    data = setup / "data"
    cfg = UnlearnConfig(model=MODEL, pretrained=str(setup / "vitb32.pt"), forget_data=str(data / "forget"),
                        retain_data=str(data / "retain"), eval_data=str(data / "eval"), forget_classes=("circle",),
                        steps=STEPS, batch_size=BATCH, lr=1e-6, log_every=1, save_every=0, teacher=teacher,
                        output_dir=str(setup / f"run-{teacher}"), overwrite=True)
    report = benchmark.pedantic(lambda: unlearn(cfg, progress=False), rounds=1, iterations=1)
    rows = [json.loads(line) for line in (setup / f"run-{teacher}" / "log.jsonl").read_text().splitlines()]
    step_s = statistics.median(1.0 / r["steps_per_s"] for r in rows[2:])
    _step_s[teacher] = step_s
    benchmark.extra_info.update(machine=f"{os.cpu_count()} CPU cores, no GPU", model=MODEL, batch=f"{BATCH}+{BATCH}",
                                steps=STEPS, step_s=step_s, train_s=report["train_s"],
                                cache_build_s=report["teacher"]["cache_s"])
    if teacher == "cache" and "live" in _step_s:
        benchmark.extra_info["ratio_cache_over_live"] = step_s / _step_s["live"]
    assert report["steps"] == STEPS
