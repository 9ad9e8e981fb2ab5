"""Shard specs as users give them: a directory of `.tar` files, a brace pattern
(`shards/{00000..00099}.tar`), one file, or several specs joined with `::`."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from braceexpand import braceexpand

from ..errors import ConfigError

__all__ = ["DATA_SPLITS", "expand_shards", "shard_problems", "resolve_shards"]

DATA_SPLITS = ("auto", "sample", "shard")  # how a training stream divides data between readers (streams.py)


def expand_shards(spec: str) -> List[str]:
    """The shard paths a spec names (without checking that they exist), in order."""
    out: List[str] = []
    for part in str(spec).split("::"):
        p = Path(part)
        if p.is_dir():
            out.extend(sorted(str(x) for x in p.glob("*.tar")))
        else:
            out.extend(braceexpand(part))  # webdataset's own brace patterns (it depends on braceexpand)
    return out


def shard_problems(spec: Optional[str], what: str) -> List[str]:
    """Problems with a shard spec, without reading the shards."""
    if not spec:
        return [f"{what}: no shards given"]
    urls = expand_shards(spec)
    if not urls:
        return [f"{what}: {spec!r} matches no .tar shards"]
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        return [f"{what}: {len(missing)} of {len(urls)} shards do not exist: {shown}"]
    return []


def resolve_shards(spec: str, what: str) -> List[str]:
    """The shard paths of a spec; raises ConfigError naming `what` when it has problems."""
    problems = shard_problems(spec, what)
    if problems:
        raise ConfigError(problems)
    return expand_shards(spec)
