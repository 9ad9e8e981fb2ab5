"""Evaluation, one stack for every consumer: an embedding pass (embed.py), the images' split into
forget and retain (splits.py), pure metric functions per split (metrics.py), and views of the
result for report.json and CLIP_benchmark records (report.py).

    emb = embed_eval_set(model, tokenizer, ev)
    metrics = split_metrics(emb, ev, forget_mask(ev, ["dog"]))     # {task: {"acc1", "forget_acc1", ...}}
    report_block(metrics)                                          # report.json's before/after shape
"""
from ..lazy import lazy_exports

__all__ = ["Evaluator", "evaluate", "EvalEmbeddings", "embed_eval_set", "zeroshot_classifier", "TASKS",
           "split_metrics", "zeroshot_breakdown", "report_block", "strict_json", "benchmark_record", "forget_mask",
           "attribute_mask", "parse_attributes", "MembershipAudit"]

_EXPORTS = {"Evaluator": "evaluator", "evaluate": "evaluator", "EvalEmbeddings": "embed", "embed_eval_set": "embed",
            "zeroshot_classifier": "embed", "TASKS": "metrics", "split_metrics": "metrics",
            "zeroshot_breakdown": "metrics", "report_block": "report", "strict_json": "report",
            "benchmark_record": "report", "forget_mask": "splits", "attribute_mask": "splits",
            "parse_attributes": "splits", "MembershipAudit": "evaluator"}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
