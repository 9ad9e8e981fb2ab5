"""Metrics on hand-built embeddings whose answers are known exactly."""
import math

import pytest
import torch

from cliperase.engine.data import EvalSet
from cliperase.engine.evaluate import forget_mask, retrieval_recall, zeroshot_accuracy


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
