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


def zeroshot_accuracy(image_emb: Tensor, classifier: Tensor, labels: Tensor, topk: Sequence[int] = (1,)) -> List[float]:
    """Top-k accuracy for each k of `topk`, CLIP_benchmark 1.6.2's `accuracy`: logits = 100 *
    image . class, ONE `torch.topk(max(topk))` call, and acc@k = fraction of images whose label
    is among its first k columns (so tied logits resolve in torch.topk's order, which is not
    the index order). NaN each for no images; ValueError when max(topk) exceeds the classes
    (CLIP_benchmark never asks: it skips acc5 below 5 classes, see zeroshot_metrics)."""
    if max(topk) > classifier.shape[0]:
        raise ValueError(f"topk: {max(topk)} exceeds the {classifier.shape[0]} classes")
    if len(labels) == 0:
        return [float("nan")] * len(topk)
    pred = (100.0 * image_emb @ classifier.T).topk(max(topk), 1, True, True).indices
    # A count over n in Python floats, as there (a float32 mean would differ in the 8th digit).
    return [(pred[:, :k] == labels[:, None]).any(dim=1).sum().item() / len(labels) for k in topk]


def _mean_per_class_recall(pred: Tensor, labels: Tensor) -> float:
    """Mean over the classes present in `labels` of the fraction of their images predicted right
    (sklearn's balanced_accuracy_score, which CLIP_benchmark reports)."""
    classes = labels.unique()
    if len(classes) == 0:
        return float("nan")
    return torch.stack([(pred[labels == c] == c).double().mean() for c in classes]).mean().item()  # fp64, as sklearn


def _found(scores: Tensor, positive: Tensor, k: int) -> Tensor:
    """(Q,) bool: whether any positive of each query row is among its `torch.topk(k)` columns.
    k is capped at the column count (CLIP_benchmark's topk would raise there; every candidate is
    then within the top k)."""
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return positive.gather(1, top).any(dim=1)


def retrieval_recall(image_emb: Tensor, text_emb: Tensor, text_owner: Tensor, ks: Sequence[int] = RECALL_KS) -> Dict[str, float]:
    """Image->text and text->image recall@k, as CLIP_benchmark 1.6.2's zeroshot_retrieval defines
    them: scores = text_emb @ image_emb.T (its orientation, so the same floats and the same
    ties), one `torch.topk(k)` call per k (topk(10)[:5] may order ties differently from
    topk(5)), a caption found when its image is in its top k, an image when any of its
    captions is in its top k. Ties resolve in torch.topk's order, not in the query's favour:
    identical captions of different images embed identically, and only one of them can come
    first.

    Args:
        image_emb: (M, d) normalised. text_emb: (T, d) normalised. text_owner: (T,) index of
            each caption's image (an image without captions counts as not found, as there).
    Returns:
        {"i2t_r1", ..., "t2i_r10"} as fractions; NaN for an empty set.
    """
    names = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in ks]
    if len(image_emb) == 0 or len(text_emb) == 0:
        return {n: float("nan") for n in names}
    scores = text_emb @ image_emb.T  # (T, M)
    positive = text_owner[:, None] == torch.arange(len(image_emb))[None, :]
    out = {f"i2t_r{k}": _found(scores.T, positive.T, k).float().mean().item() for k in ks}
    out.update({f"t2i_r{k}": _found(scores, positive, k).float().mean().item() for k in ks})
    return out


def zeroshot_metrics(emb: EvalEmbeddings, ev: EvalSet, keep: Tensor) -> Dict[str, float]:
    """Zero-shot classification of the images in `keep`, CLIP_benchmark's names and definitions:
    acc1 and acc5 from one top-5 call, acc5 NaN (and acc1 from a top-1 call) when the SET has
    fewer than 5 classes, as CLIP_benchmark does; mean_per_class_recall from the argmax (the
    first maximal class)."""
    image_emb, labels = emb.image_emb[keep], ev.labels[keep]
    pred = (100.0 * image_emb @ emb.classifier.T).argmax(dim=1) if len(image_emb) else labels
    if emb.classifier.shape[0] >= 5:
        acc1, acc5 = zeroshot_accuracy(image_emb, emb.classifier, labels, topk=(1, 5))
    else:
        (acc1,), acc5 = zeroshot_accuracy(image_emb, emb.classifier, labels, topk=(1,)), float("nan")
    return {"acc1": acc1, "acc5": acc5, "mean_per_class_recall": _mean_per_class_recall(pred, labels)}


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
# CLIP_benchmark's task names. Classification applies to a set with labels and class names that
# is not typed retrieval (CLIP_benchmark would not classify it); retrieval to any set with captions
# (CLIP_benchmark scores it on retrieval folders only; a classification folder's captions are
# our addition, so that one eval_data serves both tasks).
TASKS: Dict[str, Tuple[Callable[[EvalSet], bool], MetricFn]] = {
    "zeroshot_classification": (lambda ev: ev.dataset_type != "retrieval" and ev.labels is not None
                                and bool(ev.classnames), zeroshot_metrics),
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
    # zeroshot_accuracy's prediction and count, so that a breakdown of the forget part equals its acc1
    pred = (100.0 * image_emb @ classifier.T).topk(1, 1, True, True).indices[:, 0] if len(image_emb) else labels
    out: Dict[str, Dict[str, dict]] = {}
    for c in classes if classes is not None else classnames:
        idx = classnames.index(c)
        groups: Dict[str, List[int]] = {}
        for i in torch.nonzero(labels == idx).flatten().tolist():
            if by in attributes[i]:
                groups.setdefault(str(attributes[i][by]), []).append(i)
        out[c] = {v: {"acc": (pred[rows] == idx).sum().item() / len(rows), "n": len(rows)}
                  for v, rows in sorted(groups.items())}
    return out
