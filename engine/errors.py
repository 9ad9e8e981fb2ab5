"""The exceptions a run ends with, importable without torch (the CLI refuses bad input before it
imports anything heavy)."""
from __future__ import annotations

import signal
from pathlib import Path
from typing import Iterable, Union

__all__ = ["ConfigError", "NonFiniteLoss", "Interrupted"]


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


class NonFiniteLoss(RuntimeError):
    """A loss term or a gradient became NaN or Inf; the message names the step and the term."""


class Interrupted(RuntimeError):
    """SIGTERM or SIGINT stopped the run after saving a checkpoint; `--resume` continues it."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint saved in "
                         f"{checkpoint}; run again with --resume to continue")
