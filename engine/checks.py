"""Value checks shared by every config's validation: each returns the problem (naming the field,
what was expected and what came) or None. Pure functions of the value; no engine imports."""
from __future__ import annotations

import difflib
import math
from typing import Any, Iterable, List, Optional, Sequence

__all__ = ["finite", "positive_int", "nonneg_int", "positive_number", "nonneg_number", "in_range", "one_of",
           "boolean", "collect", "closest", "did_you_mean"]


def finite(v: Any) -> bool:
    """A real number (bool excluded), not NaN or infinite."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def positive_int(name: str, v: Any) -> Optional[str]:
    return None if _int(v) and v > 0 else f"{name}: expected a positive integer, got {v!r}"


def nonneg_int(name: str, v: Any) -> Optional[str]:
    return None if _int(v) and v >= 0 else f"{name}: expected a non-negative integer, got {v!r}"


def positive_number(name: str, v: Any) -> Optional[str]:
    return None if finite(v) and v > 0 else f"{name}: expected a positive number, got {v!r}"


def nonneg_number(name: str, v: Any) -> Optional[str]:
    return None if finite(v) and v >= 0 else f"{name}: expected a non-negative number, got {v!r}"


def in_range(name: str, v: Any, lo: float, hi: float, *, hi_open: bool = False) -> Optional[str]:
    ok = finite(v) and lo <= v and (v < hi if hi_open else v <= hi)
    return None if ok else f"{name}: expected a number in [{lo}, {hi}{')' if hi_open else ']'}, got {v!r}"


def one_of(name: str, v: Any, choices: Sequence[Any]) -> Optional[str]:
    return None if v in choices else f"{name}: expected one of {list(choices)}, got {v!r}"


def boolean(name: str, v: Any) -> Optional[str]:
    # "false" from --set would be truthy: only real booleans pass.
    return None if isinstance(v, bool) else f"{name}: expected true or false, got {v!r}"


def collect(*found: Optional[str] | Iterable[str]) -> List[str]:
    """The problems among `found` (None entries dropped, lists flattened), in order."""
    out: List[str] = []
    for item in found:
        if item is None:
            continue
        out.extend([item] if isinstance(item, str) else item)
    return out


def closest(word: str, choices: Sequence[str]) -> Optional[str]:
    """The choice `word` most likely meant (difflib's nearest), or None when none is near."""
    return next(iter(difflib.get_close_matches(word, choices, n=1)), None)


def did_you_mean(word: str, choices: Sequence[str]) -> str:
    """"; did you mean 'x'?" to append to a message, or "" when no choice is near."""
    near = closest(word, choices)
    return f"; did you mean {near!r}?" if near else ""
