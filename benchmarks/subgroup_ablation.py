"""The subgroup method's settings on the embedded default's subgroup tasks, one run per row.

    .venv/bin/python benchmarks/subgroup_ablation.py --output benchmarks/results/subgroup-ablation.jsonl
    .venv/bin/python benchmarks/subgroup_ablation.py --task blue-square --row default --row cliperase --output ...
    .venv/bin/python benchmarks/subgroup_ablation.py --output benchmarks/results/subgroup-ablation.jsonl --markdown

Each row runs `unlearn()` with the demo's config for the task (red-circle: forget red circles,
keep the other colours; blue-square; star-on-black: forget stars on black, keep stars on gray and
white; 60 steps, batch 64 + 64, lr 5e-5) plus the row's fields, then scores the unlearned model
with compare.py's breakdown: zero-shot accuracy of the forget class's eval images per value of the
task's attribute (colour or background), of the other classes, and of the other classes with the
forgotten value; plus the soup weight `a` and the calibration split's accuracies before the soup.
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

# name -> UnlearnConfig fields on top of the demo's config for the task (method subgroup unless given).
ROWS = {
    "default": {},
    "cliperase": {"method": "cliperase"},
    "default, seed 1": {"seed": 1},
    "default, seed 2": {"seed": 2},
    "guard 0 (METHOD.md's remind)": {"subgroup_guard": 0.0},
    "guard 0, seed 1": {"subgroup_guard": 0.0, "seed": 1},
    "guard 0, seed 2": {"subgroup_guard": 0.0, "seed": 2},
    "guard 0, 3 layers, 30 forget steps (the first defaults)": {"subgroup_guard": 0.0, "subgroup_layers": 3,
                                                                "subgroup_forget_steps": 30},
    "30 forget steps": {"subgroup_forget_steps": 30},
    "15 forget steps": {"subgroup_forget_steps": 15},
    "5 forget steps": {"subgroup_forget_steps": 5},
    "no forget stage (remind, restore)": {"subgroup_stages": "remind,restore"},
    "guard 1": {"subgroup_guard": 1.0},
    "guard 10": {"subgroup_guard": 10.0},
    "forget stage only, 10 steps": {"subgroup_stages": "forget", "steps": 10},
    "forget stage only, 20 steps": {"subgroup_stages": "forget", "steps": 20},
    "120 steps (20 forget)": {"steps": 120},
    "3 layers (the earlier default)": {"subgroup_layers": 3},
    "6 layers": {"subgroup_layers": 6},
    "15 layers (the whole image tower)": {"subgroup_layers": 15},
    "lr 1e-4": {"lr": 1e-4},
}


def run_row(task: str, name: str, fields: dict, work: Path) -> dict:
    from compare import breakdown_scores

    from cliperase.engine import unlearn
    from cliperase.engine.data import load_eval_set
    from cliperase.engine.tools.demo import DEMO_TASKS, demo_config
    from cliperase.engine.models import load_model

    out = work / f"run{abs(hash((task, name)))}"
    cfg = demo_config(output_dir=str(out), task=task, progress=False, **{"method": "subgroup", **fields})
    start = time.perf_counter()
    report = unlearn(cfg, progress=False)
    wall = time.perf_counter() - start
    loaded = load_model(cfg.model, str(out / "model.pt"))
    ev = load_eval_set(cfg.eval_data, loaded.preprocess)
    (cls,), ((by, forgotten),) = DEMO_TASKS[task].classes, DEMO_TASKS[task].where
    b = breakdown_scores(loaded.model.eval(), loaded.tokenizer, ev, ev.attributes, by, cfg)
    details = report.get("method_details", {})
    soup = details.get("soup", {})
    before = next((t for t in soup.get("tried", []) if t["a"] == 1.0), None)
    accs = {k: v["acc"] for k, v in b["classes"][cls].items()}
    return {"task": task, "name": name, "fields": fields, "by": by, "forgotten": forgotten, "class_by": accs,
            "other_classes": b["other_acc"], "other_classes_forgotten_value": b["other_by"].get(forgotten, {}).get("acc"),
            "soup_a": soup.get("a"), "calibration_before_soup": before, "layers": details.get("layers"),
            "forget_steps": details.get("forget_steps"), "remind_steps": details.get("remind_steps"),
            "wall_s": round(wall, 1)}


def markdown(rows: list) -> str:
    """One table per task: the forgotten value first, then each sibling, the other classes, the
    calibration split's accuracies before the soup (forgotten / rest) and the soup weight."""
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task]
        by, forgotten = mine[0]["by"], mine[0]["forgotten"]
        siblings = [v for v in mine[0]["class_by"] if v != forgotten]
        head = (["row", "forget / remind steps", f"{forgotten} ↓"] + siblings
                + ["other classes", f"other classes, {forgotten}", "calibration before soup", "soup a"])
        out += [f"### {task} (by {by})", "", "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        for r in mine:
            cal = r["calibration_before_soup"]
            cells = [r["name"], f"{r['forget_steps']} / {r['remind_steps']}" if r["forget_steps"] is not None else "—"]
            cells += [f"{r['class_by'][v]:.3f}" for v in [forgotten] + siblings]
            cells += [f"{r['other_classes']:.3f}", f"{r['other_classes_forgotten_value']:.3f}",
                      f"{cal['forget_acc']:.3f} / {cal['retain_acc']:.3f}" if cal else "—",
                      "—" if r["soup_a"] is None else str(r["soup_a"])]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    from cliperase.engine.tools.demo import DEMO_TASKS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="JSON-lines file the rows are appended to")
    p.add_argument("--task", default="red-circle", choices=[t for t, d in DEMO_TASKS.items() if d.where],
                   help="the demo's subgroup task (default red-circle)")
    p.add_argument("--row", action="append", dest="rows", help="a row to run, by name (repeatable; default: all rows)")
    p.add_argument("--markdown", action="store_true", help="run nothing: print --output's rows as markdown tables")
    args = p.parse_args()
    if args.markdown:
        print(markdown([json.loads(line) for line in open(args.output) if line.strip()]))
        return
    names = args.rows or list(ROWS)
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        p.error(f"--row: unknown rows {unknown}; rows: {list(ROWS)}")
    with tempfile.TemporaryDirectory() as work:
        for name in names:
            row = run_row(args.task, name, ROWS[name], Path(work))
            with open(args.output, "a") as f:
                f.write(json.dumps(row) + "\n")
            siblings = {k: v for k, v in row["class_by"].items() if k != row["forgotten"]}
            print(f"{args.task} {name}: {row['by']}={row['forgotten']} {row['class_by'][row['forgotten']]:.3f}, "
                  f"worst sibling {min(siblings.values()):.3f}, other classes {row['other_classes']:.3f}, "
                  f"a {row['soup_a']}", flush=True)


if __name__ == "__main__":
    main()
