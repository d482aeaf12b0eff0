"""The DIMM cells: the raw media file, written through the page journal or rewritten whole.

Two crash-safe ways to change the media, chosen per write-back by
:class:`~.transfer.Transfer`:

- the page journal (:meth:`Media.write_pages`): each batch is written twice,
  journal then media, so a torn page is repaired by a replay; cheap when few
  pages change;
- a rewrite (:class:`MediaRewrite`): a new media file is written beside the
  old one (changed pages fresh, the rest copied), fdatasync'd, and renamed
  over it; a crash before the rename leaves the old file whole, after it the
  new one.  Every byte is written once: a fully dirty flush costs about one
  write of the device instead of two.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from ..errors import StateError
from ..fileio import IOV_MAX, OS_IO, FileIO, fsync_dir, pwritev_all, write_all
from .config import PAGE_SIZE
from .fastio import WriteBehind, data_extents
from .pagetable import true_runs
from .persist import JOURNAL_BATCH_PAGES, JOURNAL_FILE, Journal, JournalRecord, PageState

MEDIA_FILE = "media"
REWRITE_FILE = "media.new"  # a rewrite in progress; a start removes a leftover one
LABEL_FILE = "label"
# Free space a rewrite leaves the filesystem beyond its new file.
REWRITE_SPARE_BYTES = 64 * 1024 * 1024
_COPY_BYTES = 4 * 1024 * 1024

__all__ = ["JOURNAL_BATCH_PAGES", "LABEL_FILE", "MEDIA_FILE", "REWRITE_FILE", "Media", "MediaRewrite"]


def _contiguous_runs(pages: Sequence[tuple[int, memoryview]]) -> Iterator[tuple[int, list[memoryview]]]:
    """Group (offset, page) pairs into runs of adjacent pages: one syscall per run."""
    start, run = -1, list[memoryview]()
    for offset, page in pages:
        assert offset % PAGE_SIZE == 0 and len(page) == PAGE_SIZE
        if run and offset == start + len(run) * PAGE_SIZE and len(run) < IOV_MAX:
            run.append(page)
            continue
        if run:
            yield start, run
        start, run = offset, [page]
    if run:
        yield start, run


class Media:
    """Byte i of ``media`` is data-area offset i; nothing else is in it.

    Reads are plain preads.  Writes go journal -> media, batch by batch, so
    no page is ever torn; :meth:`sync` makes them durable.  Every write and
    sync goes through ``io`` (the fault-injection seam).  Not thread-safe.
    """

    def __init__(self, state_dir: Path, size: int, label_size: int, io: FileIO = OS_IO) -> None:
        self.size = size
        self.label_path = state_dir / LABEL_FILE
        self.label_size = label_size
        self._io = io
        self.state_dir = state_dir
        path = state_dir / MEDIA_FILE
        with contextlib.suppress(FileNotFoundError):  # a rewrite a crash interrupted: the old file stands
            io.unlink(state_dir / REWRITE_FILE)
        self._fd = io.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            existing = os.fstat(self._fd).st_size
            if existing not in (0, size):
                raise StateError(f"{path} holds {existing} bytes, the device has {size}")
            if existing == 0:
                io.ftruncate(self._fd, size)
            self.journal = Journal(state_dir / JOURNAL_FILE, io)
            # Media writes not yet fdatasync'd: a sync with none is skipped (an
            # fdatasync of a clean file still costs 1.8 ms here: half a map).
            self._unsynced = True
        except BaseException:
            io.close(self._fd)
            raise

    def replay(self, keyids: int) -> JournalRecord | None:
        """Finish the batch a crash interrupted, if the journal holds a complete one.

        Returns it so the caller can apply the page states it carries, and
        then :meth:`Journal.retire` it.  A record that does not fit the device
        raises StateError before anything is written.  Blocks on fdatasync.
        """
        record = self.journal.pending(self.size, keyids)
        if record is not None:
            for offset, page in record.pages:
                write_all(self._io, self._fd, page, offset)
            self._io.fdatasync(self._fd)
        return record

    @property
    def fd(self) -> int:
        return self._fd

    def read_into(self, offset: int, buffer: memoryview) -> None:
        """Fill ``buffer`` from media at ``offset``. Blocks on disk reads."""
        done = 0
        while done < len(buffer):
            got = os.preadv(self._fd, [buffer[done:]], offset + done)
            if got <= 0:
                raise OSError(f"short read from media at {offset + done:#x}")
            done += got

    def write_pages(self, pages: Sequence[tuple[int, memoryview]],
                    states: Sequence[PageState] | None = None,
                    applied: Callable[[int, int], None] | None = None,
                    batch_pages: int = JOURNAL_BATCH_PAGES) -> None:
        """Write whole pages (offset, 4 KiB) through the journal, batch by batch.

        With ``states`` (one per page), each batch's record carries the
        pages' new KeyID and tweak, and ``applied(first, end)`` (indices into
        ``pages``) is called once the batch is on the media, before the record
        is retired: the caller persists those states there.  ``batch_pages``
        (at most JOURNAL_MAX_BATCH_PAGES) pages go in each journal record.
        """
        for start in range(0, len(pages), batch_pages):
            end = min(start + batch_pages, len(pages))
            batch = pages[start:end]
            self.journal.record(batch, None if states is None else states[start:end])
            self._unsynced = True
            for offset, run in _contiguous_runs(batch):
                pwritev_all(self._io, self._fd, run, offset)
            self._io.fdatasync(self._fd)
            self._unsynced = False
            if applied is not None:
                applied(start, end)
            self.journal.retire()

    def sync(self) -> None:
        """Make every media write so far durable. Blocks on fdatasync, if any is pending."""
        if self._unsynced:
            self._io.fdatasync(self._fd)
            self._unsynced = False

    def begin_rewrite(self, data_bytes: int) -> MediaRewrite | None:
        """A new media file to write, or None when the filesystem lacks room for
        ``data_bytes`` (what the new file will hold) and a margin: the journal then."""
        stat = os.statvfs(self.state_dir)
        if stat.f_bavail * stat.f_frsize < data_bytes + REWRITE_SPARE_BYTES:
            return None
        return MediaRewrite(self, self._io)

    def _swap(self, new_path: Path) -> None:
        """Rename ``new_path`` (complete and durable) over the media file; reopen it."""
        path = self.state_dir / MEDIA_FILE
        self.journal.retire_durably()  # no stale record may replay over the new file
        self._io.rename(new_path, path)
        # From the rename on, every read and journal write must reach the new
        # file, even if what follows fails: the old inode is gone from the name.
        old, self._fd = self._fd, self._io.open(path, os.O_RDWR, 0o600)
        self._unsynced = False
        with contextlib.suppress(OSError):
            self._io.close(old)
        fsync_dir(self.state_dir, self._io)

    def read_label(self) -> bytes:
        try:
            raw = self.label_path.read_bytes()
        except FileNotFoundError:
            raw = b""
        return raw[: self.label_size].ljust(self.label_size, b"\0")

    def close(self) -> None:
        try:
            self.journal.close()
        finally:
            self._io.close(self._fd)


class MediaRewrite:
    """A new media file written beside the old one, then renamed over it.

    :meth:`write_pages` puts new pages in the new file (no journal: nobody
    reads it before the rename).  :meth:`complete` copies every other page
    holding data from the old file (holes stay holes) and fdatasyncs;
    :meth:`install` renames it over the media and fsyncs the directory: only
    then are the pages durable.  :meth:`abort` removes the new file; the old
    one was never touched.  Use as a context manager: leaving it before
    :meth:`complete` aborts.
    """

    def __init__(self, media: Media, io: FileIO) -> None:
        self._media = media
        self._io = io
        self.path = media.state_dir / REWRITE_FILE
        self._fresh = np.zeros(media.size // PAGE_SIZE, bool)  # pages already in the new file
        self._fd: int | None = io.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self._behind = WriteBehind(self._fd)
        try:
            io.ftruncate(self._fd, media.size)
        except BaseException:
            self.abort()
            raise

    def write_pages(self, pages: Sequence[tuple[int, memoryview]]) -> None:
        """Write whole pages (offset, 4 KiB) to the new file, and start their writeback
        (the disk writes while the next pages are encrypted; :meth:`complete` syncs)."""
        assert self._fd is not None
        low, high = self._media.size, 0
        for offset, run in _contiguous_runs(pages):
            written = pwritev_all(self._io, self._fd, run, offset)
            self._fresh[offset // PAGE_SIZE:offset // PAGE_SIZE + len(run)] = True
            low, high = min(low, offset), max(high, offset + written)
        if high > low:
            self._behind.written(low, high - low)

    def complete(self) -> None:
        """Copy the old file's other data and make the new file durable (the old one still
        stands: a failure here changes nothing, :meth:`abort` and the journal remain)."""
        assert self._fd is not None
        self._copy_rest()
        self._io.fdatasync(self._fd)
        self._io.close(self._fd)
        self._fd = None

    def install(self) -> None:
        """Rename the completed new file over the media: from here on it is the media."""
        assert self._fd is None, "complete() first"
        self._media._swap(self.path)

    def _copy_rest(self) -> None:
        """Pages with data in the old file and not written fresh: copied as they are."""
        assert self._fd is not None
        buffer = memoryview(bytearray(_COPY_BYTES))
        for start, end in data_extents(self._media.fd, 0, self._media.size):
            first = start // PAGE_SIZE
            for s, e in true_runs(~self._fresh[first:-(-end // PAGE_SIZE)]):
                self._copy((first + s) * PAGE_SIZE, (e - s) * PAGE_SIZE, buffer)

    def _copy(self, offset: int, length: int, buffer: memoryview) -> None:
        assert self._fd is not None
        for at in range(offset, offset + length, len(buffer)):
            piece = buffer[:min(len(buffer), offset + length - at)]
            self._media.read_into(at, piece)
            write_all(self._io, self._fd, piece, at)
            self._behind.written(at, len(piece))

    def abort(self) -> None:
        """Remove the new file; the media file is as it was."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                self._io.close(self._fd)
            self._fd = None
        with contextlib.suppress(OSError):
            self._io.unlink(self.path)

    def __enter__(self) -> MediaRewrite:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            self.abort()
