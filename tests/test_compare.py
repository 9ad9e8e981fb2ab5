"""launch/compare.py end to end on a tiny dataset: every method's run, the table, the plots."""
import json

import pytest

from cliperase.engine.methods import METHODS
from helpers import tiny_checkpoint, tiny_data  # noqa: F401
from launch import compare

PNG = b"\x89PNG\r\n\x1a\n"


def _args(data, ckpt, out, *extra):
    return ["--model", "tiny-clip", "--pretrained", str(ckpt), "--forget-data", str(data / "forget"),
            "--retain-data", str(data / "retain"), "--eval-data", str(data / "eval"), "--forget-classes", "circle",
            "--steps", "2", "--batch-size", "8", "--lr", "1e-4", "--output-dir", str(out), "--no-progress", *extra]


@pytest.mark.slow
def test_compare_two_methods_writes_table_and_plots(tiny_data, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "cmp"
    # ft trains on retain pairs only, ga on forget pairs only: the cheapest two of different kinds.
    assert compare.main(_args(tiny_data, tiny_checkpoint, out, "--methods", "ft,ga", "--heldout-eval",
                              str(tiny_data / "eval"), "--max-pairs", "24")) == 0
    for method in ("ft", "ga"):
        report = json.loads((out / method / "report.json").read_text())
        assert report["method"] == method and report["steps"] == 2 and report["config"]["seed"] == 0
        assert report["config"]["lr"] == 1e-4 and report["config"]["batch_size"] == 8
        curve = [json.loads(line)["step"] for line in (out / method / "eval.jsonl").read_text().splitlines()]
        assert curve == [0, 1, 2], "accuracy is evaluated along the way for the curves"
    table = (out / "compare.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [r.split("|")[1].strip() for r in rows] == ["original", "ft", "ga"]
    assert "held-out eval acc" in table and "MIA AUC" in table
    for png in ("losses.png", "forget_vs_retain.png", "accuracy_curves.png", "similarity.png"):
        assert (out / png).read_bytes()[:8] == PNG, png
    summary = json.loads((out / "compare.json").read_text())
    by_method = {r["method"]: r for r in summary["rows"]}
    # The table's accuracies are the runs' own reports; the MIA compares 24 forget pairs with the
    # eval set's forget-class images (no --holdout-data given).
    assert by_method["ga"]["forget_acc"] == report["after"]["zeroshot"]["forget_acc"]
    assert by_method["original"]["mia"]["n_members"] == 24 and 0 <= by_method["ga"]["mia_auc"] <= 1
    # No shadow pool (no --shadow-data, no --holdout-data to take one from): the calibrated
    # attack is left out, and the table and compare.json say so.
    assert "calibrated" not in by_method["ga"]["mia"] and summary["shadow_source"] is None
    assert "calibrated MIA AUC" in table and "none available: left out" in table
    assert 0 <= by_method["ga"]["mia"]["threshold"]["tpr_at_1pct_fpr"] <= 1
    assert set(summary["histogram"]["series"]) == {"original: forget pairs", "original: never-seen pairs",
                                                   "ft: forget pairs", "ga: forget pairs"}
    assert "| ga |" in capsys.readouterr().out


def test_shadow_pool_is_never_a_non_member(tiny_data, tmp_path):
    import argparse

    import torch

    pre = lambda im: torch.zeros(1)  # noqa: E731 (which pairs, not their pixels)
    from cliperase.engine import UnlearnConfig

    held = str(tiny_data / "forget")  # any shards stand in for never-seen pairs here
    all_images, all_captions = compare.load_pairs(held, pre)
    n = len(all_captions) // 2
    none, cfg = argparse.Namespace(holdout_data=None), UnlearnConfig()
    # --holdout-data: the non-members are its first n pairs, the shadow pool the (up to n) after them.
    images, captions, source = compare.shadow_pairs(cfg, argparse.Namespace(holdout_data=held), pre, n)
    assert captions == all_captions[n:2 * n] and f"after the first {n}" in source
    # audit_data (what the embedded default sets): halves, as report.json's audit splits it.
    cfg = UnlearnConfig(audit_data=held)
    assert compare.nonmember_pairs(cfg, none, pre, 10 ** 6)[1] == all_captions[:(len(all_captions) + 1) // 2]
    assert compare.shadow_pairs(cfg, none, pre, 10 ** 6)[1] == all_captions[(len(all_captions) + 1) // 2:]
    assert compare.shadow_pairs(UnlearnConfig(), none, pre, 5) is None


def test_compare_rejects_unknown_method_before_running(tiny_data, tiny_checkpoint, tmp_path, capsys):
    assert compare.main(_args(tiny_data, tiny_checkpoint, tmp_path / "cmp", "--methods", "ft,forgetall")) == 2
    err = capsys.readouterr().err
    assert "forgetall" in err and all(m in err for m in METHODS)
    assert not (tmp_path / "cmp" / "ft").exists(), "nothing runs when one method is unknown"


def test_markdown_table_marks_failed_methods():
    ok = {"method": "original", "forget_acc": 0.9, "retain_acc": 0.8, "heldout": {}, "retrieval": {"forget_i2t_r1": 0.5},
          "forget_cos": 0.3, "mia_auc": None, "wall_s": None}
    table = compare.markdown_table([ok, {"method": "ga", "error": "step 3: non-finite loss"}], [], "## t")
    assert "| original | 0.900 | 0.800 | 0.500 | — | — | — | 0.300 | — | — |" in table
    assert "| ga | failed: step 3: non-finite loss |" in table


def test_breakdown_table_reports_each_subgroup_and_the_largest_sibling_drop():
    def row(method, red, blue, green, other):
        acc = lambda a: {"acc": a, "n": 40}  # noqa: E731
        return {"method": method, "breakdown": {"by": "colour", "other_acc": other, "other_by": {"red": acc(other - 0.1)},
                                                "classes": {"circle": {"blue": acc(blue), "green": acc(green), "red": acc(red)}}}}
    rows = [row("original", 1.0, 1.0, 1.0, 0.99), row("subgroup", 0.1, 0.975, 0.9, 0.98), {"method": "ga", "error": "x"}]
    table = compare.breakdown_table(rows, "colour", {"colour": ("red",)})
    assert "| method | circle colour=blue | circle colour=green | circle colour=red (forgotten) | other classes | " \
           "other classes colour=red | largest sibling drop |" in table
    assert "| original | 1.000 | 1.000 | 1.000 | 0.990 | 0.890 | 0.000 |" in table
    assert "| subgroup | 0.975 | 0.900 | 0.100 | 0.980 | 0.880 | 0.100 |" in table  # green: 1.0 -> 0.9
    assert rows[1]["largest_sibling_drop"] == pytest.approx(0.1)


def test_task_is_for_the_embedded_default_only(tiny_data, tiny_checkpoint, tmp_path, capsys):
    assert compare.main(_args(tiny_data, tiny_checkpoint, tmp_path / "cmp", "--task", "red-circle")) == 2
    assert "--task: chooses a task of the embedded default" in capsys.readouterr().err


@pytest.mark.slow
def test_a_stopped_comparison_continues_with_resume(tiny_data, tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """SIGTERM during the second method ends the comparison with one line; --resume reuses the
    finished method's run and continues the stopped one from its checkpoint."""
    import signal

    from cliperase.engine.recipe import UnlearnRecipe

    real_save = UnlearnRecipe.save_checkpoint

    def save_then_signal(self, step):  # as if SIGTERM arrived while ga's step-2 checkpoint was written
        path = real_save(self, step)
        if self.cfg.method == "ga" and step == 2:
            self.signals.received = signal.SIGTERM
        return path

    monkeypatch.setattr(UnlearnRecipe, "save_checkpoint", save_then_signal)
    out = tmp_path / "cmp"
    args = _args(tiny_data, tiny_checkpoint, out, "--methods", "ft,ga", "--steps", "4", "--set", "save_every=2",
                 "--max-pairs", "16")
    assert compare.main(args) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "Traceback" not in err and "run the same command with --resume" in err
    assert len([line for line in err.splitlines() if line.startswith("compare:")]) == 1
    ft_report = out / "ft" / "report.json"
    first = ft_report.stat().st_mtime_ns
    assert not (out / "ga" / "report.json").exists() and not (out / "compare.md").exists()

    assert compare.main(args + ["--resume"]) == 0
    said = capsys.readouterr().out
    assert "[compare] ft: finished earlier, reused" in said
    assert ft_report.stat().st_mtime_ns == first, "the finished method was not run again"
    ga = json.loads((out / "ga" / "run.json").read_text())
    assert ga["status"] == "finished" and ga["resumed_from"].endswith("step_00000002")
    assert [r["method"] for r in json.loads((out / "compare.json").read_text())["rows"]] == ["original", "ft", "ga"]
