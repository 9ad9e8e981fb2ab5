"""Metrics on hand-built embeddings whose answers are known exactly."""
import json
import math
from dataclasses import replace

import pytest
import torch

from cliperase.engine.data import EvalSet
from cliperase.engine.eval import forget_mask
from cliperase.engine.eval.metrics import retrieval_recall, zeroshot_accuracy
from helpers import tiny_checkpoint, tiny_data  # noqa: F401


def test_zeroshot_accuracy_known_answer():
    clf = torch.eye(3)
    images = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0.9, 0.1], [0.2, 0, 0.8]])
    labels = torch.tensor([0, 1, 2, 2])  # third image is wrong at top-1, right at top-2
    assert zeroshot_accuracy(images, clf, labels) == pytest.approx(3 / 4)
    assert zeroshot_accuracy(images, clf, labels, k=2) == pytest.approx(1.0)
    assert math.isnan(zeroshot_accuracy(images[:0], clf, labels[:0]))


def test_retrieval_recall_known_ranks():
    # 3 images on the axes; captions: two for image 0, one each for images 1 and 2.
    images = torch.eye(3)
    texts = torch.tensor([[1.0, 0, 0], [0.1, 0.9, 0], [0, 1.0, 0], [0.9, 0, 0.1]])
    owner = torch.tensor([0, 0, 1, 2])
    r = retrieval_recall(images, texts, owner, ks=(1, 2))
    # i2t: image0 best caption is 0 (rank 0); image1's own caption 2 ranks first; image2's own
    # caption 3 scores 0.1, below texts 0? (0), 1 (0), 2 (0): rank 0 -> strictly higher count 0.
    assert r["i2t_r1"] == pytest.approx(1.0)
    # t2i: caption1 (owner 0) prefers image1 (0.9) over image0 (0.1): rank 1. caption3 (owner 2)
    # prefers image0 (0.9): rank 1. Others rank 0.
    assert r["t2i_r1"] == pytest.approx(2 / 4)
    assert r["t2i_r2"] == pytest.approx(1.0)


def test_retrieval_recall_empty_is_nan():
    r = retrieval_recall(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    assert all(math.isnan(v) for v in r.values()) and len(r) == 6


def test_forget_mask_by_label_and_by_caption_word():
    ev = EvalSet(["cat", "dog"], ["{c}"], torch.zeros(3, 3, 2, 2), torch.tensor([0, 1, 1]), [[], [], []])
    assert forget_mask(ev, ["dog"]).tolist() == [False, True, True]
    ev = EvalSet([], [], torch.zeros(3, 3, 2, 2), None, [["a Dog runs"], ["a hotdog"], ["two cats", "dog."]])
    assert forget_mask(ev, ["dog"]).tolist() == [True, False, True]


def test_zeroshot_breakdown_groups_a_class_by_any_attribute():
    from cliperase.engine.eval import zeroshot_breakdown

    clf = torch.eye(2)  # classes circle (0), square (1)
    images = torch.tensor([[1.0, 0], [0.2, 0.8], [1.0, 0], [0.9, 0.1], [0, 1.0], [0.3, 0.7]])
    labels = torch.tensor([0, 0, 0, 0, 1, 1])  # image 1 is a circle taken for a square
    attrs = [{"colour": "red"}, {"colour": "red"}, {"colour": "blue"}, {"colour": "blue", "size": 2}, {"colour": "red"},
             {}]
    out = zeroshot_breakdown(images, clf, labels, attrs, "colour", ["circle", "square"])
    assert out == {"circle": {"blue": {"acc": 1.0, "n": 2}, "red": {"acc": 0.5, "n": 2}},
                   "square": {"red": {"acc": 1.0, "n": 1}}}  # the square without a colour is left out
    assert zeroshot_breakdown(images, clf, labels, attrs, "size", ["circle", "square"], ["circle"]) == {
        "circle": {"2": {"acc": 1.0, "n": 1}}}
    with pytest.raises(ValueError, match="equal lengths"):
        zeroshot_breakdown(images, clf, labels, attrs[:2], "colour", ["circle", "square"])


def test_attribute_mask_and_its_spec():
    from cliperase.engine.eval import attribute_mask, parse_attributes

    attrs = [{"colour": "red", "background": "white"}, {"colour": "blue", "background": "white"}, {"colour": "red"}]
    assert attribute_mask(attrs, "colour=red").tolist() == [True, False, True]
    assert attribute_mask(attrs, "colour=red|blue; background=white").tolist() == [True, True, False]
    assert attribute_mask(attrs, "").tolist() == [True, True, True]
    assert parse_attributes("colour=red|blue;background=white") == {"colour": ("red", "blue"), "background": ("white",)}
    for bad in ("colour", "=red", "colour=", "colour=red;colour=blue"):
        with pytest.raises(ValueError):
            parse_attributes(bad)


def test_evaluate_splits_a_subgroup_and_breaks_down_by_attribute(tiny_data, tiny_checkpoint):
    from cliperase.engine.data import load_eval_set
    from cliperase.engine.eval import attribute_mask, evaluate
    from cliperase.engine.models import load_model

    lm = load_model("tiny-clip", str(tiny_checkpoint))
    ev = load_eval_set(str(tiny_data / "eval"), lm.preprocess)
    attrs = ev.attributes
    # One per image, in load_eval_set's order: each image's json names the shape of its label.
    assert [ev.classnames.index(a["shape"]) for a in attrs] == ev.labels.tolist()
    plain = evaluate(lm.model, lm.tokenizer, ev, ["circle"])
    sub = evaluate(lm.model, lm.tokenizer, ev, ["circle"], attributes=attrs, forget_where="colour=red", breakdown="colour")
    by = sub["zeroshot_by"]["colour"]["circle"]
    assert set(by) == {"red", "blue", "green", "yellow", "purple", "orange"}
    assert sum(v["n"] for v in by.values()) == int((ev.labels == ev.classnames.index("circle")).sum())
    assert sub["zeroshot"]["forget_acc"] == pytest.approx(by["red"]["acc"])
    n_red = int(attribute_mask(attrs, "colour=red")[ev.labels == 0].sum())
    n_circle, n_all = int((ev.labels == 0).sum()), len(ev.labels)
    # The other circles move to the retain part: its accuracy is the count-weighted mix.
    expect = (plain["zeroshot"]["retain_acc"] * (n_all - n_circle)
              + sum(v["acc"] * v["n"] for k, v in by.items() if k != "red")) / (n_all - n_red)
    assert sub["zeroshot"]["retain_acc"] == pytest.approx(expect, abs=1e-6)
    with pytest.raises(ValueError, match="attributes"):
        evaluate(lm.model, lm.tokenizer, replace(ev, attributes=None), ["circle"], forget_where="colour=red")


def test_a_metric_without_images_is_absent_with_the_reason_never_nan():
    from cliperase.engine.eval import EvalEmbeddings, report_block, split_metrics

    # Three images of class 0, all forgotten; captions only on the forgotten ones.
    ev = EvalSet(["a", "b"], ["{c}"], torch.zeros(3, 3, 2, 2), torch.tensor([0, 0, 0]), [["x"], ["y"], ["z"]])
    emb = EvalEmbeddings(torch.tensor([[1.0, 0.0]] * 3), torch.eye(2), torch.eye(3)[:, :2], torch.arange(3))
    block = report_block(split_metrics(emb, ev, torch.tensor([True, True, True])))
    assert block["zeroshot"]["retain_acc"] is None and block["zeroshot"]["forget_acc"] == 1.0
    assert block["retrieval"]["retain"]["i2t_r1"] is None
    assert block["absent"]["zeroshot.retain_acc"] == "no images in the retain part"
    assert block["absent"]["retrieval.retain.t2i_r5"] == "no images with captions in the retain part"
    json.dumps(block, allow_nan=False)


def test_run_files_are_strict_json(tmp_path):
    from cliperase.engine.checkpoint import write_json

    write_json({"acc": 0.5, "none": None}, tmp_path / "ok.json")
    with pytest.raises(ValueError, match="not JSON compliant"):
        write_json({"acc": float("nan")}, tmp_path / "nan.json")
    assert not (tmp_path / "nan.json").exists()
