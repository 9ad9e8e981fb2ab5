"""Forgetting quality beyond accuracy: how similar the forgotten pairs still look, and whether
an attacker can tell them from pairs the model never saw.

- `pair_similarities`: cosine of each image with its own caption (forget pairs, before/after).
- `similarity_histogram` / `plot_similarity_histograms`: their distribution as data and a PNG.
- `auc`: the exact rank-based (Mann-Whitney U) AUC, ties counted one half.
- `membership_inference_auc`: a similarity-threshold attack: "a pair is a member (was trained
  on) when its image-caption similarity is high". Its AUC over all thresholds is reported:
  0.5 means members and non-members cannot be told apart. Far below 0.5 is not "better": a
  forget set pushed unusually far apart is as recognisable as one that is remembered.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..data import ShardReader, resolve_shards
from ..errors import ConfigError

__all__ = ["load_pairs", "pair_similarities", "similarity_histogram", "plot_similarity_histograms", "auc",
           "membership_inference_auc"]


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
def pair_similarities(model: nn.Module, tokenizer: Callable, images: Tensor, captions: Sequence[str], *,
                      batch_size: int = 256) -> Tensor:
    """(N,) fp32 cosine similarity of image i with caption i, in batches on the model's device.

    Raises ValueError when the counts differ.
    """
    if len(images) != len(captions):
        raise ValueError(f"images, captions: expected equal counts, got {len(images)} and {len(captions)}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        out = []
        for i in range(0, len(images), batch_size):
            zi = model.encode_image(images[i : i + batch_size].to(device), normalize=True)
            zt = model.encode_text(tokenizer(list(captions[i : i + batch_size])).to(device), normalize=True)
            out.append((zi * zt).sum(dim=-1).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


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
