"""The guest's serial console as the host shows it: filtered, scanned for a panic.

Pure (bytes in, bytes out), so the filter and the panic scanner are tested
without QEMU.  The launcher feeds every chunk it reads from the console
socket and writes what :meth:`ConsoleFilter.feed` returns to stdout.
"""

from __future__ import annotations

import re
from collections import deque

#: What the kernel prints when it panics (KERN_EMERG, so `quiet` cannot hide it).
PANIC_MARK = b"Kernel panic - not syncing"
#: The kernel's last words at poweroff: noise at the end of every run.
_POWER_DOWN = re.compile(rb"\[ *\d+\.\d+\] reboot: Power down\n")
#: A partial line that may be a kernel message is held this long for its newline.
_HOLD_LIMIT = 256
_TAIL_CHUNKS = 64


class ConsoleFilter:
    """Strip the tty's \\r and the poweroff message; notice a panic; keep a tail.

    A partial line that may be a kernel message ("[  time] ...") is held until
    its newline, so the poweroff message can be dropped whole.  The panic mark
    is found even when it straddles two chunks.
    """

    def __init__(self, capture: bool = False) -> None:
        self.panicked = False
        self._tail: deque[bytes] = deque(maxlen=_TAIL_CHUNKS)
        self._captured: list[bytes] | None = [] if capture else None
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        """Record ``chunk``; return the bytes to show now."""
        previous = self._tail[-1] if self._tail else b""
        self._tail.append(chunk)
        if self._captured is not None:
            self._captured.append(chunk)
        if PANIC_MARK in previous[-len(PANIC_MARK):] + chunk:
            self.panicked = True
        data = (self._pending + chunk).replace(b"\r\n", b"\n")
        cut = data.rfind(b"\n") + 1
        hold = data[cut:].startswith(b"[") and len(data) - cut < _HOLD_LIMIT
        data, self._pending = (data[:cut], data[cut:]) if hold else (data, b"")
        return _POWER_DOWN.sub(b"", data)

    def flush(self) -> bytes:
        """What is still held back, at the end of the console stream."""
        rest, self._pending = self._pending, b""
        return rest

    def tail(self) -> str:
        """The last few KiB of raw console output, for a failure report."""
        return b"".join(self._tail).decode(errors="replace")

    def captured(self) -> str:
        """The whole raw output, when capture was asked for ("" otherwise)."""
        return b"".join(self._captured or []).decode(errors="replace")
