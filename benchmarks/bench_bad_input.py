"""Wall time of refusing bad input from the command line: every case of tests/test_bad_input.py's
table run as `python launch/unlearn.py ...` in its own process (interpreter start-up and imports
included, as a user pays them), side by side in one run.

    .venv/bin/python -m pytest benchmarks/bench_bad_input.py --benchmark-enable \
        --benchmark-json=benchmarks/results/cpu-bad-input.json

Target (issue 17): under 3 s per refusal on the project's 2-core machine. The engine refuses
without importing torch or open_clip (engine/preflight.py); only an open_clip tag or a CUDA device
makes it import one of them.
"""
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from test_bad_input import CASES, Ctx, _argv  # noqa: E402  (the tests' own table of bad inputs)

from cliperase.engine.checkpoint import export_open_clip  # noqa: E402
from cliperase.engine.models import load_model  # noqa: E402
from cliperase.engine.tools.synthetic import write_default  # noqa: E402

TARGET_S = 3.0
_times: dict = {}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    import torch

    root = tmp_path_factory.mktemp("bad-input")
    write_default(root / "data", forget=lambda s: s.shape == "circle", n_train=240, n_eval=72, seed=3)
    torch.manual_seed(0)
    export_open_clip(load_model("tiny-clip").model, root / "tiny.pt")
    export_open_clip(load_model("tiny-vit").model, root / "vit.pt")
    return root


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_refusal_wall_time(benchmark, case, inputs, tmp_path):
    ctx = Ctx(inputs / "data", inputs / "tiny.pt", inputs / "vit.pt", tmp_path / "in", tmp_path / "out")
    ctx.inp.mkdir()
    made = case.make(ctx)
    argv = _argv(ctx, made if isinstance(made, dict) else {})
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}

    def refuse():
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "launch/unlearn.py", *argv], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=120)
        return done, time.perf_counter() - start

    done, wall = benchmark.pedantic(refuse, rounds=1, iterations=1)
    assert done.returncode == 2, done.stderr[-2000:]
    _times[case.id] = wall
    benchmark.extra_info.update(case=case.id, wall_s=wall, machine=f"{os.cpu_count()} CPU cores, {platform.machine()}",
                                load_avg_1m=os.getloadavg()[0], python=platform.python_version())


def test_every_refusal_is_under_the_target(benchmark):
    """Runs last (pytest keeps file order): the slowest case of this run against the target."""
    assert len(_times) == len(CASES), "run the whole file"
    slowest = max(_times, key=_times.get)
    benchmark.extra_info.update(slowest=slowest, max_s=_times[slowest], median_s=statistics.median(_times.values()),
                                target_s=TARGET_S, cases=len(_times))
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    assert _times[slowest] < TARGET_S, f"{slowest}: {_times[slowest]:.2f} s"
