"""The subgroup method's settings on the embedded default's red-circle task, one run per row.

    .venv/bin/python benchmarks/subgroup_ablation.py --output benchmarks/results/subgroup-ablation.jsonl

Each row runs `unlearn()` with the demo's red-circle config (60 steps, batch 64 + 64, lr 5e-5)
plus the row's fields, then scores the unlearned model with compare.py's breakdown: zero-shot
accuracy of circles per colour on the eval set, of the other classes, and of red shapes of other
classes; plus the soup weight `a` and the calibration split's accuracies before the soup.
One JSON line per row, appended as each finishes (a crash keeps the rows done).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "launch"))

# name -> UnlearnConfig fields on top of the demo's red-circle config (method subgroup).
ROWS = {
    "default": {},
    "default, seed 1": {"seed": 1},
    "default, seed 2": {"seed": 2},
    "guard 0 (METHOD.md's remind)": {"subgroup_guard": 0.0},
    "guard 0, seed 1": {"subgroup_guard": 0.0, "seed": 1},
    "guard 0, seed 2": {"subgroup_guard": 0.0, "seed": 2},
    "guard 0, 30 forget steps (the earlier default)": {"subgroup_guard": 0.0, "subgroup_forget_steps": 30},
    "30 forget steps": {"subgroup_forget_steps": 30},
    "15 forget steps": {"subgroup_forget_steps": 15},
    "5 forget steps": {"subgroup_forget_steps": 5},
    "no forget stage (remind, restore)": {"subgroup_stages": "remind,restore"},
    "guard 1": {"subgroup_guard": 1.0},
    "guard 10": {"subgroup_guard": 10.0},
    "forget stage only, 10 steps": {"subgroup_stages": "forget", "steps": 10},
    "forget stage only, 20 steps": {"subgroup_stages": "forget", "steps": 20},
    "120 steps (20 forget)": {"steps": 120},
}


def run_row(name: str, fields: dict, work: Path) -> dict:
    from compare import breakdown_scores

    from cliperase.engine import unlearn
    from cliperase.engine.data import load_eval_set
    from cliperase.engine.demo import demo_config
    from cliperase.engine.evaluate import load_attributes
    from cliperase.engine.models import load_model

    out = work / f"run{abs(hash(name))}"
    cfg = demo_config(output_dir=str(out), task="red-circle", progress=False, method="subgroup", **fields)
    start = time.perf_counter()
    report = unlearn(cfg, progress=False)
    wall = time.perf_counter() - start
    loaded = load_model(cfg.model, str(out / "model.pt"))
    ev = load_eval_set(cfg.eval_data, loaded.preprocess)
    b = breakdown_scores(loaded.model.eval(), loaded.tokenizer, ev, load_attributes(cfg.eval_data), "colour", cfg)
    details = report.get("method_details", {})
    soup = details.get("soup", {})
    before = next((t for t in soup.get("tried", []) if t["a"] == 1.0), None)
    return {"name": name, "fields": fields, "circle_by_colour": {k: v["acc"] for k, v in b["classes"]["circle"].items()},
            "other_classes": b["other_acc"], "other_classes_red": b["other_by"].get("red", {}).get("acc"),
            "soup_a": soup.get("a"), "calibration_before_soup": before, "layers": details.get("layers"),
            "forget_steps": details.get("forget_steps"), "remind_steps": details.get("remind_steps"),
            "wall_s": round(wall, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="JSON-lines file the rows are appended to")
    p.add_argument("--rows", help="comma-separated row names to run (default: all)")
    args = p.parse_args()
    names = args.rows.split(",") if args.rows else list(ROWS)
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        p.error(f"--rows: unknown rows {unknown}; rows: {list(ROWS)}")
    with tempfile.TemporaryDirectory() as work:
        for name in names:
            row = run_row(name, ROWS[name], Path(work))
            with open(args.output, "a") as f:
                f.write(json.dumps(row) + "\n")
            c = row["circle_by_colour"]
            print(f"{name}: red {c.get('red'):.3f} blue {c.get('blue'):.3f} other classes {row['other_classes']:.3f} "
                  f"a {row['soup_a']}", flush=True)


if __name__ == "__main__":
    main()
