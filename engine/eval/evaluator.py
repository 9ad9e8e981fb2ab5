"""The evaluation of a model on a set, as report.json shows it, a run's evaluator (sets read once)
and its membership audit (pairs read once)."""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

from torch import nn

from ..data.eval_set import EvalSet, load_eval_set
from .embed import embed_eval_set
from .forget import load_pairs, membership_audit, pair_embeddings
from .metrics import split_metrics, zeroshot_breakdown
from .report import report_block
from .splits import Where, forget_mask

__all__ = ["Evaluator", "evaluate", "MembershipAudit", "split_audit_pairs", "AUDIT_PAIRS", "SHADOW_K"]

AUDIT_PAIRS = 1000  # members, non-members and shadow pairs each, at most
SHADOW_K = 16  # shadow neighbours per pair in the calibrated attack


def evaluate(model: nn.Module, tokenizer: Callable, ev: EvalSet, forget_classes: Sequence[str], *,
             attributes: Optional[Sequence[dict]] = None, forget_where: Where = None, breakdown: Optional[str] = None,
             batch_size: int = 256) -> dict:
    """report.json's metrics block of `model` on `ev` (see report_block).

    `forget_where` narrows the forget part to the forget-class images whose attributes match (a
    subgroup); `breakdown` adds `"zeroshot_by": {breakdown: zeroshot_breakdown(...)}` over the
    forget classes. Both read `attributes` (default: the set's own, one dict per image).
    Raises ValueError when they are needed and absent.
    """
    attributes = attributes if attributes is not None else ev.attributes
    if breakdown and attributes is None:
        raise ValueError("attributes: breakdown needs the images' attributes, and this evaluation set carries none")
    emb = embed_eval_set(model, tokenizer, ev, batch_size=batch_size)
    result = report_block(split_metrics(emb, ev, forget_mask(ev, forget_classes, forget_where, attributes)))
    if breakdown and emb.classifier is not None:
        result["zeroshot_by"] = {breakdown: zeroshot_breakdown(emb.image_emb, emb.classifier, ev.labels, attributes,
                                                               breakdown, ev.classnames, forget_classes)}
    return result


class Evaluator:
    """A run's before/after evaluation: each evaluation set read once (by root), every model scored
    by `evaluate` with the run's forget classes and subgroup."""

    def __init__(self, preprocess: Callable, tokenizer: Callable, forget_classes: Sequence[str], where: Where = None,
                 *, default_root: Optional[str] = None, batch_size: int = 256):
        self.preprocess, self.tokenizer = preprocess, tokenizer
        self.forget_classes, self.where = list(forget_classes), where or None
        self.default_root, self.batch_size = default_root, batch_size
        self._sets: Dict[str, EvalSet] = {}

    def eval_set(self, root: str) -> EvalSet:
        if root not in self._sets:
            self._sets[root] = load_eval_set(root, self.preprocess)
        return self._sets[root]

    def __call__(self, model: nn.Module, root: Optional[str] = None) -> dict:
        return evaluate(model, self.tokenizer, self.eval_set(root or self.default_root), self.forget_classes,
                        forget_where=self.where, batch_size=self.batch_size)


def split_audit_pairs(images, captions):
    """Never-seen pairs as (non-members, shadow pool or None): the first half (rounded up) and
    the rest, the pool left out when it holds no more than SHADOW_K pairs (no neighbourhood)."""
    half = (len(images) + 1) // 2
    shadow = (images[half:], captions[half:]) if len(images) - half > SHADOW_K else None
    return (images[:half], captions[:half]), shadow


class MembershipAudit:
    """report.json's "audit" block of a model: `membership_audit` of the run's forget pairs (the
    members, first AUDIT_PAIRS) against never-seen pairs of the same distribution (`audit_data`:
    its first half the non-members, the rest the calibrated attack's shadow pool, left out when
    it holds no more than SHADOW_K pairs). The pairs are read once."""

    def __init__(self, preprocess: Callable, tokenizer: Callable, forget_data: str, audit_data: str, *,
                 batch_size: int = 256):
        self.tokenizer, self.batch_size = tokenizer, batch_size
        self.members = load_pairs(forget_data, preprocess, limit=AUDIT_PAIRS, what="forget_data")
        self.nonmembers, self.shadow = split_audit_pairs(*load_pairs(audit_data, preprocess, limit=2 * AUDIT_PAIRS,
                                                                     what="audit_data"))

    def __call__(self, model: nn.Module) -> dict:
        embed = lambda pairs: pair_embeddings(model, self.tokenizer, *pairs, batch_size=self.batch_size)  # noqa: E731
        return membership_audit(embed(self.members), embed(self.nonmembers),
                                embed(self.shadow) if self.shadow is not None else None, k=SHADOW_K)
