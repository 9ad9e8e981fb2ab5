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


# CLIP_benchmark 1.6.2's definitions, transcribed independently (clip_benchmark/metrics/
# zeroshot_retrieval.py recall_at_k and zeroshot_classification.py accuracy; no import of it).
def _cb_recall_at_k(scores, positive_pairs, k):
    nb_texts, nb_images = scores.shape
    topk_indices = torch.topk(scores, k, dim=1)[1]
    nb_positive = positive_pairs.sum(dim=1)
    onehot = torch.nn.functional.one_hot(topk_indices, num_classes=nb_images)
    nb_true_positive = (onehot * positive_pairs.view(nb_texts, 1, nb_images)).sum(dim=(1, 2))
    return nb_true_positive / nb_positive


def _cb_retrieval(images, texts, owner, ks):
    scores = texts @ images.t()
    positive_pairs = torch.zeros_like(scores, dtype=bool)
    positive_pairs[torch.arange(len(scores)), owner] = True
    out = {}
    for k in ks:
        out[f"t2i_r{k}"] = (_cb_recall_at_k(scores, positive_pairs, k) > 0).float().mean().item()
        out[f"i2t_r{k}"] = (_cb_recall_at_k(scores.T, positive_pairs.T, k) > 0).float().mean().item()
    return out


def _cb_accuracy(output, target, topk):
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum(0, keepdim=True).item() / len(target) for k in topk]


def _balanced_accuracy(target, pred):
    recalls = [sum(int(p == c) for t, p in zip(target, pred) if t == c) / sum(int(t == c) for t in target)
               for c in sorted(set(target))]
    return sum(recalls) / len(recalls)


def _tied_embeddings(seed, n_images, n_texts, d=3, levels=3):
    # Small integer coordinates: dot products are exact, so many scores tie exactly; images
    # and captions are also duplicated outright, as the demo's repeated captions are.
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, levels, (n_images, d), generator=g).float()
    images[1::4] = images[0::4][: len(images[1::4])]
    texts = torch.randint(0, levels, (n_texts, d), generator=g).float()
    texts[2::3] = texts[0::3][: len(texts[2::3])]
    owner = torch.cat([torch.arange(n_images), torch.randint(0, n_images, (n_texts - n_images,), generator=g)])
    return images, texts, owner


def test_torch_topk_does_not_break_ties_by_index():
    # The premise of the hand-built case below (and why recall is computed with torch.topk
    # itself): among tied scores torch.topk picks in its own order, not the lowest index first.
    assert torch.tensor([1.0, 1.0]).topk(1).indices.tolist() == [0]
    assert torch.tensor([1.0, 1.0, 1.0, 0.0]).topk(1).indices.tolist() == [1]
    assert torch.tensor([[1.0, 1.0, 1.0, 0.0]]).topk(3, dim=1).indices[0].tolist() == [1, 2, 0]


def test_retrieval_recall_ties_resolve_as_clip_benchmark_does():
    # Two images, one caption each, the captions identical: image 0 sees the tie (1, 1) and
    # torch.topk(1) takes caption 0 (its own); image 1 sees (0.5, 0.5) and also gets caption 0,
    # which is image 0's. A tie-optimistic count would say 1.0.
    images, texts, owner = torch.tensor([[1.0, 0.0], [0.5, 0.5]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.arange(2)
    r = retrieval_recall(images, texts, owner, ks=(1, 2))
    assert r["i2t_r1"] == 0.5 and r["i2t_r2"] == 1.0
    # Both captions (identical) rank image 0 first: caption 1 misses at k=1.
    assert r["t2i_r1"] == 0.5 and r["t2i_r2"] == 1.0
    # Image 0 ties its own caption 0 with image 1's captions 1 and 2: scores (1, 1, 1, 0), and
    # torch.topk returns 1, then 1, 2, then 1, 2, 0: image 0 is found from k = 3 on only.
    images, texts = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]])
    r = retrieval_recall(images, texts, torch.tensor([0, 1, 1, 1]), ks=(1, 2, 3))
    assert (r["i2t_r1"], r["i2t_r2"], r["i2t_r3"]) == (0.5, 0.5, 1.0)


@pytest.mark.parametrize("seed", range(6))
def test_retrieval_recall_equals_clip_benchmark_definition_on_tied_embeddings(seed):
    images, texts, owner = _tied_embeddings(seed, n_images=12, n_texts=31)
    ks = (1, 2, 5, 10)
    assert retrieval_recall(images, texts, owner, ks=ks) == _cb_retrieval(images, texts, owner, ks)


@pytest.mark.parametrize("seed", range(6))
def test_zeroshot_metrics_equal_clip_benchmark_definition_on_tied_embeddings(seed):
    from cliperase.engine.eval import EvalEmbeddings, split_metrics

    for classes in (7, 3):
        images, clf, _ = _tied_embeddings(seed, n_images=40, n_texts=40)
        clf = clf[:classes].clone()
        clf[-1] = clf[0]  # two classes with one embedding: every image ties between them
        labels = torch.randint(0, classes, (40,), generator=torch.Generator().manual_seed(seed))
        ev = EvalSet([str(c) for c in range(classes)], ["{c}"], torch.zeros(40, 3, 2, 2), labels, [[] for _ in range(40)])
        emb = EvalEmbeddings(images, clf, torch.empty(0, 3), torch.zeros(0, dtype=torch.long))
        m = split_metrics(emb, ev, torch.zeros(40, dtype=torch.bool))["zeroshot_classification"]
        logits = 100.0 * images @ torch.stack(list(clf), dim=1)
        if classes >= 5:
            assert [m["acc1"], m["acc5"]] == _cb_accuracy(logits, labels, (1, 5))
        else:  # CLIP_benchmark: acc1 from a top-1 call and acc5 = NaN below 5 classes
            assert [m["acc1"]] == _cb_accuracy(logits, labels, (1,)) and math.isnan(m["acc5"])
        assert m["mean_per_class_recall"] == pytest.approx(
            _balanced_accuracy(labels.tolist(), logits.argmax(axis=1).tolist()), abs=1e-12)


def test_zeroshot_accuracy_known_answer():
    clf = torch.eye(3)
    images = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0.9, 0.1], [0.2, 0, 0.8]])
    labels = torch.tensor([0, 1, 2, 2])  # third image is wrong at top-1, right at top-2
    assert zeroshot_accuracy(images, clf, labels, topk=(1, 2)) == pytest.approx([3 / 4, 1.0])
    assert all(math.isnan(v) for v in zeroshot_accuracy(images[:0], clf, labels[:0]))
    with pytest.raises(ValueError, match="exceeds the 3 classes"):
        zeroshot_accuracy(images, clf, labels, topk=(5,))


def test_retrieval_recall_known_ranks():
    # 3 images on the axes; captions: two for image 0, one each for images 1 and 2; no ties.
    images = torch.eye(3)
    texts = torch.tensor([[1.0, 0, 0], [0.1, 0.9, 0], [0, 1.0, 0], [0.9, 0, 0.1]])
    owner = torch.tensor([0, 0, 1, 2])
    r = retrieval_recall(images, texts, owner, ks=(1, 2, 10))
    # i2t: image 0's best caption is its own 0; image 1's top caption is 2 (own); image 2's
    # own caption 3 (0.1) is its top one (the others score 0).
    assert r["i2t_r1"] == 1.0
    # t2i: caption 1 (owner 0) prefers image 1; caption 3 (owner 2) prefers image 0.
    assert r["t2i_r1"] == 2 / 4 and r["t2i_r2"] == 1.0
    assert r["t2i_r10"] == 1.0  # k beyond the 3 images: all are in the top k


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


def test_the_engine_reads_both_kinds_of_folder(tiny_data, tiny_checkpoint, tmp_path):
    import shutil

    from cliperase.engine.data import load_eval_set
    from cliperase.engine.eval import Evaluator
    from cliperase.engine.models import load_model

    lm = load_model("tiny-clip", str(tiny_checkpoint))
    run = Evaluator(lm.preprocess, lm.tokenizer, ["circle"])
    both = run(lm.model, str(tiny_data / "eval"))  # classification folder whose samples carry captions
    retrieval = run(lm.model, str(tiny_data / "eval_retrieval"))  # typed retrieval: no classification
    assert set(both) == {"zeroshot", "retrieval"} and set(retrieval) == {"retrieval"}
    assert retrieval["retrieval"] == both["retrieval"]
    # A retrieval folder without labels or class names splits by the captions' class words.
    bare = tmp_path / "bare"
    shutil.copytree(tiny_data / "eval_retrieval", bare)
    (bare / "classnames.txt").unlink()
    assert run(lm.model, str(bare))["retrieval"] == both["retrieval"]
    assert load_eval_set(str(bare), lm.preprocess).dataset_type == "retrieval"


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
