"""Which evaluation images count as forgotten: by class (label or caption word), narrowed to a
subgroup by the images' attributes (`{key}.json`)."""
from __future__ import annotations

import re
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from ..data import EvalSet

__all__ = ["parse_attributes", "attribute_mask", "forget_mask", "Where"]

Where = Union[str, Mapping[str, Sequence[str]], None]  # "colour=red;background=white|black" or its parsed dict


def parse_attributes(spec: str) -> dict:
    """`"colour=red|blue;background=white"` -> {"colour": ("red", "blue"), "background": ("white",)};
    "" -> {}. Raises ValueError naming the malformed part."""
    if not isinstance(spec, str):
        raise ValueError(f"expected a string like 'colour=red', got {spec!r}")
    out: dict = {}
    for part in (x.strip() for x in spec.split(";")):
        if not part:
            continue
        key, sep, values = part.partition("=")
        vals = tuple(v.strip() for v in values.split("|") if v.strip())
        if not sep or not key.strip() or not vals:
            raise ValueError(f"expected KEY=VALUE[|VALUE...] parts joined by ';', got {part!r}")
        if key.strip() in out:
            raise ValueError(f"attribute {key.strip()!r} given twice (join its values with '|')")
        out[key.strip()] = vals
    return out


def attribute_mask(attributes: Sequence[dict], where: Where) -> Tensor:
    """(M,) bool: the images whose attributes match `where`: every key, any of its values
    (compared as strings; an image without the key does not match). Empty `where`: all True.
    Raises ValueError for a malformed `where` string."""
    where = parse_attributes(where) if isinstance(where, str) else dict(where or {})
    return torch.tensor([all(str(a.get(k)) in tuple(map(str, vs)) for k, vs in where.items()) for a in attributes],
                        dtype=torch.bool)


def forget_mask(ev: EvalSet, forget_classes: Sequence[str], where: Where = None,
                attributes: Optional[Sequence[dict]] = None) -> Tensor:
    """(M,) bool: which evaluation images belong to the forget part.

    By label when the set has labels; else by captions that name a forget class as a whole
    word (case-insensitive). `where` narrows it to the images whose attributes match (a
    subgroup; the rest of those classes then count as retained), read from `attributes` or the
    set's own. Raises ValueError when `where` is given and there are no attributes to read.
    """
    if not forget_classes:
        return torch.zeros(len(ev.images), dtype=torch.bool)
    if ev.labels is not None and ev.classnames:
        idx = [ev.classnames.index(c) for c in forget_classes]
        mask = torch.isin(ev.labels, torch.tensor(idx, dtype=ev.labels.dtype))
    else:
        pattern = re.compile(r"\b(" + "|".join(re.escape(c) for c in forget_classes) + r")\b", re.IGNORECASE)
        mask = torch.tensor([any(pattern.search(c) for c in caps) for caps in ev.captions], dtype=torch.bool)
    if where:
        attributes = attributes if attributes is not None else ev.attributes
        if attributes is None:
            raise ValueError("attributes: a subgroup (forget_attributes) needs the images' attributes, "
                             "and this evaluation set carries none")
        if len(attributes) != len(ev.images):
            raise ValueError(f"attributes: expected one per image ({len(ev.images)}), got {len(attributes)}")
        mask &= attribute_mask(attributes, where)
    return mask
