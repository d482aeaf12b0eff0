"""The I/O seam every durable write goes through, and durable file replacement.

Kept apart (and dependency-free) because the key table (the retained TME
key) and the controller (media, journal, metadata, label) both need it, and
the key table sits above the controller in the layering.

:class:`FileIO` is the seam: the media, journal, metadata and label files do
all their opens, writes, syncs, truncations and renames through one instance
passed as a parameter.  The default, :data:`OS_IO`, is the real OS; tests hand
in subclasses that fail (EIO, ENOSPC), short-write, "die" at a chosen call, or
record writes to simulate a power loss.  Reads are plain ``os`` calls: a fault
there changes nothing durable.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Sequence
from pathlib import Path

Buffer = bytes | bytearray | memoryview
# Buffers per pwritev: below the kernel's UIO_MAXIOV (1024).
IOV_MAX = 512


class FileIO:
    """The real OS.  Every method blocks on the syscall it names and raises its OSError.

    The write methods may write less than asked (as the syscalls may): use
    :func:`write_all` and :func:`pwritev_all`, which finish or raise.
    """

    def open(self, path: Path, flags: int, mode: int = 0o600) -> int:
        return os.open(path, flags, mode)

    def close(self, fd: int) -> None:
        os.close(fd)

    def pwrite(self, fd: int, data: Buffer, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    def pwritev(self, fd: int, buffers: Sequence[Buffer], offset: int) -> int:
        return os.pwritev(fd, buffers, offset)

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def ftruncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def rename(self, src: Path, dst: Path) -> None:
        os.replace(src, dst)

    def unlink(self, path: Path) -> None:
        os.unlink(path)


OS_IO = FileIO()


def write_all(io: FileIO, fd: int, data: Buffer, offset: int, what: str = "") -> None:
    """pwrite all of ``data`` at ``offset``, or raise OSError (ENOSPC when nothing moves;
    ``what`` names the file in that message)."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        n = io.pwrite(fd, view[done:], offset + done)
        if n <= 0:
            where = f" to the {what} at {offset + done:#x}" if what else ""
            raise OSError(errno.ENOSPC,
                          f"{os.strerror(errno.ENOSPC)} (write{where} made no progress)")
        done += n


def pwritev_all(io: FileIO, fd: int, buffers: Sequence[Buffer], offset: int) -> int:
    """pwritev that finishes short writes or raises; returns the bytes written."""
    total = sum(len(b) for b in buffers)
    done = 0
    for start in range(0, len(buffers), IOV_MAX):
        group = buffers[start:start + IOV_MAX]
        size = sum(len(b) for b in group)
        got = io.pwritev(fd, group, offset + done)
        if got < size:  # rare (signals, quotas, a full disk): finish the rest plainly
            rest = b"".join(bytes(b) for b in group)[got:]
            write_all(io, fd, rest, offset + done + got)
        done += size
    return total


def atomic_write(path: Path, data: Buffer, mode: int = 0o600, io: FileIO = OS_IO) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old or the new file.

    Writes a temporary file (created with ``mode``), all of it or raises,
    fsyncs it, renames it over ``path`` and fsyncs the directory.  On any
    failure (a full disk: ENOSPC) the temporary file is removed and ``path``
    keeps its old content; a short file is never renamed.  Blocks on both
    fsyncs; raises OSError.
    """
    tmp = path.with_name(path.name + ".tmp")
    fd = io.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        try:
            write_all(io, fd, data, 0)
            io.fsync(fd)
        finally:
            io.close(fd)
        io.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # gone already: the first error is the one
            io.unlink(tmp)
        raise
    fsync_dir(path.parent, io)


def fsync_dir(path: Path, io: FileIO = OS_IO) -> None:
    """Make a rename or creation in ``path`` durable."""
    fd = io.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        io.fsync(fd)
    finally:
        io.close(fd)
