"""Train a small CLIP from scratch on image-caption shards; save an open_clip checkpoint.

    python launch/pretrain.py --model tiny-clip --train-data shards/ --steps 1500 --output tiny.pt
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from cliperase.engine import ConfigError
from cliperase.engine.tools.pretrain import PretrainConfig, pretrain

_D = PretrainConfig()


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="pretrain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=_D.model, help="open_clip architecture name (random init)")
    p.add_argument("--train-data", required=True, help="image-caption shards (dir, brace pattern, file)")
    p.add_argument("--steps", type=int, default=_D.steps)
    p.add_argument("--batch-size", type=int, default=_D.batch_size)
    p.add_argument("--lr", type=float, default=_D.lr)
    p.add_argument("--seed", type=int, default=_D.seed)
    p.add_argument("--output", required=True, help="checkpoint file to write")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    cfg = PretrainConfig(model=a.model, train_data=a.train_data, steps=a.steps, batch_size=a.batch_size, lr=a.lr,
                         seed=a.seed, output=a.output)
    try:
        path = pretrain(cfg, progress=not a.no_progress)
    except ConfigError as exc:
        print(f"pretrain: error: {exc}", file=sys.stderr)
        return 2
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
