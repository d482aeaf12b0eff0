"""Bulk data movement through file descriptors, never through a mapping.

Touching a view of 4 GiB through an mmap costs one page fault (about 10 us
here) per 4 KiB page: 10 s.  preadv/pwritev into reused buffers move the same
bytes at memory speed, and a hole of the media (SEEK_DATA/SEEK_HOLE) or a
range the view must read as zero (fallocate PUNCH_HOLE) needs no copy at all.
These calls touch the view and read the media; durable media writes still go
through the journal and the FileIO seam.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Iterator

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_long, ctypes.c_long, ctypes.c_uint]
_SYNC_FILE_RANGE_WRITE = 2
_ZEROS = bytes(4 * 1024 * 1024)


def pread_exact(fd: int, buffer: memoryview, offset: int, what: str) -> None:
    """Fill ``buffer`` from ``fd`` at ``offset``; a short file raises OSError."""
    done = 0
    while done < len(buffer):
        got = os.preadv(fd, [buffer[done:]], offset + done)
        if got <= 0:
            raise OSError(errno.EIO, f"short read from {what} at {offset + done:#x}")
        done += got


def pwrite_exact(fd: int, data: memoryview, offset: int, what: str) -> None:
    done = 0
    while done < len(data):
        got = os.pwrite(fd, data[done:], offset + done)
        if got <= 0:
            raise OSError(errno.ENOSPC, f"short write to {what} at {offset + done:#x}")
        done += got


def zero_range(fd: int, offset: int, length: int) -> None:
    """Make [offset, offset+length) of ``fd`` read as zeros: punch a hole (tmpfs frees
    the pages, and a mapping sees zeros), or write zeros where that is refused."""
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return
    zeros = memoryview(_ZEROS)
    for at in range(offset, offset + length, len(zeros)):
        pwrite_exact(fd, zeros[:min(len(zeros), offset + length - at)], at, "view")


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
