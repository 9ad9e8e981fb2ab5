"""Stopping a run cleanly: the first SIGTERM / SIGINT asks the loop to save a checkpoint and stop at
the end of its step (`Interrupted`), a second one stops at once."""
from __future__ import annotations

import logging
import signal
import threading
from typing import Optional

import torch

from .errors import Interrupted

__all__ = ["Interrupted", "StopSignals"]

log = logging.getLogger("cliperase")


class StopSignals:
    """Turns the first SIGTERM / SIGINT into a request (`received`) that the loop answers by
    saving a checkpoint and stopping at the end of the step; a second one stops at once
    (KeyboardInterrupt). Handlers can only be installed from the main thread; elsewhere (a
    frontend's worker thread) signals keep their old behaviour."""

    def __init__(self):
        self.received: Optional[int] = None
        self._old = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum
        log.warning("%s received: saving a checkpoint at the end of this step, then stopping "
                    "(send it again to stop at once)", signal.Signals(signum).name)

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    def agreed(self, distributed: bool, device: torch.device) -> Optional[int]:
        """The signal received, agreed by all ranks (collective when `distributed`)."""
        if not distributed:
            return self.received
        flag = torch.tensor([self.received or 0], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item()) or None
