"""Data in the layouts users have.

- Training pairs: img2dataset webdataset shards (`{key}.jpg|png|webp`, `{key}.txt`, `{key}.json`),
  named by a spec (shards.py), streamed in batches (streams.py).
- Evaluation sets: CLIP_benchmark's webdataset layout (eval_set.py).
- Every shard is read by the one tar reader, `ShardReader` (tar.py); open_clip's preprocessing
  and tokenizer, split and sped up for the loader, are in preprocess.py.
"""
from .eval_set import EvalSet, eval_set_problems, load_eval_set
from .shards import expand_shards, resolve_shards, shard_problems
from .streams import DATA_SPLITS, Batches, PairStream, loader, split_preprocess
from .tar import SKIP_KINDS, ShardReader, decode_image, sample_image

__all__ = ["EvalSet", "eval_set_problems", "load_eval_set", "expand_shards", "resolve_shards", "shard_problems",
           "DATA_SPLITS", "Batches", "PairStream", "loader", "split_preprocess", "SKIP_KINDS", "ShardReader",
           "decode_image", "sample_image"]
