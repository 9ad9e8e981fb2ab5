"""Before/after evaluation, the same code for every method: zero-shot accuracy and retrieval
recall, each split into the forget part and the retain part."""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import EvalSet

__all__ = ["zeroshot_classifier", "zeroshot_accuracy", "retrieval_recall", "forget_mask", "evaluate",
           "EvalEmbeddings", "embed_eval_set", "zeroshot_metrics", "retrieval_metrics", "benchmark_metrics",
           "TASKS", "load_attributes", "attribute_mask", "zeroshot_breakdown"]

RECALL_KS = (1, 5, 10)


@torch.no_grad()
def encode_images(model: nn.Module, images: Tensor, batch_size: int = 256) -> Tensor:
    device = next(model.parameters()).device
    out = [model.encode_image(images[i : i + batch_size].to(device), normalize=True).float() for i in range(0, len(images), batch_size)]
    return torch.cat(out)


@torch.no_grad()
def encode_texts(model: nn.Module, tokenizer: Callable, texts: Sequence[str], batch_size: int = 256) -> Tensor:
    device = next(model.parameters()).device
    out = [model.encode_text(tokenizer(list(texts[i : i + batch_size])).to(device), normalize=True).float()
           for i in range(0, len(texts), batch_size)]
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def zeroshot_classifier(model: nn.Module, tokenizer: Callable, classnames: Sequence[str], templates: Sequence[str]) -> Tensor:
    """(C, d) class embeddings: the normalised mean of each class's normalised prompt embeddings."""
    prompts = [t.replace("{c}", c) for c in classnames for t in templates]
    emb = encode_texts(model, tokenizer, prompts).view(len(classnames), len(templates), -1)
    return F.normalize(emb.mean(dim=1), dim=-1)


def zeroshot_accuracy(image_emb: Tensor, classifier: Tensor, labels: Tensor, k: int = 1) -> float:
    """Fraction of images whose label is among the top-`k` classes; NaN for no images."""
    if len(labels) == 0:
        return float("nan")
    topk = (image_emb @ classifier.T).topk(min(k, classifier.shape[0]), dim=1).indices
    return (topk == labels[:, None]).any(dim=1).float().mean().item()


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


def forget_mask(ev: EvalSet, forget_classes: Sequence[str]) -> Tensor:
    """(M,) bool: which evaluation images belong to the forget part.

    By label when the set has labels; else by captions that name a forget class as a whole
    word (case-insensitive).
    """
    if ev.labels is not None and ev.classnames:
        idx = [ev.classnames.index(c) for c in forget_classes]
        return torch.isin(ev.labels, torch.tensor(idx, dtype=ev.labels.dtype))
    pattern = re.compile(r"\b(" + "|".join(re.escape(c) for c in forget_classes) + r")\b", re.IGNORECASE)
    return torch.tensor([any(pattern.search(c) for c in caps) for caps in ev.captions], dtype=torch.bool)


Where = Union[str, Mapping[str, Sequence[str]], None]  # "colour=red;background=white|black" or its parsed dict


def load_attributes(root: str) -> List[dict]:
    """The decoded `{key}.json` of each image of a CLIP_benchmark-layout set, in `load_eval_set`'s
    order (the same shards, samples without an image skipped); {} for a sample without json."""
    import webdataset as wds

    from .data import IMAGE_KEYS

    shards = sorted((Path(root) / "test").glob("*.tar"), key=lambda p: (len(p.stem), p.stem))
    out: List[dict] = []
    for sample in wds.DataPipeline(wds.SimpleShardList([str(s) for s in shards]), wds.tarfile_to_samples()):
        if any(k in sample for k in IMAGE_KEYS.split(";")):
            out.append(json.loads(sample["json"]) if "json" in sample else {})
    return out


def attribute_mask(attributes: Sequence[dict], where: Where) -> Tensor:
    """(M,) bool: the images whose attributes match `where`: every key, any of its values
    (compared as strings; an image without the key does not match). Empty `where`: all True.
    Raises ValueError for a malformed `where` string."""
    from .config import parse_attributes

    where = parse_attributes(where) if isinstance(where, str) else dict(where or {})
    return torch.tensor([all(str(a.get(k)) in tuple(map(str, vs)) for k, vs in where.items()) for a in attributes],
                        dtype=torch.bool)


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


@torch.no_grad()
def evaluate(model: nn.Module, tokenizer: Callable, ev: EvalSet, forget_classes: Sequence[str], *,
             attributes: Optional[Sequence[dict]] = None, forget_where: Where = None,
             breakdown: Optional[str] = None) -> dict:
    """`{"zeroshot": {"forget_acc", "retain_acc"}, "retrieval": {"forget": R, "retain": R}}`.

    `attributes` (the images' json, `load_attributes`) enable two options: `forget_where` narrows
    the forget part to the forget-class images whose attributes match (a subgroup; the rest of
    those classes then count as retained), and `breakdown` adds `"zeroshot_by": {breakdown:
    zeroshot_breakdown(...)}` over the forget classes.
    """
    from .config import parse_attributes

    where = parse_attributes(forget_where) if isinstance(forget_where, str) else dict(forget_where or {})
    if (where or breakdown) and attributes is None:
        attributes = getattr(ev, "attributes", None)
        if attributes is None:
            raise ValueError("attributes: forget_where and breakdown need the images' attributes (load_attributes)")
    if attributes is not None and len(attributes) != len(ev.images):
        raise ValueError(f"attributes: expected one per image ({len(ev.images)}), got {len(attributes)}")
    was_training = model.training
    model.eval()
    try:
        image_emb = encode_images(model, ev.images)
        is_forget = forget_mask(ev, forget_classes)
        if where:
            is_forget &= attribute_mask(attributes, where)
        result: dict = {}
        if ev.labels is not None and ev.classnames:
            clf = zeroshot_classifier(model, tokenizer, ev.classnames, ev.templates)
            result["zeroshot"] = {
                "forget_acc": zeroshot_accuracy(image_emb[is_forget], clf, ev.labels[is_forget]),
                "retain_acc": zeroshot_accuracy(image_emb[~is_forget], clf, ev.labels[~is_forget]),
            }
            if breakdown:
                result["zeroshot_by"] = {breakdown: zeroshot_breakdown(image_emb, clf, ev.labels, attributes, breakdown,
                                                                       ev.classnames, forget_classes)}
        texts: List[str] = [c for caps in ev.captions for c in caps]
        if texts:
            owner = torch.tensor([i for i, caps in enumerate(ev.captions) for _ in caps])
            text_emb = encode_texts(model, tokenizer, texts)
            result["retrieval"] = {}
            for part, keep in (("forget", is_forget), ("retain", ~is_forget)):
                images = torch.nonzero(keep).flatten()
                remap = torch.full((len(ev.images),), -1, dtype=torch.long)
                remap[images] = torch.arange(len(images))
                sel = keep[owner]
                result["retrieval"][part] = retrieval_recall(image_emb[images], text_emb[sel], remap[owner[sel]])
        return result
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------------
# Benchmark-style evaluation: CLIP_benchmark's task and metric names, each metric also on the
# forget part and the retain part. The embeddings are computed once per model and dataset and
# every metric is a pure function of them, so the metrics are tested on hand-built embeddings.

TASKS = ("zeroshot_classification", "zeroshot_retrieval")  # CLIP_benchmark's task names


@dataclass
class EvalEmbeddings:
    """One model's embeddings of one evaluation set, all L2-normalised fp32 on the CPU."""

    image_emb: Tensor  # (M, d)
    classifier: Optional[Tensor]  # (C, d) class embeddings, None without labels/classnames
    text_emb: Tensor  # (T, d) every caption, image by image; (0, d) without captions
    text_owner: Tensor  # (T,) int64 index of each caption's image


def _batched(fn: Callable[[int, int], Tensor], n: int, batch_size: int, bar) -> Tensor:
    out = []
    for i in range(0, n, batch_size):
        out.append(fn(i, min(i + batch_size, n)).float().cpu())
        bar.update(min(i + batch_size, n) - i)
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def embed_eval_set(model: nn.Module, tokenizer: Callable, ev: EvalSet, *, batch_size: int = 256,
                   progress: bool = False, desc: str = "embed") -> EvalEmbeddings:
    """Embed an evaluation set once: images, class prompts (one classifier per model and set)
    and captions, in batches of `batch_size` on the model's device, with a tqdm bar over
    images + prompts + captions when `progress`. The model's train/eval mode is restored.

    Raises ValueError for a non-positive `batch_size`.
    """
    from tqdm.auto import tqdm

    if batch_size <= 0:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size}")
    device = next(model.parameters()).device
    texts: List[str] = [c for caps in ev.captions for c in caps]
    has_classes = ev.labels is not None and bool(ev.classnames)
    prompts = [t.replace("{c}", c) for c in ev.classnames for t in ev.templates] if has_classes else []
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=len(ev.images) + len(prompts) + len(texts), desc=desc, disable=not progress,
                  dynamic_ncols=True, unit="item") as bar:
            image_emb = _batched(lambda a, b: model.encode_image(ev.images[a:b].to(device), normalize=True),
                                 len(ev.images), batch_size, bar)

            def encode(strings: List[str]) -> Tensor:
                return _batched(lambda a, b: model.encode_text(tokenizer(strings[a:b]).to(device), normalize=True),
                                len(strings), batch_size, bar)

            classifier = None
            if has_classes:
                per_prompt = encode(prompts).view(len(ev.classnames), len(ev.templates), -1)
                classifier = F.normalize(per_prompt.mean(dim=1), dim=-1)
            text_emb = encode(texts) if texts else torch.empty(0, image_emb.shape[1])
    finally:
        model.train(was_training)
    owner = torch.tensor([i for i, caps in enumerate(ev.captions) for _ in caps], dtype=torch.long)
    return EvalEmbeddings(image_emb, classifier, text_emb, owner)


def _mean_per_class_recall(pred: Tensor, labels: Tensor) -> float:
    """Mean over the classes present in `labels` of the fraction of their images predicted right."""
    classes = labels.unique()
    if len(classes) == 0:
        return float("nan")
    return torch.stack([(pred[labels == c] == c).float().mean() for c in classes]).mean().item()


def zeroshot_metrics(image_emb: Tensor, classifier: Tensor, labels: Tensor, is_forget: Tensor) -> Dict[str, float]:
    """Zero-shot classification in CLIP_benchmark's names, on all images and on each part.

    Args:
        image_emb: (M, d) normalised. classifier: (C, d) normalised class embeddings.
        labels: (M,) int64 class indices. is_forget: (M,) bool.
    Returns:
        {"acc1", "acc5", "mean_per_class_recall"} over all M images, the same three prefixed
        "forget_" and "retain_" over each part, and "n_forget", "n_retain" (image counts).
        A part without images gets NaN. Top-5 with fewer than 5 classes is top-C (always 1).
    """
    if not (len(image_emb) == len(labels) == len(is_forget)):
        raise ValueError(f"image_emb, labels, is_forget: expected equal lengths, got "
                         f"{len(image_emb)}, {len(labels)}, {len(is_forget)}")
    is_forget = is_forget.bool()
    pred = (image_emb @ classifier.T).argmax(dim=1) if len(image_emb) else labels
    out: Dict[str, float] = {}
    for prefix, keep in (("", torch.ones_like(is_forget)), ("forget_", is_forget), ("retain_", ~is_forget)):
        out[f"{prefix}acc1"] = zeroshot_accuracy(image_emb[keep], classifier, labels[keep], k=1)
        out[f"{prefix}acc5"] = zeroshot_accuracy(image_emb[keep], classifier, labels[keep], k=5)
        out[f"{prefix}mean_per_class_recall"] = _mean_per_class_recall(pred[keep], labels[keep])
    out["n_forget"], out["n_retain"] = int(is_forget.sum()), int((~is_forget).sum())
    return out


def retrieval_metrics(image_emb: Tensor, text_emb: Tensor, text_owner: Tensor, is_forget: Tensor,
                      ks: Sequence[int] = RECALL_KS) -> Dict[str, float]:
    """Retrieval recall@k in CLIP_benchmark's names, on all pairs and within each part.

    CLIP_benchmark's "image_retrieval_recall@k" is text->image (a caption retrieves its image,
    our t2i) and "text_retrieval_recall@k" is image->text (i2t). Within a part, only that part's
    images and their captions are candidates, as in `evaluate`.

    Args:
        image_emb: (M, d), text_emb: (T, d), both normalised; text_owner: (T,) image index of
        each caption; is_forget: (M,) bool.
    Returns:
        {"image_retrieval_recall@k", "text_retrieval_recall@k"} for each k, the same prefixed
        "forget_" and "retain_", and "n_forget", "n_retain" (image counts). NaN for an empty part.
    """
    if len(image_emb) != len(is_forget) or len(text_emb) != len(text_owner):
        raise ValueError(f"image_emb/is_forget and text_emb/text_owner: expected equal lengths, got "
                         f"{len(image_emb)}/{len(is_forget)} and {len(text_emb)}/{len(text_owner)}")
    is_forget = is_forget.bool()
    out: Dict[str, float] = {}
    for prefix, keep in (("", torch.ones_like(is_forget)), ("forget_", is_forget), ("retain_", ~is_forget)):
        images = torch.nonzero(keep).flatten()
        remap = torch.full((len(image_emb),), -1, dtype=torch.long)
        remap[images] = torch.arange(len(images))
        sel = keep[text_owner]
        r = retrieval_recall(image_emb[images], text_emb[sel], remap[text_owner[sel]], ks=ks)
        for k in ks:
            out[f"{prefix}image_retrieval_recall@{k}"] = r[f"t2i_r{k}"]
            out[f"{prefix}text_retrieval_recall@{k}"] = r[f"i2t_r{k}"]
    out["n_forget"], out["n_retain"] = int(is_forget.sum()), int((~is_forget).sum())
    return out


def benchmark_metrics(emb: EvalEmbeddings, ev: EvalSet, forget_classes: Sequence[str]) -> Dict[str, Dict[str, float]]:
    """{task: metrics} for each task of TASKS the set supports (labels for classification,
    captions for retrieval). NaN values are returned as None so the result is strict JSON."""
    is_forget = forget_mask(ev, forget_classes) if forget_classes else torch.zeros(len(ev.images), dtype=torch.bool)
    out: Dict[str, Dict[str, float]] = {}
    if emb.classifier is not None:
        out["zeroshot_classification"] = zeroshot_metrics(emb.image_emb, emb.classifier, ev.labels, is_forget)
    if len(emb.text_emb):
        out["zeroshot_retrieval"] = retrieval_metrics(emb.image_emb, emb.text_emb, emb.text_owner, is_forget)
    return {task: {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in m.items()}
            for task, m in out.items()}
