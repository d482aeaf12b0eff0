"""What a long operation is doing: a log line with percent and MB/s, and a busy string.

Filling or writing back a view of several GiB takes seconds; nothing may
wait silently.  An :class:`Activity` is updated by the transfer loops; it
logs at most once a second, and only once the phase has run for a second,
so short requests stay quiet.  :attr:`Activity.busy` is a plain string,
readable from another thread without the controller's lock (a reference
assignment is atomic in Python).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

MiB = 1024 * 1024


class Activity:
    """The phase in progress (``fill``, ``write-back``) and how far it got."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 interval: float = 1.0) -> None:
        self._clock = clock
        self._interval = interval
        self.busy = ""  # "" when idle, else e.g. "fill 45% of 4096 MiB, 812 MB/s"
        self._phase = ""
        self._total = 0
        self._done = 0
        self._began = 0.0
        self._logged = 0.0

    def begin(self, phase: str, total_bytes: int) -> None:
        self._phase, self._total, self._done = phase, total_bytes, 0
        self._began = self._logged = self._clock()
        self.busy = f"{phase} 0% of {total_bytes // MiB} MiB"

    def advance(self, nbytes: int) -> None:
        """``nbytes`` more are done; logs when a second passed since the last line."""
        self._done += nbytes
        now = self._clock()
        elapsed = max(now - self._began, 1e-9)
        percent = 100 * self._done // max(self._total, 1)
        self.busy = (f"{self._phase} {percent}% of {self._total // MiB} MiB, "
                     f"{self._done / elapsed / 1e6:.0f} MB/s")
        if now - self._logged >= self._interval:
            self._logged = now
            log.info("%s", self.busy)

    def end(self) -> None:
        elapsed = self._clock() - self._began
        if elapsed >= self._interval:
            log.info("%s done: %d MiB in %.1f s (%.0f MB/s)", self._phase, self._total // MiB,
                     elapsed, self._total / max(elapsed, 1e-9) / 1e6)
        self.busy = ""
