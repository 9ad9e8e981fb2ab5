"""The one exception type users see for bad input."""
from __future__ import annotations

from typing import Iterable, Union

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """Bad user input; `problems` lists every problem found, each naming what was wrong."""

    def __init__(self, problems: Union[str, Iterable[str]]):
        # A plain string is one problem (DataLoader re-raises a worker's error from its message).
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            msg = self.problems[0]
        else:
            msg = f"{len(self.problems)} problems:\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(msg)
