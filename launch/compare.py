"""Compare unlearning methods on the same model, data, budget and seed.

    python launch/compare.py                                  # every method on the embedded default
    python launch/compare.py --methods cliperase,ga --steps 30
    python launch/compare.py --task red-circle --methods subgroup,cliperase   # forget one subgroup only
    python launch/compare.py --model ViT-B-32 --pretrained laion2b_s34b_b79k --forget-data f/ \\
        --retain-data r/ --eval-data eval/ --forget-classes dog --heldout-eval imagenet_wds/ \\
        --holdout-data unseen_dogs/ --output-dir runs/compare

Each method runs through cliperase.engine.unlearn with one config that differs only in the
method (run folder --output-dir/<method>/). Then every unlearned checkpoint and the original are
scored with the same code, and --output-dir gets:
  compare.md                 the table: forget/retain zero-shot acc, held-out zero-shot acc
                             (--heldout-eval), retrieval R@1, forget-pair cosine, MIA AUC, wall time
  compare.json               every number behind the table, histogram data included
  losses.png                 each method's loss terms over steps (from its log.jsonl)
  forget_vs_retain.png       final forget vs retain zero-shot accuracy per method
  accuracy_curves.png        forget and retain zero-shot accuracy over steps per method (eval.jsonl)
  similarity.png             forget-pair cosine distributions, original vs each method
With --breakdown ATTR (a subgroup task sets its own: colour, background) compare.md gets a second
table: zero-shot accuracy of the forget classes' eval images split by that json attribute (red
circles, blue circles, ...), images outside the forget classes, and each method's largest drop on
a sibling (a value the forget_attributes do not select) against the original.
MIA: a similarity-threshold attack, forget pairs (members) vs never-seen pairs of the same
distribution (--holdout-data shards; else the first half of the config's audit_data, the pairs
report.json's audit uses; otherwise the eval set's forget-class images and captions). AUC 0.5 = cannot tell them apart.
Calibrated MIA: each pair's cosine against the cosines of the never-seen pairs most like it in a
shadow pool (the --holdout-data pairs after the first --max-pairs, or the second half of the
config's audit_data, which the embedded default sets), an offline-LiRA test that removes per-pair
difficulty (engine/eval/forget.py neighbourhood_calibrated). Both as AUC and as TPR at 1% FPR.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from cliperase.engine import ConfigError, UnlearnConfig, unlearn
from cliperase.engine.checkpoint import write_json
from cliperase.engine.config import DATA_KEYS, all_keys, config_overrides, keys_for, method_names, trajectory_fields
from cliperase.engine.data import load_eval_set
from cliperase.engine.eval import (attribute_mask, embed_eval_set, forget_mask, parse_attributes, split_metrics,
                                   zeroshot_breakdown)
from cliperase.engine.eval.evaluator import SHADOW_K, split_audit_pairs
from cliperase.engine.eval.forget import (load_pairs, membership_audit, pair_embeddings, plot_similarity_histograms,
                                          similarity_histogram)
from cliperase.engine.eval.metrics import zeroshot_accuracy
from cliperase.engine.methods import METHODS
from cliperase.engine.models import load_model
from cliperase.engine.models.hf import hf_model_name
from cliperase.engine.preflight import problems as config_problems
from cliperase.engine.tools.demo import DEMO_TASKS, demo_fields
from cliperase.engine.errors import Interrupted, NonFiniteLoss
from cliperase.engine.trainer import resolve_device



def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--methods", default=",".join(METHODS), help=f"comma-separated methods (default: all, {','.join(METHODS)})")
    a("--model", help="open_clip architecture name")
    a("--pretrained", help="open_clip tag or a local checkpoint path")
    a("--forget-data", help="shards of image-caption pairs to forget")
    a("--retain-data", help="shards of image-caption pairs to keep")
    a("--eval-data", help="evaluation set in CLIP_benchmark's webdataset layout")
    a("--forget-classes", help="comma-separated class names of the eval set to forget")
    a("--steps", type=int, help="optimizer steps, every method (default: the demo's or the config's)")
    a("--batch-size", type=int, help="pairs per batch, forget and retain each")
    a("--lr", type=float, help="peak learning rate")
    a("--seed", type=int, help="seed of data order and initialisation")
    a("--config", help="JSON file of UnlearnConfig fields shared by every method")
    a("--set", action="append", default=[], metavar="FIELD=VALUE", help="any other UnlearnConfig field (JSON value)")
    a("--heldout-eval", action="append", default=[], help="held-out zero-shot set (CLIP_benchmark layout; repeatable)")
    a("--holdout-data", help="never-seen pairs of the forget distribution (shards): the first --max-pairs the MIA's "
                             "non-members, the next ones the calibrated MIA's shadow pool (default: audit_data)")
    a("--max-pairs", type=int, default=1000, help="forget / never-seen pairs scored for the histograms and MIA (default 1000)")
    a("--output-dir", default="runs/compare", help="where the runs and the comparison go (default runs/compare)")
    a("--overwrite", action="store_true", help="allow --output-dir to hold earlier runs")
    a("--resume", action="store_true", help="continue a stopped comparison: methods that finished are reused, the "
                                            "interrupted one continues from its newest checkpoint")
    subgroups = ", ".join(t for t, d in DEMO_TASKS.items() if d.where)
    a("--task", help=f"embedded default only: what to forget, one of the demo tasks: circle (every circle, the "
                     f"default) or a subgroup of one class, the rest of it kept ({subgroups})")
    a("--breakdown", metavar="ATTR", help="split the forget classes' zero-shot accuracy by this attribute of the eval "
                                          "set's {key}.json (default: the demo task's, e.g. colour)")
    a("--no-progress", action="store_true", help="no progress bars")
    return p


def base_fields(args: argparse.Namespace) -> Tuple[dict, bool]:
    """The config keys every method shares (run fields and method options, for whichever methods
    take them), and whether they are the embedded default's."""
    given = config_overrides(args.config, args.set)
    for name in ("model", "pretrained", "forget_data", "retain_data", "eval_data", "steps", "batch_size", "lr", "seed"):
        if getattr(args, name) is not None:
            given[name] = getattr(args, name)
    if args.forget_classes is not None:
        given["forget_classes"] = [c.strip() for c in args.forget_classes.split(",") if c.strip()]
    given.pop("method", None)
    given.setdefault("output_dir", args.output_dir)
    if isinstance(given.get("pretrained"), str) and "model" not in given:
        given["model"] = hf_model_name(given["pretrained"]) or UnlearnConfig.model  # a HF CLIP directory names its own
    if not any(k in given for k in DATA_KEYS):
        return demo_fields(progress=not args.no_progress, task=args.task or "circle", **given), True
    if args.task:
        raise ConfigError(["--task: chooses a task of the embedded default; give it without data flags"])
    return given, False


def method_configs(given: dict, methods: List[str], is_demo: bool, overwrite: bool,
                   resume: bool = False) -> Dict[str, UnlearnConfig]:
    """One config per method: the shared keys it takes, its own run folder, curves every ~10%.
    Raises ConfigError for an option key that none of the methods takes (it would change nothing)."""
    options = {k for k in given if k in all_keys()} - set(UnlearnConfig.__dataclass_fields__)
    unused = sorted(k for k in options if not any(k in keys_for(m, given) for m in methods))
    if unused and not is_demo:  # the demo's own defaults (calibration_data) serve whichever method needs them
        raise ConfigError([f"{k}: an option of none of the compared methods ({', '.join(methods)}); "
                           "it would change nothing" for k in unused])
    shared = UnlearnConfig.from_dict({k: v for k, v in given.items() if k not in options})
    out = Path(shared.output_dir)
    # eval_every: about ten points on each accuracy curve unless the user chose otherwise.
    eval_every = shared.eval_every or (max(1, shared.steps // 10) if shared.zero_stage == 0 and shared.precision == "fp32"
                                       else 0)
    return {m: UnlearnConfig.from_dict({**keys_for(m, given), "method": m, "output_dir": str(out / m),
                                        "overwrite": overwrite, "eval_every": eval_every,
                                        "resume": "latest" if resume else None,
                                        "log_every": min(shared.log_every, max(1, shared.steps // 30))})
            for m in methods}


def _read_log(path: Path) -> List[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _audit_halves(cfg: UnlearnConfig, preprocess, n: int):
    return split_audit_pairs(*load_pairs(cfg.audit_data, preprocess, limit=2 * n, what="audit_data"))


def nonmember_pairs(cfg: UnlearnConfig, args, preprocess, n: int):
    """(images, captions, source) of never-seen pairs like the forget pairs, or None."""
    if args.holdout_data:
        return (*load_pairs(args.holdout_data, preprocess, limit=n, what="holdout_data"), args.holdout_data)
    if cfg.audit_data:
        return (*_audit_halves(cfg, preprocess, n)[0], f"{cfg.audit_data} (first half)")
    ev = load_eval_set(cfg.eval_data, preprocess)
    keep = [i for i in forget_mask(ev, cfg.forget_classes).nonzero().flatten().tolist() if ev.captions[i]][:n]
    if not keep:
        return None
    return ev.images[keep], [ev.captions[i][0] for i in keep], f"{cfg.eval_data} (forget-class images)"


def shadow_pairs(cfg: UnlearnConfig, args, preprocess, n: int):
    """(images, captions, source) of the calibrated attack's shadow pool, or None (then that
    attack is left out): never-seen pairs, none of them a non-member the attacks are tested on."""
    if args.holdout_data:
        images, captions = load_pairs(args.holdout_data, preprocess, limit=2 * n, what="holdout_data")
        if len(images) - n > SHADOW_K:  # enough for a neighbourhood of every pair
            return images[n:], captions[n:], f"{args.holdout_data} (pairs after the first {n})"
        return None
    if cfg.audit_data:
        shadow = _audit_halves(cfg, preprocess, n)[1]
        return (*shadow, f"{cfg.audit_data} (second half)") if shadow else None
    return None


def score_model(model, tokenizer, forget, nonmember, heldout, shadow=None) -> dict:
    """Forget-pair cosines, both MIAs (membership_audit) and held-out zero-shot acc of one model."""
    embed = lambda pairs: pair_embeddings(model, tokenizer, pairs[0], pairs[1])  # noqa: E731
    members = embed(forget)
    out: dict = {"forget_sims": (members[0] * members[1]).sum(dim=-1)}
    if nonmember is not None:
        nonmembers = embed(nonmember)
        out["nonmember_sims"] = (nonmembers[0] * nonmembers[1]).sum(dim=-1)
        out["mia"] = membership_audit(members, nonmembers, embed(shadow) if shadow is not None else None, k=SHADOW_K)
    out["heldout"] = {}
    for name, ev in heldout.items():
        metrics = split_metrics(embed_eval_set(model, tokenizer, ev), ev, forget_mask(ev, []),
                                tasks=["zeroshot_classification"])
        if metrics:
            out["heldout"][name] = metrics["zeroshot_classification"]["acc1"]
    return out


def breakdown_scores(model, tokenizer, ev, attributes, by: str, cfg: UnlearnConfig) -> dict:
    """Zero-shot accuracy of the forget classes' eval images split by attribute `by`
    ({class: {value: {"acc", "n"}}}), of the images outside the forget classes ("other_acc") and of
    those split by `by` too ("other_by": {value: {"acc", "n"}}: red squares, red stars... together)."""
    emb = embed_eval_set(model, tokenizer, ev)
    in_classes = forget_mask(ev, cfg.forget_classes)
    by_class = zeroshot_breakdown(emb.image_emb, emb.classifier, ev.labels, attributes, by, ev.classnames,
                                  list(cfg.forget_classes))
    other = zeroshot_accuracy(emb.image_emb[~in_classes], emb.classifier, ev.labels[~in_classes])[0]
    other_by = {}
    for value in sorted({str(a[by]) for a in attributes if by in a}):
        keep = ~in_classes & attribute_mask(attributes, {by: (value,)})
        other_by[value] = {"acc": zeroshot_accuracy(emb.image_emb[keep], emb.classifier, ev.labels[keep])[0],
                           "n": int(keep.sum())}
    return {"by": by, "classes": by_class, "other_acc": other, "other_by": other_by}


def breakdown_table(rows: List[dict], by: str, where: dict) -> str:
    """Markdown: one column per (forget class, attribute value), the other classes (all, and those with
    the forgotten values: the same colour on other shapes), the largest drop on a sibling."""
    ok = [r for r in rows if not r.get("error") and r.get("breakdown")]
    if not ok:
        return ""
    base = next((r for r in ok if r["method"] == "original"), None)
    cols = [(c, v) for c, values in ok[0]["breakdown"]["classes"].items() for v in values]
    selected = where.get(by, ())
    siblings = [(c, v) for c, v in cols if selected and v not in selected]
    head = ["method"] + [f"{c} {by}={v}{' (forgotten)' if v in selected else ''}" for c, v in cols] + [
        "other classes"] + [f"other classes {by}={v}" for v in selected] + ["largest sibling drop"]
    lines = [f"### Zero-shot accuracy of the forget classes' eval images by {by}", "",
             f"Forgotten: {', '.join(f'{k}={chr(124).join(v)}' for k, v in where.items()) or 'whole classes'}; "
             f"sibling = a {by} the forget set does not select; drop = original minus method.", "",
             "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in ok:
        acc = lambda c, v, row=r: row["breakdown"]["classes"].get(c, {}).get(v, {}).get("acc")  # noqa: E731
        drop = max((acc(c, v, base) - acc(c, v) for c, v in siblings), default=None) if base and siblings else None
        r["largest_sibling_drop"] = drop
        other_by = [_f(r["breakdown"].get("other_by", {}).get(v, {}).get("acc")) for v in selected]
        lines.append("| " + " | ".join([r["method"]] + [_f(acc(c, v)) for c, v in cols]
                                       + [_f(r["breakdown"]["other_acc"])] + other_by + [_f(drop)]) + " |")
    return "\n".join(lines) + "\n"


def _f(v, digits: int = 3) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def markdown_table(rows: List[dict], heldout_names: List[str], title: str) -> str:
    cols = ["method", "forget acc ↓", "retain acc ↑"] + [f"held-out {h} acc ↑" for h in heldout_names] + [
        "forget i2t R@1 ↓", "retain i2t R@1 ↑", "forget t2i R@1 ↓", "retain t2i R@1 ↑",
        "forget-pair cos", "MIA AUC (0.5 = unseen)", "MIA TPR@1%FPR", "calibrated MIA AUC", "calibrated TPR@1%FPR",
        "wall s"]
    lines = [title, "", "| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        if r.get("error"):
            lines.append("| " + " | ".join([r["method"], f"failed: {r['error']}"] + [""] * (len(cols) - 2)) + " |")
            continue
        cells = [r["method"], _f(r["forget_acc"]), _f(r["retain_acc"])] + [_f(r["heldout"].get(h)) for h in heldout_names]
        cells += [_f(r["retrieval"].get(k)) for k in ("forget_i2t_r1", "retain_i2t_r1", "forget_t2i_r1", "retain_t2i_r1")]
        mia = r.get("mia") or {}
        cells += [_f(r["forget_cos"]), _f(r.get("mia_auc")), _f(mia.get("threshold", {}).get("tpr_at_1pct_fpr")),
                  _f(mia.get("calibrated", {}).get("auc")), _f(mia.get("calibrated", {}).get("tpr_at_1pct_fpr")),
                  _f(r.get("wall_s"), 1)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_losses(logs: Dict[str, List[dict]], path: Path) -> None:
    plt = _plt()
    names = [m for m, rows in logs.items() if rows]
    ncols = min(4, max(1, len(names)))
    nrows = max(1, math.ceil(len(names) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 3.2 * nrows), squeeze=False)
    skip = {"step", "lr", "steps_per_s", "elapsed_s"}
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names):
        rows = logs[name]
        for term in [k for k in rows[0] if k not in skip]:
            ax.plot([r["step"] for r in rows], [r[term] for r in rows], marker=".", label=term)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy_curves(evals: Dict[str, List[dict]], path: Path) -> None:
    """Forget and retain zero-shot accuracy over steps, one colour per method (eval.jsonl)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for (ax, key, title) in ((axes[0], "forget_acc", "forget classes (lower is better)"),
                             (axes[1], "retain_acc", "retain classes (higher is better)")):
        for name, rows in evals.items():
            if rows:
                ax.plot([r["step"] for r in rows], [r[key] for r in rows], marker=".", label=name)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylim(-0.03, 1.03)
    axes[0].set_ylabel("zero-shot accuracy")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_forget_vs_retain(rows: List[dict], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4))
    for i, r in enumerate(x for x in rows if not x.get("error")):
        marker = "*" if r["method"] == "original" else "o"
        ax.scatter(r["forget_acc"], r["retain_acc"], marker=marker, s=90)
        # Staggered label heights: methods that barely move sit on the same point as the original.
        ax.annotate(r["method"], (r["forget_acc"], r["retain_acc"]), textcoords="offset points",
                    xytext=(5, 4 - 10 * (i % 4)), fontsize=8)
    ax.set_xlabel("forget zero-shot acc (lower is better)")
    ax.set_ylabel("retain zero-shot acc (higher is better)")
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _finished(cfg: UnlearnConfig) -> Optional[dict]:
    """The report of a finished run of exactly `cfg` in its folder (same trajectory), else None."""
    path = Path(cfg.output_dir) / "report.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    return report if trajectory_fields(UnlearnConfig.from_dict(report["config"])) == trajectory_fields(cfg) else None


def run_methods(configs: Dict[str, UnlearnConfig], *, resume: bool, progress: bool) -> Tuple[Dict[str, dict], Dict[str, str]]:
    """Each method's run, in order: ({method: report}, {method: why it failed}). With `resume`, a
    method whose folder holds a finished run of the same config is reused; the others continue
    from their newest checkpoint or start (their configs say resume="latest"). Raises
    Interrupted when a signal stops a run."""
    reports: Dict[str, dict] = {}
    errors: Dict[str, str] = {}
    for name, cfg in configs.items():
        earlier = _finished(cfg) if resume else None
        if earlier is not None:
            print(f"[compare] {name}: finished earlier, reused ({cfg.output_dir})", flush=True)
            reports[name] = earlier
            continue
        print(f"[compare] {name}: {cfg.steps} steps, batch {cfg.batch_size}, lr {cfg.lr}, seed {cfg.seed}", flush=True)
        try:
            reports[name] = unlearn(cfg, progress=progress)
        except (ConfigError, NonFiniteLoss) as exc:  # one method's failure is a result, not the end
            errors[name] = str(exc).splitlines()[0]
            print(f"[compare] {name} failed: {exc}", file=sys.stderr)
    return reports, errors


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    try:
        if unknown or not methods:
            raise ConfigError([f"--methods: unknown {unknown or 'none given'}; available: {', '.join(method_names())}"])
        if args.max_pairs <= 0:
            raise ConfigError([f"--max-pairs: expected a positive integer, got {args.max_pairs}"])
        given, is_demo = base_fields(args)
        overwrite = args.overwrite or is_demo or bool(given.get("overwrite"))
        configs = method_configs(given, methods, is_demo, overwrite, args.resume)
        # Every method's config is checked before the first run, so a typo fails in seconds.
        problems = [f"{m}: {p}" for m, c in configs.items() for p in config_problems(c)]
        if problems:
            raise ConfigError(problems)
        return _compare(args, next(iter(configs.values())), is_demo, configs, Path(given["output_dir"]), given)
    except ConfigError as exc:
        print(f"compare: error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(f"compare: {exc}; run the same command with --resume to continue the comparison", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:  # a second signal: stopped at once, without a checkpoint of the step
        print("compare: stopped at once; run the same command with --resume to continue from the last checkpoints",
              file=sys.stderr)
        return 130


def _compare(args, base: UnlearnConfig, is_demo: bool, configs: Dict[str, UnlearnConfig], out: Path,
             given: dict) -> int:
    out.mkdir(parents=True, exist_ok=True)
    reports, errors = run_methods(configs, resume=args.resume, progress=not args.no_progress)

    device = resolve_device(base.device)
    original = load_model(base.model, base.pretrained, device=device)
    forget = load_pairs(base.forget_data, original.preprocess, limit=args.max_pairs, what="forget_data")
    nonmember = nonmember_pairs(base, args, original.preprocess, args.max_pairs)
    shadow = shadow_pairs(base, args, original.preprocess, args.max_pairs) if nonmember else None
    heldout = {Path(h).resolve().name: load_eval_set(h, original.preprocess) for h in args.heldout_eval}
    by = args.breakdown
    if by is None and is_demo:
        by = DEMO_TASKS[args.task or "circle"].breakdown
    if by:
        eval_set = load_eval_set(base.eval_data, original.preprocess)
        attributes = eval_set.attributes

    def add_breakdown(r: dict, model, tokenizer) -> dict:
        if by:
            r["breakdown"] = breakdown_scores(model, tokenizer, eval_set, attributes, by, base)
        return r

    def row(method: str, report_part: dict, scores: dict, wall_s) -> dict:
        retrieval = {f"{part}_{k}": v for part, r in report_part.get("retrieval", {}).items() for k, v in r.items()}
        zs = report_part.get("zeroshot", {})
        return {"method": method, "forget_acc": zs.get("forget_acc"), "retain_acc": zs.get("retain_acc"),
                "retrieval": retrieval, "heldout": scores["heldout"], "forget_cos": scores["forget_sims"].mean().item(),
                "mia_auc": scores["mia"]["threshold"]["auc"] if "mia" in scores else None, "mia": scores.get("mia"), "wall_s": wall_s}

    scores = {"original": score_model(original.model, original.tokenizer, forget, nonmember, heldout, shadow)}
    rows = []
    if reports:
        rows.append(add_breakdown(row("original", next(iter(reports.values()))["before"], scores["original"], None),
                                  original.model, original.tokenizer))
    for name in configs:
        if name in errors:
            rows.append({"method": name, "error": errors[name]})
            continue
        model = load_model(base.model, reports[name]["checkpoint"], device=device)
        scores[name] = score_model(model.model, model.tokenizer, forget, nonmember, heldout, shadow)
        rows.append(add_breakdown(row(name, reports[name]["after"], scores[name], reports[name]["wall_s"]),
                                  model.model, model.tokenizer))
        if reports[name].get("method_details"):
            rows[-1]["method_details"] = reports[name]["method_details"]
        del model

    series = {"original: forget pairs": scores["original"]["forget_sims"]}
    if nonmember is not None:
        series["original: never-seen pairs"] = scores["original"]["nonmember_sims"]
    series.update({f"{m}: forget pairs": s["forget_sims"] for m, s in scores.items() if m != "original"})
    hist = similarity_histogram(series)
    plot_similarity_histograms(hist, out / "similarity.png")
    plot_losses({m: _read_log(Path(c.output_dir) / "log.jsonl") for m, c in configs.items()}, out / "losses.png")
    plot_forget_vs_retain(rows, out / "forget_vs_retain.png")
    plot_accuracy_curves({m: _read_log(Path(c.output_dir) / "eval.jsonl") for m, c in configs.items()
                          if (Path(c.output_dir) / "eval.jsonl").is_file()}, out / "accuracy_curves.png")

    heldout_names = list(heldout)
    title = (f"## {base.model} ({Path(base.pretrained).name if base.pretrained else 'random init'}): "
             f"{base.steps} steps, batch {base.batch_size} + {base.batch_size}, lr {base.lr}, seed {base.seed}, "
             f"forget classes {', '.join(base.forget_classes)}"
             f"{f' ({base.forget_attributes} only)' if base.forget_attributes else ''}\n\n"
             f"Zero-shot and retrieval on {base.eval_data}; forget-pair cosine = mean over {len(forget[1])} forget "
             f"pairs; MIA = similarity-threshold attack, forget pairs vs "
             f"{len(nonmember[1]) if nonmember else 0} never-seen pairs "
             f"({nonmember[2] if nonmember else 'none available'}); calibrated MIA = the same pairs, each cosine "
             f"against those of its {SHADOW_K} nearest of {len(shadow[1]) if shadow else 0} shadow pairs "
             f"({shadow[2] if shadow else 'none available: left out'}); TPR@1%FPR = members caught at 1% false "
             f"positives (0.01 = chance); wall s = whole unlearn() call.")
    table = markdown_table(rows, heldout_names, title)
    if by:
        table += "\n" + breakdown_table(rows, by, parse_attributes(base.forget_attributes))
    (out / "compare.md").write_text(table)
    write_json({"config": {**{k: v for k, v in base.to_dict().items() if k in UnlearnConfig.__dataclass_fields__},
                           **given, "forget_classes": list(base.forget_classes)}, "methods": list(configs), "rows": rows, "histogram": hist,
                "nonmember_source": nonmember[2] if nonmember else None, "shadow_source": shadow[2] if shadow else None},
               out / "compare.json")
    print(table)
    print(f"[compare] wrote {out / 'compare.md'}, compare.json, losses.png, forget_vs_retain.png, accuracy_curves.png, similarity.png")
    return 1 if errors and not reports else 0


if __name__ == "__main__":
    sys.exit(main())
