"""The GPU validation kit (benchmarks/gpu_check.py) on CPU: the whole dry run through its make
target, the runner's caps and kills, the wheel list and the staleness digest."""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import gpu_check
from benchmarks.gpu import wheels

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_dry_run_make_target_runs_every_part(tmp_path):
    """`GPU_CHECK_DRY=1 make gpu-check`: tests, kernels and the tiny-vit unlearning step under the
    deepspeed launcher all finish, each with its summary line and its result in one JSON."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    t0 = time.monotonic()
    done = subprocess.run(["make", "-s", "gpu-check", "GPU_CHECK_DRY=1", f"PY={sys.executable}", "GPU_CHECK_DEPS=",
                           f"GPU_CHECK_ARGS=--out {tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    wall = time.monotonic() - t0
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}\n{(tmp_path / 'gpu-check-cpu-dry.log').read_text()[-6000:]}"
    record = json.loads((tmp_path / "gpu-check-cpu-dry.json").read_text())
    parts = record["parts"]
    assert [n for n in parts] == ["install", "tests", "kernels", "vith"]
    assert parts["install"]["status"] == "skipped"
    assert all(parts[n]["status"] == "ok" for n in ("tests", "kernels", "vith")), {n: p["status"] for n, p in parts.items()}
    for name in parts:
        assert re.search(rf"^gpu-check: {name} ", done.stdout, re.M), done.stdout
    tests = parts["tests"]["result"]
    assert tests["tests"] >= 1 and tests["failures"] == tests["errors"] == 0

    kernels = parts["kernels"]["result"]
    assert [g["n"] for g in kernels["gemm"]] == [48, 80] and all(g["seconds_min"] > 0 for g in kernels["gemm"])
    by = {(c["loss"], c["provider"], c["n"]): c for c in kernels["cases"]}
    for loss, providers in (("clip_infonce", ("open_clip", "chunked", "naive")), ("cliperase_loss", ("chunked", "naive"))):
        for provider in providers:
            for n in (48, 80):
                c = by[(loss, provider, n)]
                assert c["status"] == "ok" and c["seconds_min"] > 0, c
                gemm = next(g for g in kernels["gemm"] if g["n"] == n)
                assert c["roofline_ratio"] == pytest.approx(c["seconds_min"] / (kernels["passes"][loss] * gemm["seconds_min"]))
    assert {c["reason"] for c in kernels["cases"] if c["provider"] in ("triton", "inf_cl")} == \
        {"triton needs a CUDA GPU", "inf_cl needs a CUDA GPU"}
    assert record["environment"]["torch"] == kernels["environment"]["torch"]

    vith = parts["vith"]["result"]
    assert vith["data"]["px"] == 224 and vith["settings"]["model"] == "tiny-vit"
    engine, plain = vith["engine"], vith["plain"]
    assert engine["rc"] == 0 and len(engine["step_times_s"]) == vith["settings"]["steps"]
    assert "--zero-stage" in engine["command"] and engine["command"][engine["command"].index("--zero-stage") + 1] == "3"
    assert engine["torch_peak"]["device"] == "cpu" and engine["report"]["train_s"] > 0
    assert plain["params"] > 0 and plain["checkpoint_bytes"] > 0 and len(plain["step_times_s"]) == vith["settings"]["plain_steps"]
    assert vith["step_ratio"] == pytest.approx(engine["step_s"] / plain["step_s"])
    print(f"dry run: {wall:.0f} s wall; parts " + ", ".join(f"{n} {p.get('wall_s', 0):.0f} s" for n, p in parts.items()))


def _part(name, code, cap):
    return gpu_check.Part(name, cap, cap, lambda w, dry: [sys.executable, "-c", code])


def test_a_part_past_its_cap_is_killed_with_its_children_and_the_next_part_runs(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    hang = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    parts = [_part("tests", hang, 2), _part("kernels", "print('fine')", 30)]
    t0 = time.monotonic()
    rc = gpu_check.run_all(parts, True, tmp_path / "out", tmp_path)
    assert time.monotonic() - t0 < 30
    assert rc == 1
    record = json.loads((tmp_path / "out" / "gpu-check-cpu-dry.json").read_text())
    assert record["parts"]["tests"]["status"] == "timed_out" and record["parts"]["tests"]["wall_s"] < 15
    assert record["parts"]["kernels"]["status"] == "ok"
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and Path(f"/proc/{grandchild}").exists() and \
            Path(f"/proc/{grandchild}/stat").read_text().split()[2] != "Z":
        time.sleep(0.1)
    assert not Path(f"/proc/{grandchild}").exists() or Path(f"/proc/{grandchild}/stat").read_text().split()[2] == "Z"


def test_junit_counts_reads_failures(tmp_path):
    xml = tmp_path / "t.xml"
    xml.write_text('<testsuites><testsuite tests="4" failures="1" errors="0" skipped="1" time="2.5">'
                   '<testcase classname="tests.a" name="ok"/><testcase classname="tests.a" name="bad">'
                   '<failure message="assert 1 == 2">trace</failure></testcase>'
                   '<testcase classname="tests.a" name="s"><skipped message="no"/></testcase>'
                   '<testcase classname="tests.a" name="ok2"/></testsuite></testsuites>')
    got = gpu_check.junit_counts(xml)
    assert (got["passed"], got["failures"], got["skipped"]) == (2, 1, 1)
    assert got["failures_detail"] == [{"test": "tests.a::bad", "kind": "failure", "message": "assert 1 == 2", "text": "trace"}]
    assert gpu_check.junit_counts(tmp_path / "missing.xml")["report"] is None


def test_gpu_pins_carry_what_the_image_lacks_at_the_cpu_versions():
    pins = wheels.carried_pins()
    assert "torch" not in pins and "triton" not in pins
    for needed in ("cliperase", "open_clip_torch", "ftfy", "wcwidth", "webdataset", "braceexpand", "deepspeed", "hjson",
                   "pydantic", "pydantic-core", "annotated-types", "inf-cl"):
        assert needed in pins, needed
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert pins["cliperase"] == version
    cpu = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (ROOT / "constraints" / "cpu.txt").read_text(), re.M))
    for name in set(cpu) & set(pins):  # what CI tests is what travels
        assert pins[name] == cpu[name], name
    gpu_txt = (ROOT / "constraints" / "gpu.txt").read_text()
    assert "torch==2.11.0" in gpu_txt and "triton==3.6.0" in gpu_txt


def test_source_digest_follows_the_package_sources(tmp_path):
    for part in ("engine", "kernels"):
        shutil.copytree(ROOT / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    before = wheels.source_digest(tmp_path)
    assert before == wheels.source_digest(ROOT)
    (tmp_path / "kernels" / "_common.py").write_text((tmp_path / "kernels" / "_common.py").read_text() + "\n# edited\n")
    assert wheels.source_digest(tmp_path) != before


def test_read_run_takes_the_steps_after_warmup_from_a_partial_run(tmp_path):
    """A run ended by the cap before report.json: the logged steps still give the step time."""
    from benchmarks.gpu.vith import read_run

    rows = [{"step": i + 1, "steps_per_s": sps, "loss": 1.0} for i, sps in enumerate((0.5, 2.0, 4.0, 1.0))]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "peak.json").write_text(json.dumps({"device": "x", "max_memory_allocated": 7}))
    got = read_run(tmp_path, tmp_path / "peak.json", {"warmup": 1, "batch": 8})
    assert got["step_times_s"] == [2.0, 0.5, 0.25, 1.0]
    assert got["step_s"] == 0.5 and got["pairs_per_s"] == 32.0  # median of 0.5, 0.25, 1.0; 2 x 8 pairs
    assert got["torch_peak"]["max_memory_allocated"] == 7 and "report" not in got
