"""The DIMM cells: the raw media file, written only through the page journal."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from ..errors import StateError
from ..fileio import IOV_MAX, OS_IO, FileIO, pwritev_all, write_all
from .config import PAGE_SIZE
from .persist import JOURNAL_BATCH_PAGES, JOURNAL_FILE, Journal, JournalRecord, PageState

MEDIA_FILE = "media"
LABEL_FILE = "label"

__all__ = ["JOURNAL_BATCH_PAGES", "LABEL_FILE", "MEDIA_FILE", "Media"]


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
        path = state_dir / MEDIA_FILE
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
