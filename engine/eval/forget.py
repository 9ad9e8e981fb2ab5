"""Forgetting quality beyond accuracy: how similar the forgotten pairs still look, and whether
an attacker can tell them from pairs the model never saw.

- `pair_similarities`: cosine of each image with its own caption (forget pairs, before/after).
- `similarity_histogram` / `plot_similarity_histograms`: their distribution as data and a PNG.
- `auc`: the exact rank-based (Mann-Whitney U) AUC, ties counted one half.
- `membership_inference_auc`: a similarity-threshold attack: "a pair is a member (was trained
  on) when its image-caption similarity is high". Its AUC over all thresholds is reported:
  0.5 means members and non-members cannot be told apart. Far below 0.5 is not "better": a
  forget set pushed unusually far apart is as recognisable as one that is remembered.
- `membership_audit`: that attack and a stronger one calibrated per pair on a shadow pool of
  never-seen pairs (`neighbourhood_calibrated`, an offline-LiRA test), each as AUC and TPR at
  1% FPR (`tpr_at_fpr`: the low-FPR regime where a few confidently recognised pairs show).
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..data import ShardReader, resolve_shards
from ..errors import ConfigError

__all__ = ["load_pairs", "pair_similarities", "pair_embeddings", "similarity_histogram", "plot_similarity_histograms",
           "auc", "membership_inference_auc", "tpr_at_fpr", "neighbourhood_calibrated", "membership_audit"]


def load_pairs(spec: str, preprocess: Callable, *, limit: Optional[int] = None, what: str = "pairs") -> Tuple[Tensor, List[str]]:
    """The first `limit` (all when None) image-caption pairs of img2dataset shards, in shard
    order: ((N, 3, H, W) preprocessed images, N captions). Bad samples are skipped (ShardReader).

    Raises ConfigError when the spec matches no shards or yields no pair.
    """
    reader = ShardReader(resolve_shards(spec, what), check_images="decode")
    images, captions = [], []
    for sample in reader:
        if limit is not None and len(images) >= limit:
            break
        images.append(preprocess(sample["__image__"]))
        captions.append(sample["txt"].decode("utf-8").strip())
    if not images:
        raise ConfigError([f"{what}: no usable image-caption pair in {spec!r} (skipped: {reader.skip_counts()})"])
    return torch.stack(images), captions


@torch.no_grad()
def pair_embeddings(model: nn.Module, tokenizer: Callable, images: Tensor, captions: Sequence[str], *,
                    batch_size: int = 256) -> Tuple[Tensor, Tensor]:
    """((N, d), (N, d)) normalised fp32 image and caption embeddings of N pairs, on the CPU, in
    batches on the model's device (the model's train/eval mode is restored).

    Raises ValueError when the counts differ.
    """
    if len(images) != len(captions):
        raise ValueError(f"images, captions: expected equal counts, got {len(images)} and {len(captions)}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        zi, zt = [], []
        for i in range(0, len(images), batch_size):
            zi.append(model.encode_image(images[i : i + batch_size].to(device), normalize=True).float().cpu())
            zt.append(model.encode_text(tokenizer(list(captions[i : i + batch_size])).to(device), normalize=True)
                      .float().cpu())
    finally:
        model.train(was_training)
    if not zi:
        return torch.empty(0, 0), torch.empty(0, 0)
    return torch.cat(zi), torch.cat(zt)


def pair_similarities(model: nn.Module, tokenizer: Callable, images: Tensor, captions: Sequence[str], *,
                      batch_size: int = 256) -> Tensor:
    """(N,) fp32 cosine similarity of image i with caption i (`pair_embeddings`)."""
    zi, zt = pair_embeddings(model, tokenizer, images, captions, batch_size=batch_size)
    return (zi * zt).sum(dim=-1) if len(zi) else torch.empty(0)


def similarity_histogram(sims: Mapping[str, Tensor], *, bins: int = 40, lo: float = -1.0, hi: float = 1.0) -> dict:
    """Histogram data of several similarity vectors on shared bins.

    Returns {"edges": [bins + 1 floats], "series": {name: {"counts": [bins ints], "mean",
    "std", "n"}}}. Values outside [lo, hi] fall in the end bins (cosines are in [-1, 1] up to
    rounding). Raises ValueError for bins < 1 or lo >= hi.
    """
    if bins < 1 or not lo < hi:
        raise ValueError(f"bins, lo, hi: expected bins >= 1 and lo < hi, got {bins}, {lo}, {hi}")
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    series = {}
    for name, s in sims.items():
        s = s.detach().double().flatten().clamp(lo, hi)
        # Bucket b holds edges[b] <= x < edges[b+1]; the last bucket also holds x == hi.
        idx = (torch.bucketize(s, edges, right=True) - 1).clamp(0, bins - 1)
        counts = torch.bincount(idx, minlength=bins)
        series[name] = {"counts": counts.tolist(), "n": len(s),
                        "mean": s.mean().item() if len(s) else float("nan"),
                        "std": s.std(unbiased=False).item() if len(s) else float("nan")}
    return {"edges": edges.tolist(), "series": series}


def plot_similarity_histograms(hist: dict, path: Path, *, title: str = "forget-pair cosine similarity") -> Path:
    """Write `similarity_histogram`'s data as a PNG: one step outline per series, density scaled."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    edges = hist["edges"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, s in hist["series"].items():
        total = max(1, sum(s["counts"]))
        width = edges[1] - edges[0]
        density = [c / (total * width) for c in s["counts"]]
        ax.stairs(density, edges, label=f"{name} (mean {s['mean']:.3f})", linewidth=1.6)
    ax.set_xlabel("cosine(image, own caption)")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    Path(path).write_bytes(buf.getvalue())
    return Path(path)


def auc(positive: Tensor, negative: Tensor) -> float:
    """P(score of a random positive > score of a random negative) + 0.5 P(tie), exactly.

    Rank-based (Mann-Whitney U): all scores ranked together, tied scores share their average
    rank, U = (sum of positive ranks) - n_pos (n_pos + 1) / 2, AUC = U / (n_pos n_neg). In fp64,
    O((n_pos + n_neg) log(n_pos + n_neg)). NaN when either side is empty.
    """
    pos, neg = positive.detach().double().flatten().cpu(), negative.detach().double().flatten().cpu()
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    scores = torch.cat([pos, neg])
    order = scores.argsort()
    sorted_scores = scores[order]
    # Average rank of each tie group: ranks are 1-based; a group spanning sorted positions
    # [first, last] gets (first + last) / 2 + 1.
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    last = counts.cumsum(0) - 1
    first = last - counts + 1
    avg_rank = (first + last).double() / 2 + 1
    ranks = torch.empty_like(scores)
    ranks[order] = avg_rank[inverse]
    n_pos, n_neg = len(pos), len(neg)
    u = ranks[:n_pos].sum().item() - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def membership_inference_auc(member_scores: Tensor, nonmember_scores: Tensor) -> Dict[str, float]:
    """The threshold attack's AUC: members (forget pairs) should score like non-members.

    Scores are any "looks trained-on" statistic, higher meaning more member-like (here the
    image-caption cosine; a per-pair loss would be negated). Returns {"auc", "advantage",
    "n_members", "n_nonmembers"} with advantage = |auc - 0.5| * 2 in [0, 1], 0 when the attack
    cannot tell the two sets apart.
    """
    a = auc(member_scores, nonmember_scores)
    return {"auc": a, "advantage": abs(a - 0.5) * 2, "n_members": int(member_scores.numel()),
            "n_nonmembers": int(nonmember_scores.numel())}


def tpr_at_fpr(member_scores: Tensor, nonmember_scores: Tensor, fpr: float = 0.01) -> float:
    """The attack's true-positive rate at a false-positive rate of at most `fpr`: the largest
    fraction of members scoring above a threshold that at most floor(fpr * n_nonmembers)
    non-members reach ("member" when score >= threshold). Exactly: with v the (m+1)-th largest
    non-member score, m = floor(fpr * n), the members scoring strictly above v. NaN when either
    side is empty; ValueError for fpr outside [0, 1]."""
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr: expected a rate in [0, 1], got {fpr}")
    pos, neg = member_scores.detach().double().flatten().cpu(), nonmember_scores.detach().double().flatten().cpu()
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    allowed = math.floor(fpr * len(neg) + 1e-9)  # 1e-9: 0.01 * 1000 must allow 10, not 9
    if allowed >= len(neg):
        return 1.0
    v = neg.sort(descending=True).values[allowed]
    return (pos > v).double().mean().item()


def neighbourhood_calibrated(keys: Tensor, scores: Tensor, shadow_keys: Tensor, shadow_scores: Tensor,
                             k: int = 16) -> Tensor:
    """Per-pair calibrated scores: each pair's score minus the mean score of its k nearest
    shadow pairs (by key cosine), in units of the shadow pool's own leave-one-out residual std.

    This is offline LiRA's test (Carlini et al. 2022: how far a pair's score lies above the
    scores it gets from models that never saw it), with the never-seen distribution of a pair's
    score estimated from never-seen pairs that look like it under the audited model, instead of
    from shadow models trained without it. It removes per-pair difficulty (a plain caption
    fits its image well whether trained on or not) that the plain threshold attack confounds
    with membership, at the cost of one nearest-neighbour search, no training.

    Args: keys (N, d) and shadow_keys (S, d) normalised; scores (N,), shadow_scores (S,).
    Raises ValueError for fewer than k + 1 shadow pairs or mismatched shapes.
    """
    if len(shadow_keys) != len(shadow_scores) or len(keys) != len(scores):
        raise ValueError(f"keys/scores: expected matching lengths, got {len(keys)}/{len(scores)} and "
                         f"{len(shadow_keys)}/{len(shadow_scores)}")
    if not 0 < k < len(shadow_keys):
        raise ValueError(f"k: expected 0 < k < {len(shadow_keys)} shadow pairs, got {k}")
    keys, shadow_keys = keys.double(), shadow_keys.double()
    shadow_scores = shadow_scores.double()
    own = shadow_keys @ shadow_keys.T
    own.fill_diagonal_(float("-inf"))  # leave each shadow pair out of its own neighbourhood
    residual = shadow_scores - shadow_scores[own.topk(k, dim=1).indices].mean(dim=1)
    spread = residual.std().clamp_min(1e-12)
    expected = shadow_scores[(keys @ shadow_keys.T).topk(k, dim=1).indices].mean(dim=1)
    return (scores.double() - expected) / spread


def membership_audit(member: Tuple[Tensor, Tensor], nonmember: Tuple[Tensor, Tensor],
                     shadow: Optional[Tuple[Tensor, Tensor]] = None, *, k: int = 16, fpr: float = 0.01) -> dict:
    """Both attacks on (image_emb, text_emb) pairs of members (forget pairs), non-members and,
    for the calibrated one, a shadow pool (more never-seen pairs of the same distribution):

        {"threshold": {"auc", "tpr_at_1pct_fpr"}, "calibrated": {...} (with a shadow pool),
         "n_members", "n_nonmembers", "n_shadow"}

    The threshold attack scores a pair by its cosine; the calibrated one by
    `neighbourhood_calibrated` with the concatenated image and text embeddings as keys. AUC
    0.5 and TPR@1%FPR 0.01 = members look never seen. (`fpr` renames nothing: the key says 1pct
    only for the default; another fpr is reported under its own number.)"""
    name = f"tpr_at_{fpr * 100:g}pct_fpr"

    def attack(pos: Tensor, neg: Tensor) -> dict:
        return {"auc": auc(pos, neg), name: tpr_at_fpr(pos, neg, fpr)}

    def cos(pairs):
        return (pairs[0] * pairs[1]).sum(dim=-1)

    out = {"threshold": attack(cos(member), cos(nonmember)), "n_members": len(member[0]),
           "n_nonmembers": len(nonmember[0]), "n_shadow": len(shadow[0]) if shadow is not None else 0}
    if shadow is not None:
        key = lambda p: torch.cat([p[0], p[1]], dim=1) / math.sqrt(2)  # noqa: E731 (unit norm: both halves are)
        calibrate = lambda p: neighbourhood_calibrated(key(p), cos(p), key(shadow), cos(shadow), k)  # noqa: E731
        out["calibrated"] = attack(calibrate(member), calibrate(nonmember))
    return out
