"""Views of `split_metrics`' result: report.json's before/after block and CLIP_benchmark records.

The metrics are computed once (engine/eval/metrics.py); these functions only pick and rename.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

from .metrics import RECALL_KS

__all__ = ["report_block", "strict_json", "benchmark_record"]


def report_block(metrics: Dict[str, Dict[str, float]]) -> dict:
    """report.json's shape: `{"zeroshot": {"forget_acc", "retain_acc"}, "retrieval": {"forget": R,
    "retain": R}}` with `R = {"i2t_r1", ..., "t2i_r10"}`, each part present when its task is.

    i2t is CLIP_benchmark's text retrieval (an image retrieves its captions), t2i its image
    retrieval."""
    out: dict = {}
    zs = metrics.get("zeroshot_classification")
    if zs is not None:
        out["zeroshot"] = {"forget_acc": zs["forget_acc1"], "retain_acc": zs["retain_acc1"]}
    rt = metrics.get("zeroshot_retrieval")
    if rt is not None:
        out["retrieval"] = {part: {**{f"i2t_r{k}": rt[f"{part}_text_retrieval_recall@{k}"] for k in RECALL_KS},
                                   **{f"t2i_r{k}": rt[f"{part}_image_retrieval_recall@{k}"] for k in RECALL_KS}}
                            for part in ("forget", "retain")}
    return out


def strict_json(metrics: Dict[str, float]) -> Dict[str, Optional[float]]:
    """NaN (an empty split) as None, so the result is strict JSON."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}


def benchmark_record(*, dataset: str, model: str, pretrained: Optional[str], task: str, metrics: Dict[str, float],
                     forget_classes) -> dict:
    """One CLIP_benchmark result file's content, our forget/retain split beside its metrics."""
    return {"dataset": dataset, "model": model, "pretrained": pretrained, "task": task, "language": "en",
            "forget_classes": list(forget_classes), "metrics": strict_json(metrics)}
