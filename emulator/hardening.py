"""Keep key material out of core dumps and out of other processes' reach.

The commands that hold keys (``serve``, ``key``, ``xts``) call
:func:`harden_process` first thing: a core of ``serve`` would hold every
programmed key, and a dumpable process can be read through ptrace or
/proc/PID/mem by any process of the same user.

Why ctypes and not a library: the only call needed is ``prctl(2)``, one line
of libc; the ``prctl``/``python-prctl`` packages wrap all of it and are not
well kept.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import resource

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def harden_process() -> None:
    """Set RLIMIT_CORE to 0 (soft and hard) and PR_SET_DUMPABLE off for this process.

    Both are inherited by children.  Never raises: a platform without prctl
    (not Linux) still gets the core limit.  Blocks on nothing.
    """
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    with contextlib.suppress(OSError, AttributeError):  # no libc prctl: nothing more to do
        _libc().prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)


def is_dumpable() -> bool:
    """PR_GET_DUMPABLE for this process (what the tests check)."""
    return bool(_libc().prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))
