"""Bytecode for the guest: compile the project's packages on the host before a boot.

The guest sees the host's root read-only over 9p and runs the project from
there, so it can never write a ``__pycache__`` of its own: without one every
``mktme-guest`` call compiles every module it imports from source, which
under TCG is a quarter of a second of each call.  A pip install carries its
bytecode, but an editable install (``make setup``) on a host that exports
PYTHONDONTWRITEBYTECODE=1, as CI and many developers do, has none.

So the launcher compiles both packages before it boots.  ``py_compile``
writes even under PYTHONDONTWRITEBYTECODE, and files whose bytecode is up
to date are skipped after one ``stat`` and a 12-byte read: a few
milliseconds per boot.  A read-only install is left as it is (silently:
its bytecode, if any, came with it).  ``--dry-run`` does not call this: it
promises no side effect at all, and a cache written into the install is one.
"""

from __future__ import annotations

import compileall
import os
import py_compile
from collections.abc import Iterable
from pathlib import Path


def guest_package_dirs() -> tuple[Path, ...]:
    """The installed ``mktme_emu`` and ``mktme_guest`` packages (what the guest imports)."""
    import mktme_emu
    import mktme_guest

    return tuple(Path(pkg.__file__).resolve().parent for pkg in (mktme_emu, mktme_guest)
                 if pkg.__file__ is not None)


def compile_packages(dirs: Iterable[Path]) -> bool:
    """Write missing or stale ``__pycache__`` bytecode under each directory.

    Timestamp-checked pycs at optimisation level 0, which is what the guest's
    ``python3`` and ``mktme-guest`` look for, whatever SOURCE_DATE_EPOCH or
    ``-O`` the host runs with.  Prints nothing.  Returns False when a
    directory is read-only or a file could not be compiled (the guest then
    compiles it at import, as it would have anyway); never raises for that.
    """
    done = True
    for path in dirs:
        if not os.access(path, os.W_OK):
            done = False
            continue
        done &= bool(compileall.compile_dir(
            path, quiet=2, optimize=0,
            invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP))
    return done


def prepare_guest_bytecode() -> bool:
    """Compile the packages the guest imports (see the module docstring); blocks for that."""
    return compile_packages(guest_package_dirs())
