"""Wall time of the demo's main job on this machine (pytest-benchmark, one round).

    .venv/bin/python -m pytest benchmarks/bench_demo.py --benchmark-enable

Times the two parts a user waits for: the one-off preparation (data generation + pretraining
tiny-clip, cached afterwards) and the unlearning run itself (evaluation before and after
included). The targets of the demo are checked on the run's own report.
"""
import os

import pytest

from cliperase.engine import unlearn
from cliperase.engine.tools.demo import demo_config, prepare_demo


@pytest.mark.slow
def test_demo_wall_time(benchmark, tmp_path):
    cache = tmp_path / "cache"
    cfg = {}

    def job():
        prepare_demo(cache, progress=False)
        cfg["c"] = demo_config(cache, output_dir=str(tmp_path / "run"), progress=False)
        return unlearn(cfg["c"], progress=False)

    report = benchmark.pedantic(job, rounds=1, iterations=1)
    benchmark.extra_info.update(
        machine=f"{os.cpu_count()} CPU cores, no GPU",
        unlearn_wall_s=report["wall_s"],
        before=report["before"]["zeroshot"],
        after=report["after"]["zeroshot"],
    )
    before, after = report["before"]["zeroshot"], report["after"]["zeroshot"]
    assert before["forget_acc"] >= 0.90
    assert after["forget_acc"] <= 0.05
    assert abs(after["retain_acc"] - before["retain_acc"]) <= 0.02
