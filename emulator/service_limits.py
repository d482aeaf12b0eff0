"""What keeps the backend standing under a flood: descriptor budget, rate-limited logs, socket claims.

Kept apart from :mod:`.service` (which frames and routes requests) because
none of it is about the protocol: it is about a process that must keep its
admin socket and state files usable while someone opens a thousand
connections, and must not write megabytes of identical log lines meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import StateError

# Descriptors never handed to clients: state files, the view, journal, the
# admin socket's own accept, a GET_VIEW_FD duplicate, logging, the executor.
FD_RESERVE = 64


def connection_limit(wanted: int, roles: int, reserve: int = FD_RESERVE) -> int:
    """Connections allowed per role so that ``reserve`` descriptors always stay free.

    Raises the soft RLIMIT_NOFILE toward the hard one when that is what it
    takes; otherwise lowers the per-role limit to what the soft limit allows.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = wanted * roles + reserve
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, (soft - reserve) // roles))


@dataclass
class RateLimiter:
    """At most ``burst`` messages per ``period`` seconds per key; counts the rest.

    ``clock`` is a parameter so tests can run time by hand.
    """

    burst: int = 5
    period: float = 60.0
    clock: Callable[[], float] = time.monotonic
    _windows: dict[str, tuple[float, int, int]] = field(default_factory=dict)

    def allow(self, key: str) -> tuple[bool, int]:
        """(whether to log now, how many were suppressed since the last logged one)."""
        now = self.clock()
        start, sent, suppressed = self._windows.get(key, (now, 0, 0))
        if now - start >= self.period:
            start, sent = now, 0
        if sent < self.burst:
            self._windows[key] = (start, sent + 1, 0)
            return True, suppressed
        self._windows[key] = (start, sent, suppressed + 1)
        return False, 0

    def log(self, logger: logging.Logger, level: int, key: str, message: str, *args: object) -> None:
        """``logger.log(level, message, *args)`` unless ``key`` is over its rate."""
        allowed, suppressed = self.allow(key)
        if allowed:
            tail = f" ({suppressed} similar messages suppressed)" if suppressed else ""
            logger.log(level, message + tail, *args)


@dataclass(frozen=True)
class ClaimedSocket:
    """A socket path this backend bound, and the inode it bound there."""

    path: Path
    device: int
    inode: int

    @classmethod
    def of(cls, path: Path) -> ClaimedSocket:
        st = os.lstat(path)
        return cls(path, st.st_dev, st.st_ino)

    def release(self) -> None:
        """Unlink the path only if it is still the socket this backend created."""
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == (self.device, self.inode):
                self.path.unlink()


def clear_stale_socket(path: Path) -> None:
    """Make way for binding ``path``: remove a dead backend's socket, refuse a live one's.

    Raises StateError when the path is not a socket, or when a backend
    still answers on it (its socket is never unlinked under it).
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StateError(f"{path} exists and is not a socket; not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # nobody listens: a crashed backend's leftover
        return
    except OSError as exc:
        raise StateError(f"cannot tell whether {path} is in use: {exc.strerror or exc}") from exc
    finally:
        probe.close()
    raise StateError(f"another backend is serving on {path}; stop it first")
