"""Progress bars for long work: tqdm on a terminal; rate-limited lines when the output is a file.

A log file or a CI console collects every update of a plain tqdm bar; there a bar writes at most
one line per `NON_TTY_INTERVAL_S` seconds (and its last state when it closes), so a 200-step run's
log holds a handful of progress lines, not hundreds.
"""
from __future__ import annotations

import sys
from typing import Iterable, Optional

from tqdm.auto import tqdm

__all__ = ["progress_bar", "NON_TTY_INTERVAL_S"]

NON_TTY_INTERVAL_S = 30.0


class _Bar(tqdm):
    """Off a terminal, a new postfix waits for the bar's next scheduled line. tqdm's
    `set_postfix` writes at once by default, which bypassed the rate limit: a line per logged
    step, each with a stale count (an iterating bar updates its count only when it writes)."""

    tty = True

    def set_postfix(self, ordered_dict=None, refresh=None, **kwargs):
        super().set_postfix(ordered_dict, refresh=self.tty if refresh is None else refresh, **kwargs)


def progress_bar(iterable: Optional[Iterable] = None, *, desc: str = "", total: Optional[int] = None,
                 enabled: bool = True, unit: str = "it", initial: int = 0, file=None) -> tqdm:
    """A tqdm bar over `iterable` (or a manual one of `total`), off when not `enabled`.

    On a terminal it redraws as usual; elsewhere (`file`, default stderr, is not a tty) it
    prints at most one line per NON_TTY_INTERVAL_S, without the terminal's dynamic width.
    """
    stream = file if file is not None else sys.stderr
    tty = bool(getattr(stream, "isatty", lambda: False)())
    # miniters=1 with mininterval: tqdm then checks the clock every update and writes once per interval.
    limits = {"dynamic_ncols": True} if tty else {"mininterval": NON_TTY_INTERVAL_S, "maxinterval": NON_TTY_INTERVAL_S,
                                                  "miniters": 1, "ncols": 100}
    bar = _Bar(iterable, desc=desc, total=total, disable=not enabled, unit=unit, initial=initial, file=stream,
               **limits)
    bar.tty = tty
    return bar
