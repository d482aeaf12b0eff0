"""``serve --daemon``: return to the shell once the backend listens, printing its pid.

Why our own ten lines and not python-daemon: we need exactly one thing more
than a fork, that the parent waits until the sockets exist, so that the next
command of a pasted script finds them; the child keeps the terminal's stderr
until then, so a refused start still shows its one-line error and status.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


class Detached:
    """The daemon's side: tell the waiting parent we are ready, then leave its terminal."""

    def __init__(self, ready_fd: int, log_path: Path) -> None:
        self._ready_fd = ready_fd
        self._log_path = log_path

    def ready(self) -> None:
        """Report the pid to the parent and send stdout/stderr to the log file (0600)."""
        sys.stdout.flush()
        sys.stderr.flush()
        log_fd = os.open(self._log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        os.write(self._ready_fd, str(os.getpid()).encode())
        os.close(self._ready_fd)


def detach(log_path: Path) -> Detached | int:
    """Fork.  In the child: a new session, stdin from /dev/null, a :class:`Detached`.

    In the parent: wait until the child is ready (print its pid, return 0)
    or has died (return its exit status; its error went to our stderr).
    Must be called before any thread starts.
    """
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        return Detached(write_fd, log_path)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as ready:
        said = ready.read()
    if said:
        print(said.decode())
        return 0
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return code if code > 0 else 1
