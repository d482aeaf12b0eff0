"""Exclusive ownership of a state directory and a view for a backend's lifetime.

Two backends on one state directory (or one view) would write back over each
other's flushed data.  Each takes an ``flock`` (LOCK_EX | LOCK_NB) before it
touches anything; the kernel drops it when the process dies, so a crashed
backend never leaves a stale lock.  The lock file also holds the owner's pid,
for the one-line refusal a second backend prints.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from ..errors import StateError

LOCK_FILE = "lock"


def lock_holder(fd: int) -> int | None:
    """The pid holding an flock on the file open at ``fd``, from /proc/locks (None if unknown)."""
    info = os.fstat(fd)
    wanted = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    with contextlib.suppress(OSError):
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == wanted:
                return int(fields[4])
    return None


def try_flock(fd: int, what: str) -> None:
    """Take an exclusive flock on ``fd`` now, or raise StateError naming the holder."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = lock_holder(fd)
        who = f"pid {holder}" if holder is not None else "another process"
        raise StateError(f"{what} is in use by another backend ({who}); "
                         "stop it first, or use another state directory") from None


class StateLock:
    """The lock on a state directory: ``STATE_DIR/lock`` flocked, holding our pid."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_FILE
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try_flock(self._fd, f"state directory {state_dir}")
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(self._fd)
            raise

    def release(self) -> None:
        """Drop the lock (closing the descriptor releases the flock)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
