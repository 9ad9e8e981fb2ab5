"""Choose a forget set and a retain set from image-caption shards (img2dataset layout), streaming.

    python launch/select_data.py shards/ --keyword dog --keyword "golden retriever" -o sel/
    python launch/select_data.py 'cc12m/{00000..01242}.tar' --regex '\\bdogs?\\b' -o sel/ --retain-size 100000
    python launch/select_data.py shards/ --keys forget_keys.txt -o sel/ --keys-only
    python launch/select_data.py shards/ --concept "a photo of a dog" --top-k 5000 \\
        --model ViT-B-32 --pretrained laion2b_s34b_b79k -o sel/

Rules (exactly one):
  --keyword   a caption containing the keyword as whole words is forget: not preceded or followed
              by a letter, digit or underscore ("red" matches "red-brick", not "bored" or
              "reddish"); a phrase's words match across any whitespace. Repeat the flag or join
              keywords with commas; any of them matches.
  --regex     Python regular expression, re.search in the caption; repeatable, any matches.
              Keywords and regexes ignore case unless --case-sensitive.
  --keys      file of sample keys, one per line (blank lines ignored).
  --concept   prompt; forget samples whose teacher embedding (--embedding image|caption) has
              cosine >= --threshold with the prompt's text embedding, or the --top-k highest.

Output in --output-dir: forget/ and retain/ shards (files copied byte for byte, original keys)
or, with --keys-only, forget.txt and retain.txt; and manifest.json (rule, counts, skipped bad
data, sha256 of each key list). Input shards are only read.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from cliperase.engine.errors import ConfigError
from cliperase.engine.tools.select import SelectConfig, select

_DEFAULTS = SelectConfig()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="select", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("data", help="shards: a directory of .tar files, a brace pattern, one file; '::' joins several")
    a("-o", "--output-dir", required=True, help="where forget/, retain/ (or the key lists) and manifest.json go")
    r = p.add_argument_group("rule (exactly one)")
    r.add_argument("--keyword", action="append", default=[], help="whole-word keyword or phrase; repeatable, commas split")
    r.add_argument("--regex", action="append", default=[], help="Python regular expression searched in the caption; repeatable")
    r.add_argument("--case-sensitive", action="store_true", help="keywords and regexes match case exactly")
    r.add_argument("--keys", help="file of sample keys to forget, one per line")
    r.add_argument("--concept", help="concept prompt, e.g. 'a photo of a dog'")
    c = p.add_argument_group("concept selection")
    c.add_argument("--embedding", choices=("image", "caption"), default=_DEFAULTS.embedding,
                   help="compare the prompt with each sample's image or caption embedding (default image)")
    c.add_argument("--threshold", type=float, help="forget when cosine >= this")
    c.add_argument("--top-k", type=int, help="forget the k samples of highest cosine (ties: the one read first)")
    c.add_argument("--model", help="teacher open_clip architecture, e.g. ViT-B-32")
    c.add_argument("--pretrained", help="teacher's open_clip pretrained tag or a local checkpoint path")
    c.add_argument("--batch-size", type=int, default=_DEFAULTS.batch_size, help="samples per embedding batch")
    c.add_argument("--device", default=_DEFAULTS.device, help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    o = p.add_argument_group("output")
    o.add_argument("--keys-only", action="store_true", help="write forget.txt and retain.txt instead of shards")
    o.add_argument("--retain-size", type=int, help="retain = a random sample of N non-forget samples (default: all)")
    o.add_argument("--seed", type=int, default=_DEFAULTS.seed, help="seed of the retain sample")
    o.add_argument("--shard-size", type=int, default=_DEFAULTS.shard_size, help="samples per output shard")
    o.add_argument("--overwrite", action="store_true", help="replace a selection already in --output-dir")
    i = p.add_argument_group("reading")
    i.add_argument("--no-image-check", action="store_true",
                   help="trust the image bytes (default: decode each JPEG at 1/8 scale, skip what fails)")
    i.add_argument("--total", type=int, help="samples in the corpus, if known: the progress bar shows an ETA")
    i.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def config_from_args(args: argparse.Namespace) -> SelectConfig:
    keywords = tuple(w.strip() for item in args.keyword for w in item.split(",") if w.strip())
    return SelectConfig(
        data=args.data, keywords=keywords, regex=tuple(args.regex), case_sensitive=args.case_sensitive,
        keys_file=args.keys, concept=args.concept, embedding=args.embedding, threshold=args.threshold,
        top_k=args.top_k, model=args.model, pretrained=args.pretrained, batch_size=args.batch_size,
        device=args.device, output_dir=args.output_dir, keys_only=args.keys_only, retain_size=args.retain_size,
        seed=args.seed, shard_size=args.shard_size, overwrite=args.overwrite,
        check_images="none" if args.no_image_check else _DEFAULTS.check_images, total=args.total,
    )


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        manifest = select(config_from_args(args), progress=not args.no_progress)
    except ConfigError as exc:
        print(f"select: error: {exc}", file=sys.stderr)
        return 2
    skipped = {k: v for k, v in manifest["source"]["skipped"].items() if v}
    print(json.dumps({"forget": manifest["forget"]["count"], "retain": manifest["retain"]["count"],
                      "skipped": skipped, "manifest": str(Path(args.output_dir) / "manifest.json")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
