"""Data in the layouts users have.

- Training pairs: img2dataset webdataset shards (`{key}.jpg|png|webp`, `{key}.txt`, `{key}.json`),
  named by a spec (shards.py), streamed in batches (streams.py).
- Evaluation sets: CLIP_benchmark's webdataset layout (eval_set.py).
- Every shard is read by the one tar reader, `ShardReader` (tar.py); open_clip's preprocessing
  and tokenizer, split and sped up for the loader, are in preprocess.py.

Names load their modules on first use: the checks (shards, tar, eval_set's problems) need no torch.
"""
from ..lazy import lazy_exports

__all__ = ["EvalSet", "eval_set_problems", "load_eval_set", "expand_shards", "resolve_shards", "shard_problems",
           "DATA_SPLITS", "Batches", "PairStream", "loader", "split_preprocess", "SKIP_KINDS", "ShardReader",
           "decode_image", "sample_image"]

_EXPORTS = {"EvalSet": "eval_set", "eval_set_problems": "eval_set", "load_eval_set": "eval_set",
            "expand_shards": "shards", "resolve_shards": "shards", "shard_problems": "shards",
            "DATA_SPLITS": "shards", "Batches": "streams", "PairStream": "streams", "loader": "streams",
            "split_preprocess": "streams", "SKIP_KINDS": "tar", "ShardReader": "tar", "decode_image": "tar",
            "sample_image": "tar"}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
