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
    retrieval. A metric with no images to measure (a part without images, or without captions)
    is None, never NaN, and `"absent"` says which and why."""
    out: dict = {}
    absent: Dict[str, str] = {}
    zs = metrics.get("zeroshot_classification")
    if zs is not None:
        out["zeroshot"] = {f"{part}_acc": _value(zs[f"{part}_acc1"], f"zeroshot.{part}_acc", absent,
                                                 f"no images in the {part} part") for part in ("forget", "retain")}
    rt = metrics.get("zeroshot_retrieval")
    if rt is not None:
        why = "no images with captions in the {} part"
        out["retrieval"] = {part: {**{f"i2t_r{k}": _value(rt[f"{part}_text_retrieval_recall@{k}"],
                                                          f"retrieval.{part}.i2t_r{k}", absent, why.format(part))
                                      for k in RECALL_KS},
                                   **{f"t2i_r{k}": _value(rt[f"{part}_image_retrieval_recall@{k}"],
                                                          f"retrieval.{part}.t2i_r{k}", absent, why.format(part))
                                      for k in RECALL_KS}}
                            for part in ("forget", "retain")}
    if absent:
        out["absent"] = absent
    return out


def _value(v: float, name: str, absent: Dict[str, str], why: str) -> Optional[float]:
    if _nan(v):
        absent[name] = why
        return None
    return v


def strict_json(metrics: Dict[str, float]) -> Dict[str, Optional[float]]:
    """NaN (an empty split) as None, so the result is strict JSON."""
    return {k: (None if _nan(v) else v) for k, v in metrics.items()}


def _nan(v) -> bool:  # an empty split's metric
    return isinstance(v, float) and math.isnan(v)


def benchmark_record(*, dataset: str, model: str, pretrained: Optional[str], task: str, metrics: Dict[str, float],
                     forget_classes) -> dict:
    """One CLIP_benchmark result file's content, our forget/retain split beside its metrics.
    `dataset` and `pretrained` as CLIP_benchmark writes them (its --dataset, e.g. "wds/eval", and
    its --pretrained as given), so that its `build` lines up the two tools' rows."""
    return {"dataset": dataset, "model": model, "pretrained": pretrained, "task": task, "language": "en",
            "forget_classes": list(forget_classes), "metrics": strict_json(metrics)}
