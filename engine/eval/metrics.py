"""Metrics as pure functions of embeddings, each on every split of the images (all, forget, retain).

`TASKS` is the registry: CLIP_benchmark's task name -> (applies(ev), metric function). A metric
function takes an `EvalEmbeddings`, the set and a (M,) bool `keep` of the images in the split,
and returns {CLIP_benchmark metric name: float} (NaN for an empty split). `split_metrics` runs
every task that applies on the three splits; report.json, launch/evaluate.py and compare.md are
all rendered from its result (engine/eval/report.py).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..data import EvalSet
from .embed import EvalEmbeddings

__all__ = ["RECALL_KS", "TASKS", "SPLITS", "zeroshot_accuracy", "retrieval_recall", "zeroshot_metrics",
           "retrieval_metrics", "split_metrics", "zeroshot_breakdown"]

RECALL_KS = (1, 5, 10)
SPLITS = ("", "forget_", "retain_")  # metric-name prefixes: all images, the forget part, the rest


def zeroshot_accuracy(image_emb: Tensor, classifier: Tensor, labels: Tensor, k: int = 1) -> float:
    """Fraction of images whose label is among the top-`k` classes; NaN for no images."""
    if len(labels) == 0:
        return float("nan")
    topk = (image_emb @ classifier.T).topk(min(k, classifier.shape[0]), dim=1).indices
    return (topk == labels[:, None]).any(dim=1).float().mean().item()


def _mean_per_class_recall(pred: Tensor, labels: Tensor) -> float:
    """Mean over the classes present in `labels` of the fraction of their images predicted right."""
    classes = labels.unique()
    if len(classes) == 0:
        return float("nan")
    return torch.stack([(pred[labels == c] == c).float().mean() for c in classes]).mean().item()


def retrieval_recall(image_emb: Tensor, text_emb: Tensor, text_owner: Tensor, ks: Sequence[int] = RECALL_KS) -> Dict[str, float]:
    """Image->text and text->image recall@k.

    Args:
        image_emb: (M, d) normalised. text_emb: (T, d) normalised. text_owner: (T,) index of
            each caption's image. An image is retrieved correctly at k when any of its
            captions is in its top k; a caption when its image is in its top k.
    Returns:
        {"i2t_r1", ..., "t2i_r10"} as fractions; NaN for an empty set.
    """
    names = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in ks]
    if len(image_emb) == 0 or len(text_emb) == 0:
        return {n: float("nan") for n in names}
    sim = image_emb @ text_emb.T  # (M, T)
    owns = text_owner[None, :] == torch.arange(len(image_emb))[:, None]  # (M, T)
    out = {}
    # Rank of the best own caption per image = number of captions scoring strictly higher.
    best_own = sim.masked_fill(~owns, float("-inf")).max(dim=1).values
    i2t_rank = (sim > best_own[:, None]).sum(dim=1)
    own_score = sim[text_owner, torch.arange(len(text_emb))]
    t2i_rank = (sim > own_score[None, :]).sum(dim=0)
    for k in ks:
        out[f"i2t_r{k}"] = (i2t_rank < k).float().mean().item()
    for k in ks:
        out[f"t2i_r{k}"] = (t2i_rank < k).float().mean().item()
    return out


def zeroshot_metrics(emb: EvalEmbeddings, ev: EvalSet, keep: Tensor) -> Dict[str, float]:
    """Zero-shot classification of the images in `keep`, CLIP_benchmark's names: acc1, acc5 (top-C
    with fewer than 5 classes) and mean_per_class_recall."""
    image_emb, labels = emb.image_emb[keep], ev.labels[keep]
    pred = (image_emb @ emb.classifier.T).argmax(dim=1) if len(image_emb) else labels
    return {"acc1": zeroshot_accuracy(image_emb, emb.classifier, labels, k=1),
            "acc5": zeroshot_accuracy(image_emb, emb.classifier, labels, k=5),
            "mean_per_class_recall": _mean_per_class_recall(pred, labels)}


def retrieval_metrics(emb: EvalEmbeddings, ev: EvalSet, keep: Tensor, ks: Sequence[int] = RECALL_KS) -> Dict[str, float]:
    """Retrieval among the images in `keep` and their captions only, CLIP_benchmark's names:
    "image_retrieval_recall@k" is text->image (a caption retrieves its image), and
    "text_retrieval_recall@k" image->text."""
    images = torch.nonzero(keep).flatten()
    remap = torch.full((len(keep),), -1, dtype=torch.long)
    remap[images] = torch.arange(len(images))
    sel = keep[emb.text_owner]
    r = retrieval_recall(emb.image_emb[images], emb.text_emb[sel], remap[emb.text_owner[sel]], ks=ks)
    out = {f"image_retrieval_recall@{k}": r[f"t2i_r{k}"] for k in ks}
    out.update({f"text_retrieval_recall@{k}": r[f"i2t_r{k}"] for k in ks})
    return out


MetricFn = Callable[[EvalEmbeddings, EvalSet, Tensor], Dict[str, float]]
# CLIP_benchmark's task names; each applies to a set with labels and class names, resp. captions.
TASKS: Dict[str, Tuple[Callable[[EvalSet], bool], MetricFn]] = {
    "zeroshot_classification": (lambda ev: ev.labels is not None and bool(ev.classnames), zeroshot_metrics),
    "zeroshot_retrieval": (lambda ev: any(ev.captions), retrieval_metrics),
}


def split_metrics(emb: EvalEmbeddings, ev: EvalSet, is_forget: Tensor,
                  tasks: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, float]]:
    """{task: metrics} for each task of TASKS (or of `tasks`) that applies to the set: every
    metric on all images, and prefixed "forget_" / "retain_" on each part, plus "n_forget" and
    "n_retain" (image counts). A part without images gets NaN.

    Raises ValueError when `is_forget` is not one bool per image or a task name is unknown.
    """
    if is_forget.shape != (len(emb.image_emb),) or len(ev.images) != len(emb.image_emb):
        raise ValueError(f"is_forget: expected one entry per image ({len(emb.image_emb)}), got shape "
                         f"{tuple(is_forget.shape)} for a set of {len(ev.images)} images")
    unknown = [t for t in tasks or () if t not in TASKS]
    if unknown:
        raise ValueError(f"tasks: unknown {unknown}; available: {list(TASKS)}")
    is_forget = is_forget.bool()
    out: Dict[str, Dict[str, float]] = {}
    for task, (applies, fn) in TASKS.items():
        if (tasks is not None and task not in tasks) or not applies(ev):
            continue
        metrics: Dict[str, float] = {}
        for prefix, keep in zip(SPLITS, (torch.ones_like(is_forget), is_forget, ~is_forget)):
            metrics.update({prefix + k: v for k, v in fn(emb, ev, keep).items()})
        metrics["n_forget"], metrics["n_retain"] = int(is_forget.sum()), int((~is_forget).sum())
        out[task] = metrics
    return out


def zeroshot_breakdown(image_emb: Tensor, classifier: Tensor, labels: Tensor, attributes: Sequence[dict], by: str,
                       classnames: Sequence[str], classes: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, dict]]:
    """Top-1 zero-shot accuracy of each class's images grouped by the attribute `by`.

    Args:
        image_emb: (M, d) normalised; classifier: (C, d) normalised; labels: (M,) int64;
        attributes: M dicts (the images' json); classnames: the C names; classes: the classes to
        break down (default all).
    Returns:
        {class: {value: {"acc": float, "n": int}}}, values sorted; images without `by` are left out.
    """
    if not (len(image_emb) == len(labels) == len(attributes)):
        raise ValueError(f"image_emb, labels, attributes: expected equal lengths, got "
                         f"{len(image_emb)}, {len(labels)}, {len(attributes)}")
    pred = (image_emb @ classifier.T).argmax(dim=1) if len(image_emb) else labels
    out: Dict[str, Dict[str, dict]] = {}
    for c in classes if classes is not None else classnames:
        idx = classnames.index(c)
        groups: Dict[str, List[int]] = {}
        for i in torch.nonzero(labels == idx).flatten().tolist():
            if by in attributes[i]:
                groups.setdefault(str(attributes[i][by]), []).append(i)
        out[c] = {v: {"acc": (pred[rows] == idx).float().mean().item(), "n": len(rows)}
                  for v, rows in sorted(groups.items())}
    return out
