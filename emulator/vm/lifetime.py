"""Nothing outlives a run: a watchdog process that cleans up if we die uncleanly.

A ``finally`` cannot run when the launcher is SIGKILLed (or the OOM killer
picks it), yet QEMU, the backends, the /dev/shm views (up to GiBs of memory)
and the run directory must not stay behind.  So the first time something is
guarded, we start one small watchdog process (stdlib only, in a session of
its own so a terminal's SIGINT/SIGHUP do not reach it) and tell it, over a
pipe, what to clean up: processes to stop and paths to remove.  The normal
path releases each guard after cleaning up itself; when the pipe reaches EOF
(we exited, however) the watchdog stops what is still guarded (SIGTERM, a
grace period, then SIGKILL) and removes what is still listed.

QEMU also gets PR_SET_PDEATHSIG (:func:`die_with_parent`), so it stops at
once, before the watchdog even wakes.

No library does this: systemd scopes need systemd, and process groups alone
neither survive our SIGKILL nor remove files.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

_PR_SET_PDEATHSIG = 1
_prctl: Callable[..., int] | None
try:  # looked up now: after fork, in preexec_fn, only the call itself is safe
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux: the watchdog alone stops QEMU
    _prctl = None


def die_with_parent() -> None:
    """preexec_fn: SIGTERM this child when the thread that started it dies."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


class Watchdog:
    """The host side: guard and release processes and paths (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def _send(self, message: dict[str, object]) -> None:
        line = (json.dumps(message) + "\n").encode()
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._proc = subprocess.Popen(
                    [sys.executable, "-m", "mktme_emu.vm.lifetime"], stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    start_new_session=True)
            assert self._proc.stdin is not None
            with contextlib.suppress(BrokenPipeError):
                self._proc.stdin.write(line)
                self._proc.stdin.flush()

    def guard_pid(self, pid: int, grace: float) -> None:
        """Stop ``pid`` (SIGTERM, ``grace`` seconds, SIGKILL) if we die first."""
        self._send({"op": "pid", "pid": pid, "grace": grace})

    def release_pid(self, pid: int) -> None:
        self._send({"op": "forget-pid", "pid": pid})

    def guard_path(self, path: Path) -> None:
        """Remove ``path`` (a file or a whole directory) if we die first."""
        self._send({"op": "path", "path": str(path)})

    def release_path(self, path: Path) -> None:
        self._send({"op": "forget-path", "path": str(path)})


#: The one watchdog of this process.
WATCHDOG = Watchdog()


# -- the watchdog process -------------------------------------------------------
def _start_time(pid: int) -> str | None:
    """The process's start time (/proc/PID/stat field 22): tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, started: str | None) -> bool:
    return started is not None and _start_time(pid) == started


def _stop(pids: dict[int, tuple[float, str | None]]) -> None:
    """SIGTERM every guarded process, wait its grace, SIGKILL what is left."""
    for pid, (_, started) in pids.items():
        if _alive(pid, started):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
    begin = time.monotonic()
    for pid, (grace, started) in pids.items():
        while _alive(pid, started) and time.monotonic() - begin < grace:
            time.sleep(0.05)
        if _alive(pid, started):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def main() -> None:
    """Read guards until EOF, then clean up whatever is still guarded."""
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    pids: dict[int, tuple[float, str | None]] = {}
    paths: dict[str, None] = {}  # ordered: removed in the order they were guarded
    for raw in sys.stdin.buffer:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            msg = json.loads(raw)
            op = msg["op"]
            if op == "pid":
                pids[int(msg["pid"])] = (float(msg["grace"]), _start_time(int(msg["pid"])))
            elif op == "forget-pid":
                pids.pop(int(msg["pid"]), None)
            elif op == "path":
                paths[str(msg["path"])] = None
            elif op == "forget-path":
                paths.pop(str(msg["path"]), None)
    _stop(pids)
    for path in paths:
        _remove(Path(path))


if __name__ == "__main__":
    main()
