"""cliperase's evaluation against the real CLIP_benchmark, metric by metric, on the embedded
default's eval sets (eval/ for classification, eval_retrieval/ for retrieval).

    python3 -m venv /tmp/cb && /tmp/cb/bin/pip install clip-benchmark==1.6.2   # beside the project
    .venv/bin/python benchmarks/clip_benchmark_agreement.py --clip-benchmark-python /tmp/cb/bin/python \\
        --out benchmarks/results/cpu-clip-benchmark-agreement.json

The other interpreter must import torch, open_clip and cliperase (for register_configs, which
makes tiny-clip an open_clip model); this script does not install anything. Scored checkpoints:
the demo's pretrained tiny-clip (when prepared) and a random-init tiny-clip (seed 0). Each is
scored by launch/evaluate.py and by `clip_benchmark eval --no_amp` (fp32, as cliperase scores),
then `clip_benchmark build` reads both result folders into one CSV, whose rows must pair up on
(dataset, model, pretrained, task).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

_CB_MAIN = ("import sys; from cliperase.engine.models import register_configs; register_configs(); "
            "from clip_benchmark.cli import main; sys.argv = ['clip_benchmark'] + sys.argv[1:]; sys.exit(main())")


def random_checkpoint(path: Path) -> Path:
    import open_clip

    from cliperase.engine.models import register_configs

    register_configs()
    torch.manual_seed(0)
    torch.save(open_clip.create_model("tiny-clip").state_dict(), path)
    return path


def run_theirs(py: str, ckpt: Path, data: Path, out: Path) -> None:
    for name, task in (("eval", "zeroshot_classification"), ("eval_retrieval", "zeroshot_retrieval")):
        subprocess.run([py, "-c", _CB_MAIN, "eval", "--model", "tiny-clip", "--pretrained", str(ckpt),
                        "--dataset", f"wds/{name}", "--dataset_root", str(data / name), "--task", task, "--no_amp",
                        "--batch_size", "256", "--num_workers", "0", "--recall_k", "1", "5", "10",
                        "--output", str(out / "{dataset}_{pretrained}_{model}_{language}_{task}.json")], check=True)


def run_ours(ckpt: Path, data: Path, out: Path) -> None:
    subprocess.run([sys.executable, "launch/evaluate.py", "--model", "tiny-clip", "--pretrained", str(ckpt),
                    "--dataset", str(data / "eval"), "--dataset", str(data / "eval_retrieval"),
                    "--forget-classes", "circle", "--output", str(out), "--no-progress"], check=True)


def compare(ours: Path, theirs: Path) -> list:
    rows = []
    for path in sorted(theirs.glob("*.json")):
        t = json.loads(path.read_text())
        match = [json.loads(p.read_text()) for p in ours.glob("*.json")]
        o = next(r for r in match if (r["dataset"], r["model"], r["pretrained"], r["task"]) ==
                 (t["dataset"], t["model"], t["pretrained"], t["task"]))
        for metric, theirs_v in sorted(t["metrics"].items()):
            ours_v = o["metrics"].get(metric)
            both_nan = ours_v is None and isinstance(theirs_v, float) and theirs_v != theirs_v
            rows.append({"dataset": t["dataset"], "task": t["task"], "pretrained": Path(t["pretrained"]).name,
                         "metric": metric, "ours": ours_v, "clip_benchmark": None if both_nan else theirs_v,
                         "abs_diff": 0.0 if both_nan else abs(ours_v - theirs_v),
                         "note": "NaN there (fewer than 5 classes), null here" if both_nan else None})
    return rows


def build_joins(py: str, ours: Path, theirs: Path, csv_path: Path) -> dict:
    subprocess.run([py, "-c", _CB_MAIN, "build", str(ours), str(theirs), "--output", str(csv_path)], check=True)
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    keys = [(r["dataset"], r["model"], r["pretrained"], r["task"]) for r in rows]
    return {"rows": len(rows), "keys": len(set(keys)), "every_key_twice": all(keys.count(k) == 2 for k in keys)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clip-benchmark-python", required=True, help="an interpreter with clip_benchmark 1.6.2")
    p.add_argument("--out", default="benchmarks/results/cpu-clip-benchmark-agreement.json")
    p.add_argument("--data", help="a folder holding eval/ and eval_retrieval/ (default: the demo's, prepared)")
    p.add_argument("--checkpoint", action="append", default=[], metavar="LABEL=PATH",
                   help="a tiny-clip checkpoint to score besides the random-init one (repeatable; default: the "
                        "demo's pretrained one)")
    args = p.parse_args()
    from cliperase.engine.tools.demo import prepare_demo

    if args.data:
        data, given = Path(args.data), dict(c.split("=", 1) for c in args.checkpoint)
    else:
        paths = prepare_demo(progress=False, say=lambda m: print(m, file=sys.stderr))
        data, given = paths["data"], {"demo-pretrained": paths["pretrained"], **dict(c.split("=", 1) for c in args.checkpoint)}
    # CLIP_benchmark 1.6.2's accuracy() calls float() on a 1-element array, an error from numpy 2.4
    # on: its interpreter needs numpy < 2.4 (recorded here).
    version = subprocess.run([args.clip_benchmark_python, "-c", "import importlib.metadata as m; "
                              "print(m.version('clip-benchmark'), m.version('numpy'))"], capture_output=True,
                             text=True, check=True)
    result = {"command": " ".join(sys.argv), "load_avg": os.getloadavg(), "machine": {
        "platform": platform.platform(), "cpus": os.cpu_count(),
        "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1)},
        "versions": {"torch": torch.__version__, "open_clip": __import__("open_clip").__version__,
                     "numpy": __import__("numpy").__version__, "clip_benchmark": version.stdout.split()[0],
                     "numpy_of_clip_benchmark": version.stdout.split()[1]},
        "eval_sets": {"classification": str(data / "eval"), "retrieval": str(data / "eval_retrieval")},
        "checkpoints": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpts = {"random-init": random_checkpoint(tmp / "tiny-clip-random.pt"), **{k: Path(v) for k, v in given.items()}}
        for label, ckpt in ckpts.items():
            ours, theirs = tmp / label / "ours", tmp / label / "theirs"
            theirs.mkdir(parents=True)
            run_ours(ckpt, data, ours)
            run_theirs(args.clip_benchmark_python, ckpt, data, theirs)
            rows = compare(ours, theirs)
            result["checkpoints"][label] = {"metrics": rows, "max_abs_diff": max(r["abs_diff"] for r in rows),
                                            "build": build_joins(args.clip_benchmark_python, ours, theirs,
                                                                 tmp / label / "benchmark.csv")}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for label, r in result["checkpoints"].items():
        print(f"{label}: max |ours - clip_benchmark| = {r['max_abs_diff']:.3g}, build {r['build']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
