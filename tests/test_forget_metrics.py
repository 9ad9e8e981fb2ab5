"""Forgetting-quality metrics on cases with known answers: exact AUC (ties included), the
attack's null behaviour, histogram bins, pair similarities, reading forget pairs."""
import math

import pytest
import torch
from torch import nn

from cliperase.engine.eval.forget import (auc, load_pairs, membership_inference_auc, pair_similarities,
                                             plot_similarity_histograms, similarity_histogram)
from helpers import tiny_data  # noqa: F401


def _auc_brute(pos, neg):
    """The definition, pair by pair: P(pos > neg) + 0.5 P(pos == neg)."""
    wins = sum((p > n) + 0.5 * (p == n) for p in pos.tolist() for n in neg.tolist())
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("pos, neg, expected", [
    ([3.0, 4.0], [1.0, 2.0], 1.0),  # perfectly separated
    ([1.0], [2.0], 0.0),  # perfectly inverted
    ([1.0, 2.0], [2.0, 3.0], 0.125),  # (1,2) (1,3) (2,3) lost, (2,2) a tie: 0.5 / 4
    ([2.0, 2.0], [2.0], 0.5),  # all tied
    ([1.0, 3.0, 3.0, 4.0], [2.0, 3.0], 5 / 8),  # 1 loses twice, each 3 beats 2 and ties 3, 4 wins twice
], ids=["separated", "inverted", "one-tie", "all-tied", "mixed-ties"])
def test_auc_hand_computed(pos, neg, expected):
    assert auc(torch.tensor(pos), torch.tensor(neg)) == pytest.approx(expected, abs=1e-12)


def test_auc_matches_pairwise_definition_with_many_ties():
    gen = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 6, (57,), generator=gen).float()  # 6 values over 100 scores: ties everywhere
    neg = torch.randint(0, 5, (43,), generator=gen).float()
    assert auc(pos, neg) == pytest.approx(_auc_brute(pos, neg), abs=1e-12)


def test_auc_empty_side_is_nan():
    assert math.isnan(auc(torch.tensor([]), torch.tensor([1.0])))


def test_mia_identical_distributions_is_near_chance():
    # Under the null the AUC's standard deviation is sqrt((n1 + n2 + 1) / (12 n1 n2)) = 0.0091 for
    # 2000 + 2000 scores; 0.04 is over 4 standard deviations (the seed is fixed, so this never flakes).
    gen = torch.Generator().manual_seed(1)
    members, nonmembers = torch.randn(2000, generator=gen), torch.randn(2000, generator=gen)
    mia = membership_inference_auc(members, nonmembers)
    assert abs(mia["auc"] - 0.5) < 0.04 and mia["advantage"] < 0.08
    assert mia["n_members"] == 2000 and mia["n_nonmembers"] == 2000


def test_mia_detects_a_shift():
    # Members scoring N(1, 1) against non-members N(0, 1): AUC = Phi(1 / sqrt 2) = 0.7602.
    gen = torch.Generator().manual_seed(2)
    mia = membership_inference_auc(torch.randn(2000, generator=gen) + 1, torch.randn(2000, generator=gen))
    assert mia["auc"] == pytest.approx(0.7602, abs=0.04)
    assert mia["advantage"] == pytest.approx(2 * (mia["auc"] - 0.5))


def test_histogram_bins_known_counts(tmp_path):
    values = torch.tensor([-1.0, -0.5, 0.0, 0.49, 0.5, 1.0, 1.2])  # 1.2 rounds into the last bin
    hist = similarity_histogram({"a": values, "b": torch.tensor([-0.9])}, bins=4)
    assert hist["edges"] == pytest.approx([-1.0, -0.5, 0.0, 0.5, 1.0])
    assert hist["series"]["a"]["counts"] == [1, 1, 2, 3]
    assert hist["series"]["b"]["counts"] == [1, 0, 0, 0]
    assert hist["series"]["a"]["n"] == 7 and hist["series"]["b"]["mean"] == pytest.approx(-0.9)
    path = plot_similarity_histograms(hist, tmp_path / "h.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="bins"):
        similarity_histogram({"a": values}, bins=0)


class _Lookup(nn.Module):
    """A stand-in CLIP whose embeddings are given: images are their own features, a caption's
    "tokens" are the row of a fixed table."""

    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(table)

    def encode_image(self, x, normalize=False):
        return nn.functional.normalize(x, dim=-1) if normalize else x

    def encode_text(self, idx, normalize=False):
        t = self.table[idx]
        return nn.functional.normalize(t, dim=-1) if normalize else t


def test_pair_similarities_are_own_caption_cosines():
    gen = torch.Generator().manual_seed(3)
    images, table = torch.randn(5, 4, generator=gen), torch.randn(5, 4, generator=gen)
    model = _Lookup(table)
    tokenizer = lambda caps: torch.tensor([int(c) for c in caps])  # noqa: E731
    captions = ["0", "1", "2", "3", "4"]
    expected = nn.functional.cosine_similarity(images, table, dim=1)
    got = pair_similarities(model, tokenizer, images, captions, batch_size=2)  # batches of 2, 2, 1
    assert got.shape == (5,) and torch.allclose(got, expected, atol=1e-6)
    with pytest.raises(ValueError, match="captions"):
        pair_similarities(model, tokenizer, images, captions[:3])


def test_load_pairs_reads_forget_shards(tiny_data):
    import json

    count = json.loads((tiny_data / "manifest.json").read_text())["counts"]["forget"]
    preprocess = lambda im: torch.zeros(3, 2, 2)  # noqa: E731  (reading is under test, not pixels)
    images, captions = load_pairs(str(tiny_data / "forget"), preprocess)
    assert len(images) == len(captions) == count and all("circle" in c for c in captions)
    images, captions = load_pairs(str(tiny_data / "forget"), preprocess, limit=5)
    assert images.shape == (5, 3, 2, 2) and len(captions) == 5


# The stronger audit: TPR at low FPR and the shadow-calibrated attack, on cases with known answers.
def test_tpr_at_1pct_fpr_hand_computed():
    from cliperase.engine.eval.forget import tpr_at_fpr

    neg = torch.arange(100).double()  # 1% of 100 non-members: one false positive allowed (99)
    pos = torch.tensor([98.5, 99.5, 100.0, 50.0])
    # The threshold may sit just above 98: 98.5, 99.5 and 100 are caught, 50 is not.
    assert tpr_at_fpr(pos, neg, 0.01) == 0.75
    assert tpr_at_fpr(pos, neg, 0.0) == 0.5  # no false positive: above 99 only
    assert tpr_at_fpr(pos, neg, 0.02) == 0.75  # two allowed: above 97, still 3 of 4
    # A tie at the cut: the top two non-members are both 98. A threshold at 98 would let both
    # through (2 > 1 allowed), so the cut is above 98 and 98.5 still counts.
    neg_tied = torch.cat([torch.arange(99).double(), torch.tensor([98.0])])
    assert tpr_at_fpr(pos, neg_tied, 0.01) == 0.75
    assert tpr_at_fpr(torch.tensor([98.0]), neg_tied, 0.01) == 0.0  # a member tied at the cut is not caught
    assert tpr_at_fpr(torch.tensor([0.0]), neg, 1.0) == 1.0
    assert math.isnan(tpr_at_fpr(torch.tensor([]), neg))
    with pytest.raises(ValueError, match="fpr"):
        tpr_at_fpr(pos, neg, 1.5)


def _clusters(n, centers, gen):
    """n keys near random cluster centres (normalised) and the cluster of each."""
    which = torch.randint(0, len(centers), (n,), generator=gen)
    keys = torch.nn.functional.normalize(centers[which] + 0.01 * torch.randn(n, centers.shape[1], generator=gen), dim=1)
    return keys, which


def test_calibration_separates_what_the_threshold_attack_cannot():
    # Pair difficulty varies by cluster (cluster c's never-seen pairs score about c / 10); members
    # score 0.05 above their cluster's level, non-members at it. Raw scores overlap across
    # clusters (threshold AUC well below 1); calibrated on the shadow pool, every member is
    # above every non-member: AUC 1, TPR@1%FPR 1.
    from cliperase.engine.eval.forget import auc, neighbourhood_calibrated, tpr_at_fpr

    gen = torch.Generator().manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(8, 16, generator=gen), dim=1)
    level = torch.arange(8).double() / 10
    shadow_keys, sc = _clusters(400, centers, gen)
    member_keys, mc = _clusters(200, centers, gen)
    non_keys, nc = _clusters(200, centers, gen)
    shadow_scores, members, nonmembers = level[sc], level[mc] + 0.05, level[nc]
    assert auc(members, nonmembers) < 0.7
    cm = neighbourhood_calibrated(member_keys, members, shadow_keys, shadow_scores, k=8)
    cn = neighbourhood_calibrated(non_keys, nonmembers, shadow_keys, shadow_scores, k=8)
    assert auc(cm, cn) == 1.0 and tpr_at_fpr(cm, cn) == 1.0


def test_audit_of_identical_distributions_is_chance():
    from cliperase.engine.eval.forget import membership_audit

    gen = torch.Generator().manual_seed(1)

    def pairs(n):  # image and text embeddings of one distribution, correlated like matched pairs
        zi = torch.nn.functional.normalize(torch.randn(n, 8, generator=gen), dim=1)
        zt = torch.nn.functional.normalize(zi + 0.8 * torch.randn(n, 8, generator=gen), dim=1)
        return zi, zt

    out = membership_audit(pairs(2000), pairs(2000), pairs(2000))
    assert abs(out["threshold"]["auc"] - 0.5) < 0.03 and abs(out["calibrated"]["auc"] - 0.5) < 0.03
    assert out["calibrated"]["tpr_at_1pct_fpr"] < 0.04  # chance is 0.01; a few points of noise
    assert (out["n_members"], out["n_nonmembers"], out["n_shadow"]) == (2000, 2000, 2000)
    assert "calibrated" not in membership_audit(pairs(10), pairs(10))  # no shadow pool, no calibration


def test_calibration_rejects_a_shadow_pool_smaller_than_k():
    from cliperase.engine.eval.forget import neighbourhood_calibrated

    with pytest.raises(ValueError, match="shadow pairs"):
        neighbourhood_calibrated(torch.eye(3), torch.zeros(3), torch.eye(3), torch.zeros(3), k=3)
