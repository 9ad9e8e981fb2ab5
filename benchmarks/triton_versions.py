"""Compile the shipped Triton tiles with several Triton releases, without a GPU.

`tests/test_triton_tiles.py` checks the two Tritons the tiles are chosen for (this machine's and
the GPU image's) in every `make test`. This script checks others a user may bring: each version
is installed with `pip install --no-deps --target .cache/triton-<version>` (PyPI needed once),
then every shipped compile (`_triton_aot.shipped_jobs`: 20 table entries x 4 flag combinations,
sm_80 and sm_90) runs through `_triton_aot.Toolchain`, and the record says per version: whether
the ahead-of-time path works at all, compile errors, and which compiles spill (stack bytes).

    .venv/bin/python benchmarks/triton_versions.py 3.4.0 3.5.1 3.6.0 3.7.1 3.8.0 3.9.0 \\
        --json benchmarks/results/triton-versions.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: `benchmarks` is then not importable by itself
    sys.path.insert(0, str(REPO))

def install(version: str) -> Path:
    """.cache/triton-<version>, installed there first if it is not."""
    from benchmarks.tile_sweep import triton_dir

    path = triton_dir(version)
    if not (path / "triton").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(path),
                        f"triton=={version}"], check=True)
    return path


def check(version: str, processes: int) -> Dict:
    """Every shipped compile with one Triton release: errors and spills."""
    from cliperase.kernels._triton_aot import Toolchain, shipped_jobs

    start = time.time()
    with Toolchain(install(version), processes) as tc:
        rec = dict(version=version, toolchain=tc.versions)
        if tc.skip:
            return dict(rec, skip=tc.skip, seconds=round(time.time() - start, 1))
        records = tc.compile(shipped_jobs())
    errors = [r for r in records if "error" in r]
    spills = [r for r in records if "error" not in r and r["spills"]]
    return dict(rec, compiled=len(records), errors=[r["error"] for r in errors],
                spilling=[dict(arch=r["arch"], dtype=r["dtype"], kernel=r["kernel"], flags=r["flags"],
                               tile=r["tile"], stack=r["stack"]) for r in spills],
                max_regs=max((r["regs"] for r in records if "error" not in r), default=None),
                seconds=round(time.time() - start, 1))


def summary(rec: Dict) -> str:
    if "skip" in rec:
        return f"triton {rec['version']}: the ahead-of-time path cannot compile here ({rec['skip']})"
    spills = ", ".join(f"sm_{s['arch']} {s['dtype']} {s['kernel']} {s['stack']} B" for s in rec["spilling"])
    return (f"triton {rec['version']} (ptxas {rec['toolchain'].get('ptxas', '?')}): {rec['compiled']} compiles, "
            f"{len(rec['errors'])} errors, {len(rec['spilling'])} spill ({spills or '-'}), {rec['seconds']} s")


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("versions", nargs="+", help="Triton releases, e.g. 3.6.0")
    ap.add_argument("--jobs", type=int, default=2, help="compile processes")
    ap.add_argument("--json", type=Path, help="write the records here")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("triton_versions: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)", file=sys.stderr)
        return 2
    results = []
    for version in args.versions:
        results.append(check(version, args.jobs))
        print(summary(results[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(dict(
            command="benchmarks/triton_versions.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            machine=dict(node=platform.node(), processor=platform.processor() or platform.machine(),
                         cpus=os.cpu_count(), python=platform.python_version()),
            results=results), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
