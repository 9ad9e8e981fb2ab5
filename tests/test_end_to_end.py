"""Whole runs through launch/unlearn.py main(): tiny model, real shards, real checkpoints."""
import json

import open_clip
import pytest
import torch

from cliperase.engine import UnlearnConfig, unlearn
from cliperase.engine.config import method_names
from cliperase.engine.models import register_configs
from helpers import run_args, sha256, tiny_checkpoint, tiny_data  # noqa: F401
from launch import unlearn as cli

R_KEYS = {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"}


def _check_metrics(m):
    assert set(m["zeroshot"]) == {"forget_acc", "retain_acc"}
    assert all(0.0 <= v <= 1.0 for v in m["zeroshot"].values())
    assert set(m["retrieval"]) == {"forget", "retain"}
    for part in m["retrieval"].values():
        assert set(part) == R_KEYS and all(0.0 <= v <= 1.0 for v in part.values())


@pytest.mark.parametrize("method", method_names())
def test_tiny_run_writes_report_and_loadable_checkpoint(method, tiny_data, tiny_checkpoint, tmp_path, capsys):
    before_hash = sha256(tiny_checkpoint)
    out = tmp_path / "run"
    assert cli.main(run_args(tiny_data, out, pretrained=tiny_checkpoint, method=method)) == 0
    report = json.loads((out / "report.json").read_text())
    assert {"method", "model", "config", "steps", "wall_s", "before", "after"} <= set(report)
    assert report["method"] == method and report["steps"] == 3 and report["wall_s"] > 0
    data = report["telemetry"]["data"]
    assert data["steps"] == 3 and 0.0 <= data["data_wait_fraction"] <= 1.0
    if not torch.cuda.is_available():
        assert report["telemetry"]["gpu"]["available"] is False and report["telemetry"]["gpu"]["reason"]
    _check_metrics(report["before"])
    _check_metrics(report["after"])
    assert sha256(tiny_checkpoint) == before_hash, "the input checkpoint must never change"
    # The unlearned model loads in plain open_clip and differs from the input.
    register_configs()
    model = open_clip.create_model("tiny-clip", pretrained=str(out / "model.pt"))
    original = open_clip.create_model("tiny-clip", pretrained=str(tiny_checkpoint))
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, original.state_dict()[k])]
    assert changed, "training changed no weight"
    assert "logit_scale" not in changed, "the temperature is frozen by default"
    assert "zero-shot forget acc" in capsys.readouterr().out
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 3 and "loss" in log[-1]


def test_report_reproduces_from_exported_checkpoint(tiny_data, tiny_checkpoint, tmp_path):
    """Evaluating the exported checkpoint with the engine's code gives the report's 'after'."""
    from cliperase.engine.data import load_eval_set
    from cliperase.engine.eval import evaluate
    from cliperase.engine.models import load_model

    out = tmp_path / "run"
    report = unlearn(UnlearnConfig.from_dict(dict(
        pretrained=str(tiny_checkpoint), forget_data=str(tiny_data / "forget"), retain_data=str(tiny_data / "retain"),
        eval_data=str(tiny_data / "eval"), forget_classes=["circle"], steps=2, batch_size=8, lr=1e-4,
        audit_data=str(tiny_data / "train"), output_dir=str(out))), progress=False)
    lm = load_model("tiny-clip", str(out / "model.pt"))
    again = evaluate(lm.model, lm.tokenizer, load_eval_set(str(tiny_data / "eval"), lm.preprocess), ["circle"])
    assert again["zeroshot"] == pytest.approx(report["after"]["zeroshot"])
    # The membership audit (audit_data set; the training pairs stand in for never-seen ones here):
    # both attacks before and after, reproducible from the checkpoints.
    from cliperase.engine.eval import MembershipAudit

    for part, ckpt in (("before", tiny_checkpoint), ("after", out / "model.pt")):
        block = report[part]["audit"]
        assert set(block["threshold"]) == set(block["calibrated"]) == {"auc", "tpr_at_1pct_fpr"}
        assert block["n_nonmembers"] == block["n_shadow"] == 120  # the 240 training pairs, halved
        lm = load_model("tiny-clip", str(ckpt))
        audit = MembershipAudit(lm.preprocess, lm.tokenizer, str(tiny_data / "forget"), str(tiny_data / "train"))
        redone = audit(lm.model)
        for attack in ("threshold", "calibrated"):
            assert redone[attack] == pytest.approx(block[attack], abs=1e-6)


def test_second_run_into_same_dir_is_refused(tiny_data, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(run_args(tiny_data, out, pretrained=tiny_checkpoint)) == 0
    first = (out / "report.json").read_bytes()
    assert cli.main(run_args(tiny_data, out, pretrained=tiny_checkpoint)) == 2
    assert "holds another run" in capsys.readouterr().err
    assert (out / "report.json").read_bytes() == first
    assert cli.main(run_args(tiny_data, out, pretrained=tiny_checkpoint) + ["--overwrite"]) == 0


def test_cli_reports_bad_input_without_traceback(tiny_data, tmp_path, capsys):
    code = cli.main(run_args(tiny_data, tmp_path / "o", steps=0, lr=-1) + ["--forget-classes", "unicorn"])
    err = capsys.readouterr().err
    assert code == 2
    assert "steps: expected a positive integer" in err and "lr: expected" in err and "unicorn" in err


def test_cli_accepts_deepspeed_local_rank(tiny_data, tiny_checkpoint, tmp_path):
    assert cli.main(run_args(tiny_data, tmp_path / "o", pretrained=tiny_checkpoint) + ["--local_rank=0"]) == 0


@pytest.mark.slow
def test_vit_b_32_random_weights_runs_a_few_steps(tmp_path):
    """The same path on a real open_clip architecture (random weights, 224 px, CPU). Its own
    small data: at 224 px the teacher-cache pass and both evaluations embed every pair, and on
    the shared 240 + 72 pairs they took ~170 s of a 2-core CI."""
    from cliperase.engine.tools.synthetic import write_default

    data = tmp_path / "data"
    counts = write_default(data, forget=lambda s: s.shape == "circle", n_train=32, n_eval=24, seed=0)
    assert counts["forget"] == 5 and counts["eval"] == 24
    out = tmp_path / "vit"
    args = run_args(data, out, steps=2, batch_size=2)
    args[args.index("tiny-clip")] = "ViT-B-32"
    assert cli.main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "ViT-B-32" and report["steps"] == 2
    _check_metrics(report["after"])


def test_accuracy_curves_every_n_steps(tiny_data, tiny_checkpoint, tmp_path):
    out = tmp_path / "curves"
    report = unlearn(UnlearnConfig.from_dict(dict(
        pretrained=str(tiny_checkpoint), forget_data=str(tiny_data / "forget"), retain_data=str(tiny_data / "retain"),
        eval_data=str(tiny_data / "eval"), forget_classes=["circle"], steps=4, batch_size=8, lr=1e-4, eval_every=2,
        output_dir=str(out))), progress=False)
    rows = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2, 4]
    assert rows[0]["forget_acc"] == report["before"]["zeroshot"]["forget_acc"]
    assert rows[-1]["retain_acc"] == report["after"]["zeroshot"]["retain_acc"]
    assert list((out / "tensorboard").glob("events.out.tfevents.*")), "TensorBoard curves are written"


def test_mask_duplicate_captions_changes_the_run(tiny_data, tiny_checkpoint, tmp_path):
    """The embedded data repeats captions ("a circle"), so masking them out of the negatives
    changes the losses from the first step on; both runs stay finite."""
    first = {}
    for masked in (False, True):
        out = tmp_path / f"mask-{masked}"
        args = run_args(tiny_data, out, pretrained=tiny_checkpoint, method="graddiff", steps=2)
        assert cli.main(args + ["--set", "log_every=1", "--set", f"mask_duplicate_captions={str(masked).lower()}"]) == 0
        first[masked] = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    for term in ("retain_infonce", "forget_infonce"):
        assert first[True][term] != pytest.approx(first[False][term], rel=1e-4), term
        assert first[True][term] < first[False][term], "fewer negatives, a smaller InfoNCE"
