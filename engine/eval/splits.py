"""Which evaluation images count as forgotten: by class (label or caption word), narrowed to a
subgroup by the images' attributes (`{key}.json`)."""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, List, Mapping, Optional, Sequence, Union

from ..data import EvalSet
from ..lazy import lazy_import

if TYPE_CHECKING:
    from torch import Tensor

torch = lazy_import("torch")  # the masks are tensors; parsing and counting (preflight) need none

__all__ = ["parse_attributes", "attribute_mask", "forget_mask", "forgotten", "Where"]

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


def _matches(attributes: dict, where: Mapping[str, Sequence[str]]) -> bool:
    """Every key of `where`, any of its values (compared as strings; a missing key does not match)."""
    return all(str(attributes.get(k)) in tuple(map(str, vs)) for k, vs in where.items())


def attribute_mask(attributes: Sequence[dict], where: Where) -> "Tensor":
    """(M,) bool: the images whose attributes match `where`: every key, any of its values
    (compared as strings; an image without the key does not match). Empty `where`: all True.
    Raises ValueError for a malformed `where` string."""
    where = parse_attributes(where) if isinstance(where, str) else dict(where or {})
    return torch.tensor([_matches(a, where) for a in attributes], dtype=torch.bool)


def forgotten(forget_classes: Sequence[str], where: Where = None, *, classnames: Sequence[str] = ()):
    """The forget part's rule as a predicate of one image, `(label, captions, attributes) -> bool`:
    its label names a forget class (a set with labels and class names), else one of its captions
    names one as a whole word (case-insensitive); and its attributes match `where`. The same rule
    as forget_mask, for counting a set's parts without tensors (preflight)."""
    where = parse_attributes(where) if isinstance(where, str) else dict(where or {})
    indices = {classnames.index(c) for c in forget_classes if c in classnames}
    pattern = re.compile(r"\b(" + "|".join(re.escape(c) for c in forget_classes) + r")\b", re.IGNORECASE)

    def rule(label: Optional[int], captions: Sequence[str], attributes: dict) -> bool:
        if not forget_classes:
            return False
        hit = label in indices if (label is not None and classnames) else any(pattern.search(c) for c in captions)
        return hit and (not where or _matches(attributes, where))
    return rule


def forget_mask(ev: EvalSet, forget_classes: Sequence[str], where: Where = None,
                attributes: Optional[Sequence[dict]] = None) -> "Tensor":
    """(M,) bool: which evaluation images belong to the forget part (the rule of `forgotten`).

    By label when the set has labels and class names; else by captions that name a forget class
    as a whole word (case-insensitive). `where` narrows it to the images whose attributes match
    (a subgroup; the rest of those classes then count as retained), read from `attributes` or
    the set's own. Raises ValueError when `where` is given and there are no attributes to read.
    """
    n = len(ev.images)
    attributes = attributes if attributes is not None else ev.attributes
    if where and attributes is None:
        raise ValueError("attributes: a subgroup (forget_attributes) needs the images' attributes, "
                         "and this evaluation set carries none")
    if attributes is not None and len(attributes) != n:
        raise ValueError(f"attributes: expected one per image ({n}), got {len(attributes)}")
    rule = forgotten(forget_classes, where, classnames=ev.classnames if ev.labels is not None else ())
    labels = ev.labels.tolist() if ev.labels is not None else [None] * n
    return torch.tensor([rule(label, caps, attrs) for label, caps, attrs in
                         zip(labels, ev.captions, attributes if attributes is not None else [{}] * n)], dtype=torch.bool)
