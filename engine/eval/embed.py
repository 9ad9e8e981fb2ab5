"""One embedding pass of a model over an evaluation set: what every metric is computed from."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import EvalSet
from ..progress import progress_bar

__all__ = ["EvalEmbeddings", "embed_eval_set", "zeroshot_classifier"]


@dataclass
class EvalEmbeddings:
    """One model's embeddings of one evaluation set, all L2-normalised fp32 on the CPU."""

    image_emb: Tensor  # (M, d)
    classifier: Tensor | None  # (C, d) class embeddings (mean of the class's prompt embeddings); None without labels
    text_emb: Tensor  # (T, d) every caption, image by image; (0, d) without captions
    text_owner: Tensor  # (T,) int64 index of each caption's image


def _batched(fn: Callable[[int, int], Tensor], n: int, batch_size: int, bar) -> Tensor:
    out = []
    for i in range(0, n, batch_size):
        out.append(fn(i, min(i + batch_size, n)).float().cpu())
        bar.update(min(i + batch_size, n) - i)
    return torch.cat(out) if out else torch.empty(0)


def _prompts(classnames: Sequence[str], templates: Sequence[str]) -> List[str]:
    return [t.replace("{c}", c) for c in classnames for t in templates]


def _classifier(per_prompt: Tensor, classes: int, templates: int) -> Tensor:
    return F.normalize(per_prompt.view(classes, templates, -1).mean(dim=1), dim=-1)


@torch.no_grad()
def zeroshot_classifier(model: nn.Module, tokenizer: Callable, classnames: Sequence[str], templates: Sequence[str],
                        *, batch_size: int = 256) -> Tensor:
    """(C, d) class embeddings on the model's device: the normalised mean of each class's
    normalised prompt embeddings (CLIP_benchmark's zero-shot classifier)."""
    device = next(model.parameters()).device
    prompts = _prompts(classnames, templates)
    chunks = [model.encode_text(tokenizer(prompts[i:i + batch_size]).to(device), normalize=True).float()
              for i in range(0, len(prompts), batch_size)]
    return _classifier(torch.cat(chunks), len(classnames), len(templates))


@torch.no_grad()
def embed_eval_set(model: nn.Module, tokenizer: Callable, ev: EvalSet, *, batch_size: int = 256,
                   progress: bool = False, desc: str = "embed") -> EvalEmbeddings:
    """Embed an evaluation set once: images, class prompts (one classifier per model and set)
    and captions, in batches of `batch_size` on the model's device, with a progress bar over
    images + prompts + captions when `progress`. The model's train/eval mode is restored.

    Raises ValueError for a non-positive `batch_size`.
    """
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    device = next(model.parameters()).device
    texts: List[str] = [c for caps in ev.captions for c in caps]
    has_classes = ev.labels is not None and bool(ev.classnames)
    prompts = _prompts(ev.classnames, ev.templates) if has_classes else []
    was_training = model.training
    model.eval()
    try:
        with progress_bar(total=len(ev.images) + len(prompts) + len(texts), desc=desc, enabled=progress,
                          unit="item") as bar:
            image_emb = _batched(lambda a, b: model.encode_image(ev.images[a:b].to(device), normalize=True),
                                 len(ev.images), batch_size, bar)

            def encode(strings: List[str]) -> Tensor:
                return _batched(lambda a, b: model.encode_text(tokenizer(strings[a:b]).to(device), normalize=True),
                                len(strings), batch_size, bar)

            classifier = _classifier(encode(prompts), len(ev.classnames), len(ev.templates)) if has_classes else None
            text_emb = encode(texts) if texts else torch.empty(0, image_emb.shape[1])
    finally:
        model.train(was_training)
    owner = torch.tensor([i for i, caps in enumerate(ev.captions) for _ in caps], dtype=torch.long)
    return EvalEmbeddings(image_emb, classifier, text_emb, owner)
