"""The per-page state of the data area: each page's KeyID and logical tweak.

The stand-in for the KeyID bits in the guest's page tables (SPEC 3).  The
page table owns the two per-page arrays, the page ranges whose view fill is
in progress, their persistence in the metadata file, and the undo that puts
memory back as the disk has it when persisting fails.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ..fileio import FileIO
from .persist import JournalRecord, Metadata, save_metadata
from .statelog import GENERATION, StateLog

Range = tuple[int, int]  # [start, end) in pages


class PageTable:
    """KeyID (uint16) and logical page tweak (uint64) of every page; not thread-safe.

    ``pending`` is the list of ranges whose fill the metadata file marks as
    in progress: a start finds them there and fills them again.
    """

    def __init__(self, state_dir: Path, io: FileIO, keyid: np.ndarray, tweak: np.ndarray,
                 pending: Sequence[Range] = (), generation: int = 0) -> None:
        self._state_dir = state_dir
        self._io = io
        self.keyid = keyid
        self.tweak = tweak
        self.pending: list[Range] = list(pending)
        self._log = StateLog(state_dir, io, generation)  # small changes: see .statelog
        self._changed: list[Range] = []  # ranges changed since the last save
        self._undo: list[tuple[int, np.ndarray, np.ndarray]] | None = None

    @classmethod
    def fresh(cls, state_dir: Path, io: FileIO, pages: int) -> PageTable:
        """Every page under KeyID 0, page tweak = page index."""
        return cls(state_dir, io, np.zeros(pages, np.uint16), np.arange(pages, dtype=np.uint64))

    @classmethod
    def from_metadata(cls, state_dir: Path, io: FileIO, stored: Metadata) -> PageTable:
        generation = stored.config.get(GENERATION, 0)
        return cls(state_dir, io, stored.page_keyid.copy(), stored.page_tweak.copy(),
                   stored.pending_fill, generation if isinstance(generation, int) else 0)

    @property
    def pages(self) -> int:
        return len(self.keyid)

    # -- changes -------------------------------------------------------------

    def reset(self) -> None:
        """Power cycle: every page back to KeyID 0 and its index as tweak."""
        self._changing(0, self.pages)
        self.keyid[:] = 0
        self.tweak[:] = np.arange(self.pages, dtype=np.uint64)

    def assign(self, start: int, end: int, keyid: int, logical_tweak: int | None) -> None:
        """Give pages [start, end) a KeyID and, optionally, consecutive logical tweaks."""
        self._changing(start, end)
        self.keyid[start:end] = keyid
        if logical_tweak is not None:
            self.tweak[start:end] = np.arange(end - start, dtype=np.uint64) + np.uint64(logical_tweak)

    def copy_state(self, src: int, dst: int, count: int) -> None:
        """Pages dst.. take the KeyID and tweak of pages src.. (a keyed relocation)."""
        self._changing(dst, dst + count)
        self.keyid[dst:dst + count] = self.keyid[src:src + count]
        self.tweak[dst:dst + count] = self.tweak[src:src + count]

    def apply_record(self, record: JournalRecord | None, page_size: int) -> list[Range]:
        """Apply the page states a replayed journal batch carries; returns the pages to refill."""
        if record is None or record.states is None:
            return []
        touched = []
        for (offset, _), state in zip(record.pages, record.states, strict=True):
            page = offset // page_size
            self._changing(page, page + 1)
            self.keyid[page], self.tweak[page] = state.keyid, state.tweak
            touched.append(page)
        return ranges(np.asarray(sorted(touched)))

    @contextlib.contextmanager
    def undo_on_error(self) -> Iterator[None]:
        """Restore both arrays if the block raises (say, ENOSPC persisting them):
        a refused request must leave memory as it left the disk.  Saves only
        the ranges the block changes (a map of 2 MiB copies 5 KiB, not 10 MiB)."""
        self._undo = []
        try:
            yield
        except BaseException:
            for start, keyid, tweak in reversed(self._undo):
                self.keyid[start:start + len(keyid)] = keyid
                self.tweak[start:start + len(keyid)] = tweak
            raise
        finally:
            self._undo = None

    def _changing(self, start: int, end: int) -> None:
        """Pages [start, end) are about to change: note them for the log and the undo."""
        self._changed.append((start, end))
        if self._undo is not None:
            self._undo.append((start, self.keyid[start:end].copy(), self.tweak[start:end].copy()))

    # -- questions -----------------------------------------------------------

    def in_use(self) -> set[int]:
        """The KeyIDs some page is mapped with."""
        return set(np.unique(self.keyid).tolist())

    def keyids_in(self, start: int, end: int) -> list[int]:
        return [int(k) for k in np.unique(self.keyid[start:end])]

    def count(self, keyid: int, start: int = 0, end: int | None = None) -> int:
        return int(np.count_nonzero(self.keyid[start:end] == keyid))

    def ranges_of(self, keyid: int) -> list[Range]:
        """The runs of pages mapped with ``keyid``."""
        return ranges(np.flatnonzero(self.keyid == keyid))

    def runs(self, start: int, end: int, logical: bool, chunk: int) -> Iterator[tuple[int, int, int]]:
        """(start, end, keyid) runs of at most ``chunk`` pages sharing a KeyID and,
        when ``logical``, a contiguous tweak."""
        keyids = self.keyid[start:end]
        cuts = np.flatnonzero(keyids[1:] != keyids[:-1]) + 1
        if logical:
            tweaks = self.tweak[start:end]
            jumps = np.flatnonzero(tweaks[1:] - tweaks[:-1] != 1) + 1
            cuts = np.union1d(cuts, jumps)
        bounds = [start, *(cuts + start).tolist(), end]
        for run_start, run_end in itertools.pairwise(bounds):
            for first in range(run_start, run_end, chunk):
                yield first, min(first + chunk, run_end), int(self.keyid[run_start])

    # -- persistence ---------------------------------------------------------

    def checkpoint_next(self) -> None:
        """The next :meth:`save` replaces the metadata file (and empties the state log)."""
        self._log.force_checkpoint()

    def save(self, config: dict[str, object], kinds: Sequence[int],
             pending: Sequence[Range] = ()) -> None:
        """Persist both arrays, the per-KeyID ``kinds`` and the fills in progress.

        Atomic (the old or the new state survives a crash); blocks on fsync;
        raises OSError, and then ``pending`` is unchanged.  Few changed pages
        are appended to the state log, else the metadata file is replaced.
        """
        changed = _merged(self._changed)
        count = sum(end - start for start, end in changed)
        size = 10 * count + 4096
        if self._log.wants_checkpoint(count, size):
            generation = self._log.generation + 1
            save_metadata(self._state_dir, Metadata(
                config={**config, GENERATION: generation}, page_keyid=self.keyid,
                page_tweak=self.tweak, keyid_kind=np.asarray([int(k) for k in kinds], np.uint8),
                pending_fill=list(pending)), self._io)
            self._log.checkpointed(generation, config, kinds, pending)
        else:
            self._log.append(config, kinds, pending, changed, self.keyid, self.tweak)
        self._changed = []
        self.pending = list(pending)


def _merged(spans: Sequence[Range]) -> list[Range]:
    """Sorted, non-overlapping union of [start, end) spans."""
    out: list[Range] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def ranges(pages: np.ndarray) -> list[Range]:
    """Sorted page indices -> [(start, end)) runs."""
    if pages.size == 0:
        return []
    cuts = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = [int(pages[0]), *pages[cuts].tolist()]
    ends = [*(pages[cuts - 1] + 1).tolist(), int(pages[-1]) + 1]
    return list(zip(starts, ends, strict=True))


def true_runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) runs of True in a bool array."""
    edges = np.flatnonzero(np.diff(np.concatenate(([False], mask, [False])).astype(np.int8)))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist(), strict=True))
