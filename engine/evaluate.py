"""Before/after evaluation, the same code for every method: zero-shot accuracy and retrieval
recall, each split into the forget part and the retain part."""
from __future__ import annotations

import re
from typing import Callable, Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import EvalSet

__all__ = ["zeroshot_classifier", "zeroshot_accuracy", "retrieval_recall", "forget_mask", "evaluate"]

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


@torch.no_grad()
def evaluate(model: nn.Module, tokenizer: Callable, ev: EvalSet, forget_classes: Sequence[str]) -> dict:
    """`{"zeroshot": {"forget_acc", "retain_acc"}, "retrieval": {"forget": R, "retain": R}}`."""
    was_training = model.training
    model.eval()
    try:
        image_emb = encode_images(model, ev.images)
        is_forget = forget_mask(ev, forget_classes)
        result: dict = {}
        if ev.labels is not None and ev.classnames:
            clf = zeroshot_classifier(model, tokenizer, ev.classnames, ev.templates)
            result["zeroshot"] = {
                "forget_acc": zeroshot_accuracy(image_emb[is_forget], clf, ev.labels[is_forget]),
                "retain_acc": zeroshot_accuracy(image_emb[~is_forget], clf, ev.labels[~is_forget]),
            }
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
