"""Where a run's time goes: named, timestamped phases the launcher records.

Boot-to-command under TCG is seconds, spread over the host (backend start,
QEMU start-up), the firmware and the kernel, init's work, and teardown.  The
launcher marks each phase as it sees it (:class:`PhaseTimer`, pure, no
clock of its own beyond ``time.monotonic``); ``make bench`` prints the
differences.  The guest's init reports its kernel's uptime with "hello", so
the kernel's own share is known without a console (``quiet`` hides the
banner, and printing it over the emulated UART would itself cost time).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

#: The phases, in the order a run passes them (a phase may be missing: a
#: guest that never says hello has no "init-hello").
QEMU_STARTED = "qemu-started"  # the process exists
QMP_READY = "qmp-connected"  # QEMU is up, paused (-S)
GUEST_RUNNING = "guest-running"  # `cont` sent: the firmware starts
INIT_HELLO = "init-hello"  # init is on the status port; detail = kernel uptime (s)
COMMAND_START = "command-start"
COMMAND_EXIT = "command-end"
TEARDOWN = "teardown-done"  # QEMU gone, sockets closed


@dataclass(frozen=True)
class PhaseMark:
    """One phase reached at monotonic time ``at``; ``detail`` carries what the guest said."""

    name: str
    at: float
    detail: str = ""


class PhaseTimer:
    """Collects :class:`PhaseMark` s in the order they happen (the first of each name wins)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._marks: list[PhaseMark] = []

    def mark(self, name: str, detail: str = "") -> None:
        if all(m.name != name for m in self._marks):
            self._marks.append(PhaseMark(name, self._clock(), detail))

    def marks(self) -> tuple[PhaseMark, ...]:
        return tuple(self._marks)


@dataclass(frozen=True)
class Step:
    """The time from the previous phase (or the start) to this one."""

    name: str
    seconds: float


def steps(marks: Sequence[PhaseMark], start: float) -> list[Step]:
    """Durations between consecutive marks from ``start``; splits "init-hello" in two.

    With the kernel's uptime at hello, the wait before it is split into
    "firmware and loader" (before the kernel's clock started) and "kernel
    to init" (the kernel's own time).
    """
    out: list[Step] = []
    previous = start
    for mark in sorted(marks, key=lambda m: m.at):
        uptime = _seconds(mark.detail) if mark.name == INIT_HELLO else None
        if uptime is not None and 0 <= uptime <= mark.at - previous:
            out.append(Step("firmware and loader", mark.at - uptime - previous))
            out.append(Step("kernel to init (kernel clock)", uptime))
        else:
            out.append(Step(mark.name, mark.at - previous))
        previous = mark.at
    return out


def _seconds(text: str) -> float | None:
    try:
        return float(text.split()[0])
    except (ValueError, IndexError):
        return None
