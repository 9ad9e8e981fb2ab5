"""Benchmark-style metrics on hand-built embeddings (exact top-5 and R@k, split into forget and
retain), and launch/evaluate.py writing CLIP_benchmark-shaped JSON."""
import json
import shutil

import pytest
import torch

from cliperase.engine.data import EvalSet, load_eval_set
from cliperase.engine.eval import EvalEmbeddings, evaluate, forget_mask, split_metrics, strict_json
from cliperase.engine.models import load_model
from helpers import tiny_checkpoint, tiny_data  # noqa: F401
from launch import evaluate as cli

_SCORES = [0.6, 0.5, 0.4, 0.3, 0.2, 0.1]


def _image(label: int, rank: int, classes: int = 6) -> torch.Tensor:
    """Scores against an identity classifier that put `label` at 0-based position `rank`."""
    others = [s for i, s in enumerate(_SCORES) if i != rank]
    v = torch.empty(classes)
    v[label] = _SCORES[rank]
    v[[c for c in range(classes) if c != label]] = torch.tensor(others)
    return v


def test_zeroshot_metrics_known_top1_top5_and_split():
    cases = [(0, 0, True), (0, 4, True), (0, 5, True), (1, 0, False), (2, 1, False), (3, 0, False), (5, 5, False)]
    images = torch.stack([_image(label, rank) for label, rank, _ in cases])
    labels = torch.tensor([c[0] for c in cases])
    is_forget = torch.tensor([c[2] for c in cases])
    ev = EvalSet([str(c) for c in range(6)], ["{c}"], torch.zeros(len(cases), 3, 2, 2), labels, [[] for _ in cases])
    emb = EvalEmbeddings(images, torch.eye(6), torch.empty(0, 6), torch.zeros(0, dtype=torch.long))
    m = split_metrics(emb, ev, is_forget)["zeroshot_classification"]
    assert m["forget_acc1"] == pytest.approx(1 / 3) and m["forget_acc5"] == pytest.approx(2 / 3)  # rank 5 misses top-5
    assert m["retain_acc1"] == pytest.approx(2 / 4) and m["retain_acc5"] == pytest.approx(3 / 4)
    assert m["acc1"] == pytest.approx(3 / 7) and m["acc5"] == pytest.approx(5 / 7)
    # Per-class top-1 recall over the classes present: 0 -> 1/3, 1 -> 1, 2 -> 0, 3 -> 1, 5 -> 0.
    assert m["mean_per_class_recall"] == pytest.approx(7 / 15)
    assert m["forget_mean_per_class_recall"] == pytest.approx(1 / 3)
    assert m["retain_mean_per_class_recall"] == pytest.approx(1 / 2)
    assert (m["n_forget"], m["n_retain"]) == (3, 4)


def test_retrieval_metrics_split_removes_other_parts_distractors():
    # Images 0, 1 forget, 2, 3 retain, one caption each; similarity[i, t] = texts[t, i].
    images = torch.eye(4)
    texts = torch.tensor([[1.0, 0, 0, 0],
                          [0, 0.5, 0.9, 0.3],  # caption 1 prefers retain image 2 over its own image 1
                          [0, 0, 1.0, 0],
                          [0, 0, 0.2, 0.1]])  # caption 3 prefers image 2; image 3 prefers caption 1
    owner = torch.arange(4)
    ev = EvalSet([], [], torch.zeros(4, 3, 2, 2), None, [["c"] for _ in range(4)])
    emb = EvalEmbeddings(images, None, texts, owner)
    m = split_metrics(emb, ev, torch.tensor([True, True, False, False]))["zeroshot_retrieval"]
    # CLIP_benchmark's image retrieval is text->image: captions 1 and 3 miss at R@1 over all images.
    assert m["image_retrieval_recall@1"] == pytest.approx(2 / 4) and m["image_retrieval_recall@5"] == 1.0
    # Within the forget part image 2 is no candidate, so caption 1 finds image 1; within the retain
    # part image 2 still outscores image 3 for caption 3.
    assert m["forget_image_retrieval_recall@1"] == 1.0
    assert m["retain_image_retrieval_recall@1"] == pytest.approx(1 / 2)
    # Text retrieval is image->text: image 3 misses over all captions (caption 1 scores 0.3 > 0.1),
    # finds its own among the retain captions.
    assert m["text_retrieval_recall@1"] == pytest.approx(3 / 4)
    assert m["forget_text_retrieval_recall@1"] == 1.0 and m["retain_text_retrieval_recall@1"] == 1.0
    assert (m["n_forget"], m["n_retain"]) == (2, 2)


def test_benchmark_metrics_without_forget_classes_reports_null_forget_part():
    ev = EvalSet(["a", "b"], ["{c}"], torch.zeros(2, 3, 2, 2), torch.tensor([0, 1]), [["x"], ["y"]])
    emb = EvalEmbeddings(torch.eye(2), torch.eye(2), torch.eye(2), torch.arange(2))
    out = {task: strict_json(m) for task, m in split_metrics(emb, ev, forget_mask(ev, [])).items()}
    assert set(out) == {"zeroshot_classification", "zeroshot_retrieval"}
    assert out["zeroshot_classification"]["acc1"] == 1.0 and out["zeroshot_classification"]["forget_acc1"] is None
    assert out["zeroshot_retrieval"]["forget_image_retrieval_recall@1"] is None
    json.dumps(out, allow_nan=False)  # strict JSON: no NaN


def _read(path):
    record = json.loads(path.read_text())
    assert set(record) >= {"dataset", "model", "pretrained", "task", "metrics"}
    return record


def test_cli_writes_clip_benchmark_json(tiny_data, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "results"
    # The same weights twice under two names: two files per task, and the name clash of the
    # file names is resolved by the parent folder's name.
    other = tmp_path / "copy" / tiny_checkpoint.name
    other.parent.mkdir()
    shutil.copy(tiny_checkpoint, other)
    rc = cli.main(["--model", "tiny-clip", "--pretrained", str(tiny_checkpoint), "--pretrained", str(other),
                   "--dataset", str(tiny_data / "eval"), "--forget-classes", "circle", "--output", str(out),
                   "--no-progress", "--batch-size", "16"])
    assert rc == 0
    names = sorted(p.name for p in out.glob("*.json"))
    ckpt = tiny_checkpoint.name  # CLIP_benchmark's file names keep the checkpoint's extension
    assert names == sorted(f"eval_{label}_tiny-clip_en_{task}.json" for label in (ckpt, f"copy-{ckpt}")
                           for task in ("zeroshot_classification", "zeroshot_retrieval"))
    cls = _read(out / f"eval_{ckpt}_tiny-clip_en_zeroshot_classification.json")
    # CLIP_benchmark's values: its --dataset ("wds/" + the folder's name) and --pretrained as given.
    assert cls["dataset"] == "wds/eval" and cls["model"] == "tiny-clip" and cls["pretrained"] == str(tiny_checkpoint)
    assert cls["task"] == "zeroshot_classification"
    assert {"acc1", "acc5", "mean_per_class_recall", "forget_acc1", "retain_acc5", "n_forget"} <= set(cls["metrics"])
    ret = _read(out / f"eval_{ckpt}_tiny-clip_en_zeroshot_retrieval.json")
    assert {f"{p}{d}_retrieval_recall@{k}" for p in ("", "forget_", "retain_") for d in ("image", "text")
            for k in (1, 5, 10)} <= set(ret["metrics"])
    # The forget/retain split agrees with the engine's before/after evaluation (its own code path).
    loaded = load_model("tiny-clip", str(tiny_checkpoint))
    ref = evaluate(loaded.model, loaded.tokenizer, load_eval_set(str(tiny_data / "eval"), loaded.preprocess), ["circle"])
    assert cls["metrics"]["forget_acc1"] == pytest.approx(ref["zeroshot"]["forget_acc"], abs=1e-6)
    assert cls["metrics"]["retain_acc1"] == pytest.approx(ref["zeroshot"]["retain_acc"], abs=1e-6)
    assert ret["metrics"]["forget_text_retrieval_recall@1"] == pytest.approx(ref["retrieval"]["forget"]["i2t_r1"], abs=1e-6)
    assert ret["metrics"]["retain_image_retrieval_recall@5"] == pytest.approx(ref["retrieval"]["retain"]["t2i_r5"], abs=1e-6)
    twin = _read(out / f"eval_copy-{ckpt}_tiny-clip_en_zeroshot_classification.json")
    assert twin["metrics"] == cls["metrics"]
    assert "forget_acc1=" in capsys.readouterr().out


def test_cli_run_folder_supplies_model_data_and_classes(tiny_data, tiny_checkpoint, tmp_path):
    run = tmp_path / "myrun"
    run.mkdir()
    shutil.copy(tiny_checkpoint, run / "model.pt")
    (run / "report.json").write_text(json.dumps({"config": {"model": "tiny-clip", "eval_data": str(tiny_data / "eval"),
                                                            "forget_classes": ["circle", "star"]}}))
    out = tmp_path / "results"
    assert cli.main(["--run", str(run), "--output", str(out), "--no-progress"]) == 0
    record = _read(out / "eval_myrun_tiny-clip_en_zeroshot_classification.json")
    assert record["pretrained"] == str(run / "model.pt") and record["forget_classes"] == ["circle", "star"]
    ev = load_eval_set(str(tiny_data / "eval"), lambda im: torch.zeros(1))
    wanted = torch.tensor([ev.classnames.index("circle"), ev.classnames.index("star")])
    assert record["metrics"]["n_forget"] == int(torch.isin(ev.labels, wanted).sum())


def test_cli_reads_a_retrieval_folder_for_retrieval_only(tiny_data, tiny_checkpoint, tmp_path):
    # The embedded default's retrieval folder: the same samples as eval/, typed retrieval, so
    # CLIP_benchmark reads it (for retrieval only) and so does the CLI, with the same recalls.
    root = tiny_data / "eval_retrieval"
    assert (root / "dataset_type.txt").read_text().strip() == "retrieval"
    out = tmp_path / "results"
    args = ["--model", "tiny-clip", "--pretrained", str(tiny_checkpoint), "--forget-classes", "circle",
            "--output", str(out), "--no-progress"]
    assert cli.main(args + ["--dataset", str(root), "--dataset", str(tiny_data / "eval")]) == 0
    ckpt = tiny_checkpoint.name
    assert sorted(p.name for p in out.glob("eval_retrieval_*.json")) == [f"eval_retrieval_{ckpt}_tiny-clip_en_zeroshot_retrieval.json"]
    ret = _read(out / f"eval_retrieval_{ckpt}_tiny-clip_en_zeroshot_retrieval.json")
    assert ret["dataset"] == "wds/eval_retrieval"
    same = _read(out / f"eval_{ckpt}_tiny-clip_en_zeroshot_retrieval.json")
    assert ret["metrics"] == same["metrics"] and ret["metrics"]["n_forget"] > 0  # split by the copied labels


def test_cli_rejects_bad_input(tiny_data, tiny_checkpoint, tmp_path, capsys):
    assert cli.main(["--pretrained", str(tiny_checkpoint), "--dataset", str(tiny_data / "eval")]) == 2
    assert "--model" in capsys.readouterr().err
    assert cli.main(["--run", str(tmp_path)]) == 2
    assert "report.json" in capsys.readouterr().err
    assert cli.main(["--model", "tiny-clip", "--pretrained", str(tiny_checkpoint), "--dataset", str(tiny_data / "eval"),
                     "--forget-classes", "dragon", "--output", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "dragon" in capsys.readouterr().err
    odd = tmp_path / "multi"
    shutil.copytree(tiny_data / "eval", odd)
    (odd / "dataset_type.txt").write_text("multilabel\n")
    assert cli.main(["--model", "tiny-clip", "--pretrained", str(tiny_checkpoint), "--dataset", str(odd),
                     "--output", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "'multilabel'" in capsys.readouterr().err
