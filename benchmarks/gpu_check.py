"""The GPU validation kit: one command on an offline GPU machine, at most 6 minutes of parts.

    make gpu-wheels                  # here (PyPI reachable): .whl/, see benchmarks/gpu/wheels.py
    make gpu-check                   # there: python3 benchmarks/gpu_check.py
    GPU_CHECK_DRY=1 make gpu-check   # the CPU dry run (tiny sizes, tiny-vit; in make test)

Parts, in order, each in its own process group under its own time cap (killed when past it and
recorded as timed out; a later part still runs, and every finished part's result is kept):
  install  pip install of .whl/ offline (benchmarks/gpu/wheels.py; skipped in the dry run)
  tests    pytest -m gpu tests: pass/fail/skip counts and the failures
  kernels  benchmarks/gpu/kernels.py: loss fwd+bwd per provider against the measured GEMM rate
  vith     benchmarks/gpu/vith.py: ViT-H-14 unlearning step (deepspeed, ZeRO-3) vs plain open_clip
Time a part leaves unused goes to the next ones; the total never exceeds TOTAL_CAP_S. The
record's `environment` holds nvidia-smi's reading (taken by this process, which never touches
CUDA itself) and, once the kernels part has run, its GPU name, SMs, CUDA, driver (NVML), torch,
Triton and open_clip versions; the install part adds every carried and image package's version.

Results: one JSON, gpu-check-<device>.json, rewritten after every part, and the parts' output
in gpu-check-<device>.log, both in --out (default: $OUT when set, else benchmarks/results/);
one summary line per part on stdout. Exit status 0 when every part that ran passed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script: the repo root, not benchmarks/, on sys.path
    sys.path[0] = str(ROOT)

from benchmarks.gpu import write_json  # noqa: E402

__all__ = ["PARTS", "TOTAL_CAP_S", "main"]

TOTAL_CAP_S = 360.0
KILL_GRACE_S = 10.0
SHM_NEEDED_BYTES = 40 * 2**30
NVIDIA_SMI_FIELDS = "name,memory.total,driver_version,clocks.max.sm,power.limit"


@dataclass(frozen=True)
class Part:
    name: str
    cap_s: float  # on the GPU
    dry_cap_s: float  # in the CPU dry run (2 shared cores: imports alone take seconds)
    argv: Callable[[Path, bool], Optional[List[str]]]  # (work dir, dry) -> command; None: skipped


def _py(*args: str) -> List[str]:
    return [sys.executable, *args]


PARTS = (
    Part("install", 40, 0, lambda w, dry: None if dry else _py("-m", "benchmarks.gpu.wheels", "install", "--out", str(w / "install.json"))),
    Part("tests", 60, 240, lambda w, dry: _py("-m", "pytest", "-m", "gpu", "tests", "-q", "-p", "no:cacheprovider",
                                               f"--junitxml={w / 'tests.xml'}")),
    Part("kernels", 90, 240, lambda w, dry: _py("-m", "benchmarks.gpu.kernels", "--out", str(w / "kernels.json"),
                                                 *(["--dry"] if dry else []))),
    Part("vith", 170, 360, lambda w, dry: _py("-m", "benchmarks.gpu.vith", "--out", str(w / "vith.json"), "--work",
                                              str(w / "vith"), *(["--dry"] if dry else []))),
)


def _nvidia_smi(fields: str) -> Optional[str]:
    try:
        done = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0 or not done.stdout.strip():
        return None
    return done.stdout.strip()


def device_slug(dry: bool) -> str:
    """'nvidia-h200' from nvidia-smi's first GPU name; 'cpu-dry' for the dry run."""
    if dry:
        return "cpu-dry"
    name = (_nvidia_smi("name") or "unknown-gpu").splitlines()[0]
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def scratch_root(dry: bool) -> Optional[str]:
    """/dev/shm when it has room for the ViT-H run (a ~16 GB ZeRO-3 checkpoint, the 4 GB input, a
    2 GB export: written to memory instead of the VM's disk, inside the part's cap), else the
    default temporary folder."""
    try:
        roomy = not dry and shutil.disk_usage("/dev/shm").free >= SHM_NEEDED_BYTES
    except OSError:
        roomy = False
    return "/dev/shm" if roomy else None


def run_part(part: Part, argv: List[str], cap_s: float, log) -> Dict[str, object]:
    """Run one part's command in its own process group; kill the group past `cap_s`."""
    log.write(f"\n===== {part.name}: {' '.join(argv)} (cap {cap_s:.0f} s)\n")
    log.flush()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        rc = proc.wait(timeout=cap_s)
        status = "ok" if rc == 0 else "failed"
    except subprocess.TimeoutExpired:
        status = "timed_out"
        for sig, grace in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        rc = proc.wait()
    return {"status": status, "rc": rc, "wall_s": time.monotonic() - t0, "cap_s": cap_s, "command": argv}


def junit_counts(xml: Path) -> Dict[str, object]:
    """Counts and failures from pytest's --junitxml report."""
    if not xml.exists():
        return {"report": None, "reason": "no junit report (pytest killed or crashed before writing it)"}
    suite = ET.parse(xml).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failures = []
    for case in suite.iter("testcase"):
        for bad in list(case.findall("failure")) + list(case.findall("error")):
            failures.append({"test": f"{case.get('classname')}::{case.get('name')}", "kind": bad.tag,
                             "message": (bad.get("message") or "")[:500], "text": (bad.text or "")[-1500:]})
    n["passed"] = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    return {**n, "failures_detail": failures, "seconds": float(suite.get("time", 0))}


def part_result(part: Part, work: Path) -> Optional[dict]:
    """What the part left in `work` (read even when it was killed)."""
    if part.name == "tests":
        return junit_counts(work / "tests.xml")
    path = work / f"{part.name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _ms(x: Optional[float]) -> str:
    return "-" if x is None else f"{x * 1e3:.1f} ms"


def _summary_kernels(r: dict) -> str:
    cases = r.get("cases", [])
    counts = {k: sum(c["status"] == k for c in cases) for k in ("ok", "skipped", "oom", "error")}
    gemm = "; ".join(f"GEMM N={g['n']}: {g['tflops']:.0f} TFLOP/s" for g in r.get("gemm", []))
    big = max((c["n"] for c in cases), default=None)
    best = [f"{c['loss']}/{c['provider']} {_ms(c.get('seconds_min'))} ({c['roofline_ratio']:.2f}x)"
            for c in cases if c["n"] == big and c["status"] == "ok" and c["provider"] in ("triton", "inf_cl", "chunked")]
    return f"{len(cases)} cases {counts}; {gemm}; N={big}: " + ", ".join(best)


def _summary_vith(r: dict) -> str:
    plain, engine = r.get("plain", {}), r.get("engine", {})
    peak = (engine.get("torch_peak") or {}).get("max_memory_allocated")
    util = (engine.get("nvml") or {}).get("util_pct_mean")
    bits = [f"{r.get('settings', {}).get('model')} batch {r.get('settings', {}).get('batch')}+{r.get('settings', {}).get('batch')}",
            f"engine {engine.get('step_s', float('nan')):.3f} s/step ({engine.get('pairs_per_s', float('nan')):.0f} pairs/s)",
            f"plain {plain.get('step_s', float('nan')):.3f} s/step",
            f"ratio {r.get('step_ratio', float('nan')):.2f} (goal <= 1.1)"]
    if peak is not None:
        bits.append(f"torch peak {peak / 2**30:.1f} GiB")
    if util is not None:
        bits.append(f"NVML util {util:.0f}%")
    return ", ".join(bits)


def _summary_install(r: dict) -> str:
    pip = "pip resolve ok" if r.get("pip", {}).get("rc") == 0 else "pip resolve FAILED, --no-deps fallback used"
    return (f"{pip}; imports {'ok' if r.get('imports_ok') else 'FAILED'}; torch/triton "
            f"{'untouched' if r.get('image_untouched') else 'CHANGED'} {r.get('image_after')}; {r.get('project_wheel')}")


def _summary_tests(r: dict) -> str:
    if r.get("report") is None and "tests" not in r:
        return r.get("reason", "")
    failed = ", ".join(f["test"] for f in r["failures_detail"][:5])
    return (f"{r['passed']} passed, {r['failures']} failed, {r['errors']} errors, {r['skipped']} skipped"
            + (f": {failed}" if failed else ""))


SUMMARIES = {"install": _summary_install, "tests": _summary_tests, "kernels": _summary_kernels,
             "vith": _summary_vith}


def summary_line(name: str, rec: dict) -> str:
    head = f"gpu-check: {name:<8}{rec['status']:<10}"
    if rec["status"] == "skipped":
        return head + rec.get("reason", "")
    head += f"{rec['wall_s']:6.1f} s of {rec['cap_s']:.0f} s"
    result = rec.get("result")
    if not result:
        return head + ": no result written"
    try:
        return f"{head}: {SUMMARIES[name](result)}"
    except (KeyError, TypeError, ValueError) as exc:  # a partial result: say so, keep the JSON
        return f"{head}: partial result ({type(exc).__name__}: {exc})"


def run_all(parts: List[Part], dry: bool, out_dir: Path, work: Path) -> int:
    slug = device_slug(dry)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, log_path = out_dir / f"gpu-check-{slug}.json", out_dir / f"gpu-check-{slug}.log"
    record: Dict[str, object] = {"kit": "benchmarks/gpu_check.py", "dry": dry, "device": slug, "command": sys.argv,
                                 "scratch": str(work),
                                 "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                 "total_cap_s": TOTAL_CAP_S, "parts": {},
                                 "environment": {"nvidia_smi": _nvidia_smi(NVIDIA_SMI_FIELDS)}}
    t0, budget_s, slack = time.monotonic(), TOTAL_CAP_S, 0.0
    with open(log_path, "w") as log:
        for part in parts:
            argv = part.argv(work, dry)
            if argv is None:
                rec = {"status": "skipped", "reason": "dry run: the CPU venv is the environment"}
            else:
                # Dry caps are generous (shared CPUs) and do not count against TOTAL_CAP_S.
                cap = part.dry_cap_s if dry else min(part.cap_s + slack, budget_s - (time.monotonic() - t0))
                rec = run_part(part, argv, cap, log)
                rec["result"] = part_result(part, work)
                if not dry:
                    slack = max(0.0, cap - rec["wall_s"])
            record["parts"][part.name] = rec
            if part.name == "kernels" and rec.get("result"):
                record["environment"].update(rec["result"].get("environment", {}))
            record["total_s"] = time.monotonic() - t0
            write_json(json_path, record)
            print(summary_line(part.name, rec), flush=True)
    bad = [n for n, r in record["parts"].items() if r["status"] not in ("ok", "skipped")]
    print(f"gpu-check: total {record['total_s']:.0f} s (cap {TOTAL_CAP_S:.0f} s{', not applied: dry run' if dry else ''}); "
          f"{'all parts passed' if not bad else 'NOT passed: ' + ', '.join(bad)}; results {json_path}", flush=True)
    return 1 if bad else 0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry", action="store_true", help="CPU dry run: tiny sizes, no install, dry caps")
    p.add_argument("--out", type=Path, default=None, help="results folder (default $OUT, else benchmarks/results)")
    p.add_argument("--parts", default=",".join(x.name for x in PARTS), help="comma-separated subset, in kit order")
    p.add_argument("--keep-work", action="store_true", help="keep the scratch folder (data, runs, logs)")
    args = p.parse_args(argv)
    wanted = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = sorted(set(wanted) - {x.name for x in PARTS})
    if unknown or not wanted:
        p.error(f"--parts: expected names from {[x.name for x in PARTS]}, got {args.parts!r}")
    out = args.out or Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results")
    work = Path(tempfile.mkdtemp(prefix="gpu-check-", dir=scratch_root(args.dry)))
    try:
        return run_all([x for x in PARTS if x.name in wanted], args.dry, out, work)
    finally:
        if args.keep_work:
            print(f"gpu-check: scratch kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
