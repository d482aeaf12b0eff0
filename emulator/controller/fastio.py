"""Bulk data movement through file descriptors, never through a mapping.

Touching a view of 4 GiB through an mmap costs one page fault (about 10 us
here) per 4 KiB page: 10 s.  preadv/pwritev into reused buffers move the same
bytes at memory speed, and a hole of the media (SEEK_DATA/SEEK_HOLE) or a
range the view must read as zero (fallocate PUNCH_HOLE) needs no copy at all.
These calls touch the view and read the media; durable media writes still go
through the journal and the FileIO seam.  :func:`return_freed_memory` gives
back what the buffers of a large transfer leave behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
from collections.abc import Iterator

from ..fileio import OS_IO, write_all

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_long, ctypes.c_long, ctypes.c_uint]
_SYNC_FILE_RANGE_WAIT_BEFORE = 1
_SYNC_FILE_RANGE_WRITE = 2
_SYNC_FILE_RANGE_WAIT_AFTER = 4
_ZEROS = bytes(4 * 1024 * 1024)


def pread_exact(fd: int, buffer: memoryview, offset: int, what: str) -> None:
    """Fill ``buffer`` from ``fd`` at ``offset``; a short file raises OSError."""
    done = 0
    while done < len(buffer):
        got = os.preadv(fd, [buffer[done:]], offset + done)
        if got <= 0:
            raise OSError(errno.EIO, f"short read from {what} at {offset + done:#x}")
        done += got


def zero_range(fd: int, offset: int, length: int) -> None:
    """Make [offset, offset+length) of ``fd`` read as zeros: punch a hole (tmpfs frees
    the pages, and a mapping sees zeros), or write zeros where that is refused."""
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return
    zeros = memoryview(_ZEROS)
    for at in range(offset, offset + length, len(zeros)):
        write_all(OS_IO, fd, zeros[:min(len(zeros), offset + length - at)], at, "view")


def data_extents(fd: int, offset: int, length: int) -> Iterator[tuple[int, int]]:
    """(start, end) byte ranges holding data inside [offset, offset+length); the
    rest are holes (read as zeros).  Filesystems without SEEK_DATA: all data."""
    end = offset + length
    at = offset
    while at < end:
        try:
            data = os.lseek(fd, at, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole up to the end of the file
                return
            yield at, end  # SEEK_DATA unsupported: treat as data
            return
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, hole
        at = hole


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing [offset, offset+length) of ``fd`` to disk now,
    without waiting (sync_file_range WRITE; Python's os has no binding).  Not a
    durability barrier: the caller's fdatasync still is one.  It only keeps the disk
    busy while the caller computes, so the final fdatasync finds little left to do.
    Errors are ignored (a filesystem without it just writes back later)."""
    _libc.sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


# A transfer at least this long streams the media (prefetch ahead, drop behind)
# instead of leaving it in the page cache: see WriteBehind for why.
STREAM_MIN_BYTES = 64 * 1024 * 1024


def return_freed_memory() -> None:
    """Give the memory freed since the last call back to the kernel (glibc's malloc_trim).

    glibc keeps freed blocks of up to 32 MiB (our 4-64 MiB transfer buffers,
    once its mmap threshold has grown) in the arena of the thread that
    freed them, so a fully dirty 4 GiB flush left the backend 239 MiB beside
    the view; trimmed, 103 MiB.  Python has no binding and no library offers
    one.  A no-op where libc has no malloc_trim (musl).
    """
    trim = getattr(_libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


def prefetch(fd: int, offset: int, length: int) -> None:
    """Start reading [offset, offset+length) of ``fd`` into the page cache (no wait):
    the disk reads the next window while this one is decrypted."""
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)


def drop_cached(fd: int, offset: int, length: int) -> None:
    """Forget the clean cached pages of [offset, offset+length) of ``fd`` (a hint:
    the data stays on disk, dirty pages stay)."""
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


class WriteBehind:
    """Stream a large new file to disk without filling the page cache with it.

    Each :meth:`written` span has its writeback started at once; the span
    before it is then waited for and dropped from the page cache.  Why: on
    these VMs memory the guest has freed is soon handed back to the host
    (the balloon's free page reporting), and the next first touch of it
    costs a hypervisor fault per page.  A 4 GiB file written into new page
    cache took 5-11 s of system time; recycling the few batches in flight
    took 1.3 s (measured: 64 MiB batches, pwrite + sync_file_range).  The
    data stays readable (from disk; readers of the whole file stream it,
    see :data:`STREAM_MIN_BYTES`); durability still needs the caller's
    fdatasync.  Errors are ignored: these are hints.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._previous: tuple[int, int] | None = None

    def written(self, offset: int, length: int) -> None:
        """``[offset, offset+length)`` was just written: start it, settle the span before."""
        start_writeback(self._fd, offset, length)
        if self._previous is not None:
            self._settle(*self._previous)
        self._previous = (offset, length)

    def _settle(self, offset: int, length: int) -> None:
        _libc.sync_file_range(self._fd, offset, length, _SYNC_FILE_RANGE_WAIT_BEFORE
                              | _SYNC_FILE_RANGE_WRITE | _SYNC_FILE_RANGE_WAIT_AFTER)
        drop_cached(self._fd, offset, length)
