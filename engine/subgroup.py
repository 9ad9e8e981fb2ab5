"""Targeted forgetting of image subgroups (Zhang et al. 2025, arXiv 2506.03117): the pieces of its
three stages, each usable alone.

1. Forget: `fisher_scores` ranks layers by relative Fisher information (squared gradients of the
   image-text similarity on the forget set over the same on the retain set); `trainable_only`
   freezes all but the top-k (`top_layers`).
2. Remind: retain-set training with distillation from the original, keeping an `Ema` of weights.
3. Restore: `soup` mixes `a * unlearned + (1 - a) * original`; `search_soup` picks the `a` with
   the strongest forgetting whose retain accuracy stays within a tolerance of the original's.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = ["layer_groups", "fisher_scores", "top_layers", "trainable_only", "Ema", "soup", "search_soup"]

_INDEXED = re.compile(r"^(.*?\.\d+)(\.|$)")  # up to the first numbered child: resblocks.3, layer1.0


def layer_groups(model: nn.Module) -> "OrderedDict[str, List[str]]":
    """Parameter names grouped into layers: a numbered block (`visual.transformer.resblocks.3`,
    `visual.layer2.0`) is one layer; any other parameter is grouped by its owning module
    (`visual.conv1`, `token_embedding`, `text_projection`)."""
    groups: "OrderedDict[str, List[str]]" = OrderedDict()
    for name, _ in model.named_parameters():
        m = _INDEXED.match(name)
        key = m.group(1) if m else (name.rsplit(".", 1)[0] if "." in name else name)
        groups.setdefault(key, []).append(name)
    return groups


def _squared_grads(model: nn.Module, objective: Callable[[nn.Module, object], Tensor], batches: Iterable,
                   groups: Mapping[str, List[str]]) -> Dict[str, float]:
    params = dict(model.named_parameters())
    totals = {g: 0.0 for g in groups}
    for batch in batches:
        model.zero_grad(set_to_none=True)
        objective(model, batch).backward()
        for g, names in groups.items():
            totals[g] += sum(float(params[n].grad.pow(2).sum()) for n in names if params[n].grad is not None)
    model.zero_grad(set_to_none=True)
    return totals


def fisher_scores(model: nn.Module, objective: Callable[[nn.Module, object], Tensor], forget_batches: Iterable,
                  retain_batches: Iterable, *, groups: Optional[Mapping[str, List[str]]] = None,
                  eps: float = 1e-12) -> Dict[str, float]:
    """Relative Fisher information per layer: `sum(grad^2 on forget) / sum(grad^2 on retain)`.

    `objective(model, batch)` returns the scalar whose gradients are measured, in the paper the
    mean image-text cosine similarity of the batch's pairs. A layer the forget set leans on and
    the retain set does not scores high. `eps` keeps layers unused by the retain set finite.
    Parameters must require grad; the model's grads are left cleared.
    """
    groups = groups or layer_groups(model)
    f = _squared_grads(model, objective, forget_batches, groups)
    r = _squared_grads(model, objective, retain_batches, groups)
    return {g: f[g] / (r[g] + eps) for g in groups}


def top_layers(scores: Mapping[str, float], k: int) -> List[str]:
    """The `k` highest-scoring layers, best first (ties: the earlier layer)."""
    if k <= 0:
        raise ValueError(f"k: expected a positive number of layers, got {k}")
    return sorted(scores, key=lambda name: -scores[name])[:k]  # stable sort: ties keep layer order


def trainable_only(model: nn.Module, layers: Sequence[str], groups: Optional[Mapping[str, List[str]]] = None) -> int:
    """Freeze every parameter outside `layers`; returns the number of trainable parameters."""
    groups = groups or layer_groups(model)
    unknown = [l for l in layers if l not in groups]
    if unknown:
        raise ValueError(f"layers: {unknown} are not layers of the model; layers: {list(groups)}")
    keep = {n for l in layers for n in groups[l]}
    count = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)
        count += p.numel() if name in keep else 0
    return count


class Ema:
    """Exponential moving average of a model's floating-point state: `avg = d * avg + (1 - d) * w`."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay: expected a value in [0, 1), got {decay}")
        self.decay = decay
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for k, v in model.state_dict().items():
            if k in self.state:
                self.state[k].mul_(self.decay).add_(v.detach(), alpha=1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        model.load_state_dict(self.state, strict=False)


def soup(original: Mapping[str, Tensor], unlearned: Mapping[str, Tensor], a: float) -> Dict[str, Tensor]:
    """`a * unlearned + (1 - a) * original` for floating tensors; others from `unlearned`."""
    if set(original) != set(unlearned):
        raise ValueError(f"state dicts differ in keys: {sorted(set(original) ^ set(unlearned))[:5]}")
    out = {}
    for k, u in unlearned.items():
        o = original[k]
        out[k] = (a * u.float() + (1.0 - a) * o.float()).to(u.dtype) if u.is_floating_point() else u.clone()
    return out


def search_soup(original: Mapping[str, Tensor], unlearned: Mapping[str, Tensor],
                evaluate: Callable[[Dict[str, Tensor]], Tuple[float, float]], *, tolerance: float,
                alphas: Sequence[float] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)) -> Tuple[float, dict]:
    """Choose the soup weight `a` on a calibration split.

    `evaluate(state_dict) -> (forget_acc, retain_acc)`. Among the `alphas` whose retain accuracy
    is at least the original's minus `tolerance`, the one with the lowest forget accuracy wins
    (ties: the larger `a`). When none qualifies the answer is `a = 0`, the original model.
    Returns `(a, {"original": (f, r), "tried": {a: (f, r)}})`.
    """
    if not tolerance >= 0:
        raise ValueError(f"tolerance: expected a non-negative number, got {tolerance}")
    base_forget, base_retain = evaluate(dict(original))
    tried = {}
    best: Optional[Tuple[float, float]] = None  # (forget_acc, -a)
    for a in alphas:
        if not 0.0 < a <= 1.0:
            raise ValueError(f"alphas: each must be in (0, 1], got {a}")
        f, r = evaluate(soup(original, unlearned, a))
        tried[a] = (f, r)
        if r >= base_retain - tolerance and (best is None or (f, -a) < best):
            best = (f, -a)
    chosen = 0.0 if best is None else -best[1]
    return chosen, {"original": (base_forget, base_retain), "tried": tried}
