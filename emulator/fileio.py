"""Durable file replacement, shared by every layer that persists something.

Kept apart (and dependency-free) because the key table (the retained TME
key) and the controller (metadata, label) both need it, and the key table
sits above the controller in the layering.
"""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write(path: Path, data: bytes | bytearray, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old or the new file.

    Writes a temporary file (created with ``mode``), fsyncs it, renames it
    over ``path`` and fsyncs the directory.  Blocks on both fsyncs.
    """
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename or creation in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
