"""Moving pages between the media and the view: fill, write-back, media copies.

The algorithms of SPEC 3's coherence rules, apart from the request logic
(validation, ordering, persistence) of :mod:`.controller`:

- fill(page): view = decrypt(key of its KeyID, tweak, media)
- write-back(page): media = encrypt(key of its KeyID, tweak, view), only for
  pages whose media differs (exact: nothing the guest wrote is missed)

Pages of a LOST KeyID (its key died in a restart) are never written back
and are filled with the cells as they are.  Not thread-safe.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import enum
import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

import numpy as np

from ..crypto import XtsKey, XtsPool
from ..fileio import OS_IO, write_all
from ..keytable import KeyTable
from .config import PAGE_SIZE, ControllerConfig, TweakMode
from .digest import CHUNK_BYTES as DIGEST_CHUNK_BYTES
from .digest import CHUNK_PAGES as DIGEST_CHUNK_PAGES
from .digest import ChunkDigests
from .fastio import (
    STREAM_MIN_BYTES,
    data_extents,
    drop_cached,
    pread_exact,
    prefetch,
    zero_range,
)
from .media import JOURNAL_BATCH_PAGES, Media, MediaRewrite
from .pagetable import PageTable, Range, true_runs
from .persist import JOURNAL_MAX_BATCH_PAGES, PageState
from .progress import Activity
from .results import PageInfo, Stats
from .view import View

log = logging.getLogger(__name__)

# Pages handled per round (a window): bounds the scratch buffers (4 x 4 MiB).
# A multiple of the digest chunk, so windows split no chunk but at a range's ends.
CHUNK_PAGES = 1024
assert CHUNK_PAGES % DIGEST_CHUNK_PAGES == 0


class Filled(enum.Enum):
    """How a run of the view was filled."""

    ZERO = "zero"  # holes of the media, no encryption: zeros
    COPIED = "copied"  # the cells as they are
    DECRYPTED = "decrypted"


class _Pipeline:
    """Media writes on a thread of their own, one batch at a time.

    The write-back loop reads, digests and encrypts the next batch while the
    previous one is written (and, through the journal, fdatasync'd) on the
    thread (the syscalls release the GIL).  Batches are committed in order,
    never two at once (the journal has one record); :meth:`submit` waits for
    the previous batch and re-raises its error.  Leaving the ``with`` block
    waits for the batch in flight, so no write is ever left running behind a
    caller's back.
    """

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._inflight: Future[int] | None = None
        self._written = 0

    def submit(self, commit: _Sink, pages: list[tuple[int, memoryview]], verified: list[Verified]) -> None:
        self.wait()
        if self._executor is None and not pages:  # nothing to write: no thread needed
            self._written += commit.commit(pages, verified)
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="write-back")
        self._inflight = self._executor.submit(commit.commit, pages, verified)

    def wait(self) -> int:
        """Wait for the batch in flight; the pages written so far."""
        if self._inflight is not None:
            inflight, self._inflight = self._inflight, None
            self._written += inflight.result()
        return self._written

    def __enter__(self) -> _Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self._inflight is not None:
                concurrent.futures.wait([self._inflight])
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)


# Digests of whole chunks from a first chunk, and which of them to record.
Verified = tuple[int, np.ndarray, np.ndarray]


class _RewriteAbandoned(Exception):
    """The new media file could not be written (before its rename): nothing changed."""


class _Sink(Protocol):
    def commit(self, pages: list[tuple[int, memoryview]], verified: list[Verified]) -> int: ...


class _JournalSink:
    """Pages go through the journal, durable batch by batch; digests recorded per batch."""

    def __init__(self, transfer: Transfer) -> None:
        self._transfer = transfer

    def commit(self, pages: list[tuple[int, memoryview]], verified: list[Verified]) -> int:
        written = self._transfer._commit_pages(pages, verified)
        self._transfer._recycle(pages)
        return written


class _RewriteSink:
    """Pages go to a new media file: durable, and their digests recorded, only at :meth:`install`."""

    def __init__(self, transfer: Transfer, rewrite: MediaRewrite) -> None:
        self._transfer = transfer
        self._rewrite = rewrite
        self._deferred: list[Verified] = []

    def commit(self, pages: list[tuple[int, memoryview]], verified: list[Verified]) -> int:
        try:
            self._rewrite.write_pages(pages)
        except OSError as exc:
            raise _RewriteAbandoned(str(exc)) from exc
        self._transfer._recycle(pages)
        self._transfer._media_written(pages)
        self._transfer.stats.pages_written_back += len(pages)
        self._deferred.extend(verified)
        return len(pages)

    def install(self) -> None:
        try:
            self._rewrite.complete()
        except OSError as exc:
            raise _RewriteAbandoned(str(exc)) from exc
        self._rewrite.install()
        self._transfer._record_verified(self._deferred)


class Transfer:
    """Fill and write-back between ``media`` and ``view`` through the key table.

    All bulk data moves through the view's descriptor (pread/pwrite into
    reused buffers), never through its mapping: see :mod:`.fastio`.
    ``digests`` remembers which chunks of the view still equal what the
    media holds (see :mod:`.digest`): only the others are re-encrypted and
    compared at write-back.
    """

    def __init__(self, config: ControllerConfig, keys: KeyTable, pages: PageTable,
                 media: Media, view: View, pool: XtsPool, stats: Stats, base: int) -> None:
        self.config = config
        self.keys = keys
        self.pages = pages
        self.media = media
        self.view = view
        self.pool = pool
        self.stats = stats
        self.base = base
        self.digests = ChunkDigests(pages.pages)
        self._media_hole = self._scan_media_holes()
        self.activity = Activity()
        # Pages per journal batch of a write-back: each batch costs two fdatasync
        # barriers (16 MiB batches: 4.1 s per GiB of journal+media I/O here, 64 MiB:
        # 2.6 s), and pins its size in memory twice (one writing, one filling), so
        # it grows with the device, within the memory budget of size/16.
        self._batch = min(max(pages.pages // 64, JOURNAL_BATCH_PAGES), JOURNAL_MAX_BATCH_PAGES)
        # A view this backend just created reads as zeros: holes need no fill.
        self._view_is_zero = not view.reattached
        self._plain = memoryview(bytearray(CHUNK_PAGES * PAGE_SIZE))
        self._plain_next = memoryview(bytearray(CHUNK_PAGES * PAGE_SIZE))
        self._scratch = bytearray(CHUNK_PAGES * PAGE_SIZE)
        self._scratch2 = bytearray(CHUNK_PAGES * PAGE_SIZE)
        self._spare: list[bytearray] = []  # snapshot buffers of written batches

    def _tweak_base(self, page: int) -> int:
        if self.config.tweak is TweakMode.SPA:
            return self.base + page * PAGE_SIZE
        if self.config.tweak is TweakMode.DPA:
            return page * PAGE_SIZE
        if self.config.tweak is TweakMode.DUN:  # the page tweak is the data unit number itself
            return int(self.pages.tweak[page])
        return int(self.pages.tweak[page]) * PAGE_SIZE

    def _moved_tweak_base(self, page: int, distance: int) -> int:
        """Tweak base of src page ``page`` once moved ``distance`` pages (logical: unchanged)."""
        if self.config.tweak in (TweakMode.LOGICAL, TweakMode.DUN):
            return self._tweak_base(page)
        return self._tweak_base(page + distance)

    def _runs(self, start: int, end: int) -> Iterator[tuple[int, int, int]]:
        """(start, end, keyid) runs of pages sharing a KeyID and a contiguous tweak."""
        tweak = self.config.tweak
        runs = self.pages.runs(start, end, tweak in (TweakMode.LOGICAL, TweakMode.DUN), CHUNK_PAGES)
        if tweak is not TweakMode.DUN:
            yield from runs
            return
        # The engine steps a run's tweak by the unit's byte size, a DUN by one:
        # every page under a non-zero KeyID is a run of its own.
        for run_start, run_end, keyid in runs:
            if keyid == 0:
                yield run_start, run_end, keyid
            else:
                yield from ((page, page + 1, keyid) for page in range(run_start, run_end))

    def tweak_dependent_ranges(self, start: int, end: int) -> list[Range]:
        """The runs of pages whose KeyID encrypts or lost its key: the only ones a
        move of the base must refill (bypass and no-encrypt views ignore tweaks;
        a lost key's pages show the media as it is, as a fill makes them)."""
        out: list[Range] = []
        for run_start, run_end, keyid in self._runs(start, end):
            if not self.keys.is_lost(keyid) and self.keys.cipher(keyid) is None:
                continue
            if out and out[-1][1] == run_start:
                out[-1] = (out[-1][0], run_end)
            else:
                out.append((run_start, run_end))
        return out

    @staticmethod
    def _windows(start: int, end: int) -> Iterator[tuple[int, int]]:
        """[start, end) cut at multiples of CHUNK_PAGES (so windows align with digest chunks)."""
        at = start
        while at < end:
            stop = min(end, (at // CHUNK_PAGES + 1) * CHUNK_PAGES)
            yield at, stop
            at = stop

    # -- fill ------------------------------------------------------------------

    def fill(self, start: int, end: int) -> None:
        """view = decrypt(key of each page's KeyID, tweak, media), window by window.

        Records each whole chunk's digest of what it wrote (see :mod:`.digest`).
        """
        self.digests.invalidate(start, end)
        self.activity.begin("fill", (end - start) * PAGE_SIZE)
        stream = (end - start) * PAGE_SIZE >= STREAM_MIN_BYTES
        try:
            windows = list(self._windows(start, end))
            for i, (a, b) in enumerate(windows):
                if stream and i + 1 < len(windows):  # the disk reads ahead meanwhile
                    self._prefetch_media(*windows[i + 1])
                plain = self._plain[:(b - a) * PAGE_SIZE]
                kinds = [self._fill_run(run_start, run_end, keyid, plain, a)
                         for run_start, run_end, keyid in self._runs(a, b)]
                self._record_digests(a, b, plain, kinds)
                if stream:  # read once: recycle its page cache (see fastio.WriteBehind)
                    drop_cached(self.media.fd, a * PAGE_SIZE, (b - a) * PAGE_SIZE)
                self.stats.pages_filled += b - a
                self.activity.advance((b - a) * PAGE_SIZE)
        finally:
            self.activity.end()
        self._view_is_zero = False

    def _prefetch_media(self, start: int, end: int) -> None:
        """Have the disk read the media's data in pages [start, end) ahead of the fill;
        never its holes (ext4 would fill the page cache with zeroed pages for them)."""
        holes = self._hole_pages(start, end)
        for s, e in true_runs(~holes):
            prefetch(self.media.fd, (start + s) * PAGE_SIZE, (e - s) * PAGE_SIZE)

    def _fill_run(self, start: int, end: int, keyid: int, plain: memoryview, window: int) -> Filled:
        """Fill one run; its plaintext lands in ``plain`` (the window's)."""
        offset, length = start * PAGE_SIZE, (end - start) * PAGE_SIZE
        target = plain[(start - window) * PAGE_SIZE:(end - window) * PAGE_SIZE]
        key = None if self.keys.is_lost(keyid) else self.keys.cipher(keyid)
        if key is None:  # no encryption, or lost: the CPU sees the cells as they are
            return self._copy_run(offset, length, target)
        staged = memoryview(self._scratch)[:length]
        self._read_media(offset, staged)
        self.pool.decrypt_into(key, staged, target, self._tweak_base(start))
        self.stats.bytes_decrypted += length
        write_all(OS_IO, self.view.fd, target, offset, "view")
        return Filled.DECRYPTED

    def _read_media(self, offset: int, buffer: memoryview) -> None:
        """pread the media, but zeros for the chunks known to be holes (reading a
        hole of ext4 costs a zeroed page-cache page each; zeroing a buffer, nothing)."""
        holes = self._hole_pages(offset // PAGE_SIZE, (offset + len(buffer)) // PAGE_SIZE)
        for s, e in true_runs(holes):
            np.frombuffer(buffer, np.uint8)[s * PAGE_SIZE:e * PAGE_SIZE] = 0
        for s, e in true_runs(~holes):
            pread_exact(self.media.fd, buffer[s * PAGE_SIZE:e * PAGE_SIZE],
                        offset + s * PAGE_SIZE, "media")

    def _hole_pages(self, start: int, end: int) -> np.ndarray:
        """Per page of [start, end): inside a chunk known to be a hole of the media?"""
        first = start // DIGEST_CHUNK_PAGES
        chunks = self._media_hole[first:-(-end // DIGEST_CHUNK_PAGES)]
        return np.repeat(chunks, DIGEST_CHUNK_PAGES)[start - first * DIGEST_CHUNK_PAGES:
                                                     end - first * DIGEST_CHUNK_PAGES]

    def _scan_media_holes(self) -> np.ndarray:
        """Per digest chunk: is it a hole of the media (reads as zeros)?  One
        SEEK_DATA/SEEK_HOLE pass at start; every media write clears its chunks."""
        holes = np.ones(len(self.digests.valid), bool)
        for data_start, data_end in data_extents(self.media.fd, 0, self.media.size):
            holes[data_start // DIGEST_CHUNK_BYTES:-(-data_end // DIGEST_CHUNK_BYTES)] = False
        return holes

    def _media_written(self, pages: Sequence[tuple[int, memoryview]]) -> None:
        """The media chunks of ``pages`` hold data from now on (not holes)."""
        if pages:
            self._media_hole[np.asarray([offset for offset, _ in pages]) // DIGEST_CHUNK_BYTES] = False

    def _copy_run(self, offset: int, length: int, target: memoryview) -> Filled:
        """view = media as it is: data extents copied, holes zeroed (or skipped on a new view)."""
        at = offset
        holes = self._hole_pages(offset // PAGE_SIZE, (offset + length) // PAGE_SIZE)
        extents = [(offset + s * PAGE_SIZE, offset + e * PAGE_SIZE) for s, e in true_runs(~holes)]
        for data_start, data_end in [*extents, (offset + length, offset + length)]:
            if data_start > at and not self._view_is_zero:  # a hole of the media: zeros
                zero_range(self.view.fd, at, data_start - at)
            if data_end > data_start:
                piece = target[data_start - offset:data_end - offset]
                pread_exact(self.media.fd, piece, data_start, "media")
                write_all(OS_IO, self.view.fd, piece, data_start, "view")
            at = data_end
        return Filled.COPIED if extents else Filled.ZERO

    def _record_digests(self, a: int, b: int, plain: memoryview, kinds: list[Filled]) -> None:
        """Digests of the whole chunks of a filled window.

        Only when every run was decrypted (``plain`` then holds the whole
        window; copies leave it partly unwritten): a copied window's first write-back
        compares view and media directly (no encryption), about as cheap as
        digesting it here would have been, so the fill stays a plain copy.
        """
        first, last = self.digests.whole_chunks(a, b)
        if last <= first:
            return
        if all(kind is Filled.ZERO for kind in kinds):
            self.digests.set_zero(first, last)
        elif all(kind is Filled.DECRYPTED for kind in kinds):  # ``plain`` holds all of it
            rel = (first * DIGEST_CHUNK_PAGES - a) * PAGE_SIZE
            self.digests.set(first, self.digests.compute(
                plain[rel:rel + (last - first) * DIGEST_CHUNK_PAGES * PAGE_SIZE]))

    # -- write-back ------------------------------------------------------------

    def write_back(self, start: int, end: int) -> int:
        """media = encrypt(view) for every page whose media differs; returns pages written.

        The view is read once through its descriptor.  A whole chunk whose
        digest equals the one recorded when the media was last made equal to
        it is skipped; every other page is encrypted and compared with the
        media (exact), and only differing pages are written.  Digests are
        recorded only once the pages they vouch for are durable.  Pages of a
        LOST KeyID are never written.

        Changed pages go through the journal, or, once the changes found so
        far promise to cover most of the media, into a rewritten media file
        (see :mod:`.media`); a rewrite that cannot be written (a full disk)
        is abandoned and the write-back done again through the journal.
        """
        try:
            return self._write_back(start, end, may_rewrite=self.config.rewrite_at is not None)
        except _RewriteAbandoned as exc:
            log.warning("write-back: the new media file could not be written (%s); "
                        "writing through the journal instead", exc)
            return self._write_back(start, end, may_rewrite=False)

    def _write_back(self, start: int, end: int, may_rewrite: bool) -> int:
        dirty: list[tuple[int, memoryview]] = []
        verified: list[Verified] = []
        sink: _Sink = _JournalSink(self)
        scanned = found = 0
        self.activity.begin("write-back", (end - start) * PAGE_SIZE)
        # The pipeline is left first: no batch may still be writing to a new media
        # file when the cleanup aborts (closes and removes) it.
        with contextlib.ExitStack() as cleanup, _Pipeline() as commits:
            try:
                windows = list(self._windows(start, end))
                for i, (a, b, plain) in enumerate(self._read_ahead(windows)):
                    rewriting = isinstance(sink, _RewriteSink)
                    dirty.extend(self._write_back_window(a, b, plain, verified, compare=not rewriting))
                    scanned += b - a
                    last = i + 1 == len(windows)
                    if last or len(dirty) > self._batch - CHUNK_PAGES:  # the next window could overflow
                        found += len(dirty)
                        new_file = self._rewrite_pays(found, scanned, end - start) \
                            if may_rewrite and isinstance(sink, _JournalSink) else 0
                        if new_file:
                            sink = self._begin_rewrite(cleanup, new_file) or sink
                        commits.submit(sink, dirty, verified)
                        dirty, verified = [], []
                    self.activity.advance((b - a) * PAGE_SIZE)
                written = commits.wait()
                if isinstance(sink, _RewriteSink):
                    sink.install()
                return written
            finally:
                self.activity.end()
                self._spare.clear()  # the memory goes back between write-backs

    def _rewrite_pays(self, found: int, scanned: int, total: int) -> int:
        """Will rewriting the media file write less than journaling the changes twice?

        ``found`` changed pages in the first ``scanned`` of ``total`` pages:
        the rest is projected at the same rate, against the pages the media
        holds data in (a rewrite copies those it does not replace).  Returns
        the pages the new file would hold, 0 when the journal is cheaper.
        """
        if not found or self.config.rewrite_at is None:
            return 0
        projected = found * total // max(scanned, 1)
        holding_data = int(np.count_nonzero(~self._media_hole)) * DIGEST_CHUNK_PAGES
        if projected < self.config.rewrite_at * holding_data:
            return 0
        return min(holding_data + projected, self.pages.pages)

    def _begin_rewrite(self, cleanup: contextlib.ExitStack, pages: int) -> _RewriteSink | None:
        """A sink into a new media file of about ``pages`` pages of data, or None
        (no room for it, or it cannot be created): the journal then."""
        try:
            rewrite = self.media.begin_rewrite(pages * PAGE_SIZE)
        except OSError as exc:
            log.warning("write-back: cannot start a new media file (%s); using the journal", exc)
            return None
        if rewrite is None:
            return None
        cleanup.enter_context(rewrite)
        return _RewriteSink(self, rewrite)

    def _read_ahead(self, windows: list[Range]) -> Iterator[tuple[int, int, memoryview]]:
        """(a, b, the view's bytes of window [a, b)), the next window read on a thread
        meanwhile (preadv releases the GIL: the copy overlaps digests and encryption)."""
        buffers = (self._plain, self._plain_next)

        def read(i: int) -> memoryview:
            a, b = windows[i]
            buffer = buffers[i % 2][:(b - a) * PAGE_SIZE]
            pread_exact(self.view.fd, buffer, a * PAGE_SIZE, "view")
            return buffer

        if len(windows) == 1:
            yield windows[0][0], windows[0][1], read(0)
            return
        with ThreadPoolExecutor(1, thread_name_prefix="read-ahead") as reader:
            pending = reader.submit(read, 0)
            for i, (a, b) in enumerate(windows):
                plain = pending.result()
                if i + 1 < len(windows):  # buffer (i+1)%2 was released by window i-1
                    pending = reader.submit(read, i + 1)
                yield a, b, plain

    def _write_back_window(self, a: int, b: int, plain: memoryview, verified: list[Verified],
                           compare: bool = True) -> list[tuple[int, memoryview]]:
        """The dirty pages of window [a, b) (``plain``: the view's bytes there);
        digests to record go to ``verified``.  Without ``compare``, every page
        the digests do not vouch for counts as dirty (see :meth:`_dirty_pages`)."""
        check = np.ones(b - a, bool)
        first, last = self.digests.whole_chunks(a, b)
        recordable = np.zeros(max(last - first, 0), bool)
        if last > first:
            rel = first * DIGEST_CHUNK_PAGES - a
            now = self.digests.compute(plain[rel * PAGE_SIZE:(rel + (last - first)
                                                              * DIGEST_CHUNK_PAGES) * PAGE_SIZE])
            same = self.digests.unchanged(first, now)
            if rel == 0 and last - first == (b - a) // DIGEST_CHUNK_PAGES and same.all():
                return []  # every page vouched for: nothing to check or record (the common case)
            check[rel:rel + (last - first) * DIGEST_CHUNK_PAGES] = ~np.repeat(same, DIGEST_CHUNK_PAGES)
            recordable = ~same
        dirty: list[tuple[int, memoryview]] = []
        buffer = self._spare_buffer()  # the window's pages to write, at their places
        out = memoryview(buffer)[:(b - a) * PAGE_SIZE]
        for run_start, run_end, keyid in self._runs(a, b):
            if self.keys.is_lost(keyid):
                check[run_start - a:run_end - a] = False
                if last > first:  # a chunk with locked pages never vouches for anything
                    lo = max(run_start // DIGEST_CHUNK_PAGES, first) - first
                    hi = min(-(-run_end // DIGEST_CHUNK_PAGES), last) - first
                    recordable[lo:max(lo, hi)] = False
                continue
            key = self.keys.cipher(keyid)
            for s, e in true_runs(check[run_start - a:run_end - a]):
                lo, hi = (run_start + s - a) * PAGE_SIZE, (run_start + e - a) * PAGE_SIZE
                dirty.extend(self._dirty_pages(run_start + s, run_start + e, key, plain[lo:hi],
                                               out[lo:hi], compare))
        if not dirty:
            self._spare.append(buffer)  # nothing refers to it
        if recordable.any():
            verified.append((first, now.copy(), recordable))
        return dirty

    def _dirty_pages(self, start: int, end: int, key: XtsKey | None, source: memoryview,
                     into: memoryview, compare: bool) -> list[tuple[int, memoryview]]:
        """(offset, page) for each page of [start, end) whose write-back (``source``
        encrypted) differs from the media, the pages held in ``into`` (the buffer
        that goes to the writer).  Without ``compare``, every page: a new media
        file gets each page it is given, and reading the old file to compare
        would cost more than writing the equal pages again."""
        offset, length = start * PAGE_SIZE, (end - start) * PAGE_SIZE
        # Without a comparison, straight into the writer's buffer; else via the scratch,
        # since most pages may turn out equal.
        out = memoryview(self._scratch)[:length] if compare else into
        if key is not None:
            self.pool.encrypt_into(key, source, out, self._tweak_base(start))
            self.stats.bytes_encrypted += length
        elif compare:
            out = source
        else:
            out[:] = source
        changed: Sequence[int] = range(end - start)
        if compare:
            changed = self._changed_pages(offset, out)
            if not changed:
                return []
            into[:] = out  # one copy per run: the scratch is reused
        return [(offset + i * PAGE_SIZE, into[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]) for i in changed]

    def _changed_pages(self, offset: int, new_media: memoryview) -> list[int]:
        """Indexes of the pages of ``new_media`` (at ``offset``) that differ from the media."""
        stored = memoryview(self._scratch2)[:len(new_media)]
        self._read_media(offset, stored)
        new = np.frombuffer(new_media, np.uint64).reshape(-1, PAGE_SIZE // 8)
        old = np.frombuffer(stored, np.uint64).reshape(-1, PAGE_SIZE // 8)
        changed: list[int] = np.flatnonzero((new != old).any(axis=1)).tolist()
        return changed

    def _spare_buffer(self) -> bytearray:
        """A window-sized buffer of the write-back's own.

        Buffers come back through :meth:`_recycle` once their batch is written,
        so a long write-back touches new memory only for its first two batches
        (fresh anonymous memory costs a page fault per 4 KiB, which grew the time
        per GiB with the device size)."""
        return self._spare.pop() if self._spare else bytearray(CHUNK_PAGES * PAGE_SIZE)

    def _recycle(self, pages: Sequence[tuple[int, memoryview]]) -> None:
        """The snapshot buffers of a written batch may be reused (any thread)."""
        size = CHUNK_PAGES * PAGE_SIZE
        seen = {id(page.obj): page.obj for _, page in pages
                if isinstance(page.obj, bytearray) and len(page.obj) == size}
        self._spare.extend(seen.values())  # list.extend is atomic under the GIL

    def _commit_pages(self, pages: list[tuple[int, memoryview]],
                      verified: list[Verified] | None = None) -> int:
        """Write ``pages`` through the journal; then (durable) record ``verified`` digests."""
        if pages:
            self._media_written(pages)
            self.media.write_pages(pages, batch_pages=self._batch)
            self.stats.pages_written_back += len(pages)
        self._record_verified(verified or [])
        return len(pages)

    def _record_verified(self, verified: list[Verified]) -> None:
        """The chunks these digests vouch for are durable on the media: trust them."""
        for first, digests, which in verified:
            self.digests.set(first, digests, which)

    # -- relocation --------------------------------------------------------------

    def copy_media(self, src: int, dst: int, count: int) -> None:
        """Raw relocation: the cells move as they are; dst keeps its KeyID."""
        self.digests.invalidate(dst, dst + count)
        for done in range(0, count, CHUNK_PAGES):
            n = min(CHUNK_PAGES, count - done)
            buf = memoryview(bytearray(n * PAGE_SIZE))
            self.media.read_into((src + done) * PAGE_SIZE, buf)
            pages = [((dst + done + i) * PAGE_SIZE, buf[i * PAGE_SIZE:(i + 1) * PAGE_SIZE])
                     for i in range(n)]
            self._commit_pages(pages)

    def keyed_copy(self, src: int, dst: int, count: int,
                   persist: Callable[[list[Range]], None]) -> None:
        """Decrypt at src, encrypt at dst, run by run; KeyID and tweak travel along.

        Each destination page's data and its new KeyID and tweak go into the
        same journal record, so a crash leaves either the old page with its
        old KeyID or the new one with the new KeyID, never a mix.  ``persist``
        saves the page table with the given fills pending, once per batch.
        """
        self.digests.invalidate(dst, dst + count)
        for done in range(0, count, CHUNK_PAGES):
            n = min(CHUNK_PAGES, count - done)
            s0, d0 = src + done, dst + done
            data = memoryview(bytearray(n * PAGE_SIZE))
            self.media.read_into(s0 * PAGE_SIZE, data)
            for run_start, run_end, keyid in self._runs(s0, s0 + n):
                key = self.keys.cipher(keyid)
                if key is None:
                    continue
                piece = data[(run_start - s0) * PAGE_SIZE:(run_end - s0) * PAGE_SIZE]
                self.pool.decrypt_into(key, piece, piece, self._tweak_base(run_start))
                self.pool.encrypt_into(key, piece, piece, self._moved_tweak_base(run_start, d0 - s0))
            states = [PageState(int(self.pages.keyid[s0 + i]), int(self.pages.tweak[s0 + i]))
                      for i in range(n)]
            pages = [((d0 + i) * PAGE_SIZE, data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]) for i in range(n)]

            def applied(first: int, end: int, d0: int = d0, s0: int = s0) -> None:
                self.pages.copy_state(s0 + first, d0 + first, end - first)
                persist([(dst, dst + count)])

            self._media_written(pages)
            self.media.write_pages(pages, states, applied)
            self.stats.pages_written_back += n

    # -- inspection --------------------------------------------------------------

    def page_info(self, page: int) -> PageInfo:
        """One page's KeyID, kind, lock and whether media == write-back(view)."""
        offset = page * PAGE_SIZE
        keyid = int(self.pages.keyid[page])
        locked = self.keys.is_lost(keyid)
        media = bytearray(PAGE_SIZE)
        self.media.read_into(offset, memoryview(media))
        view = bytes(self.view.data[offset:offset + PAGE_SIZE])
        consistent = None
        if not locked:
            key = self.keys.cipher(keyid)
            expected = bytearray(view)
            if key is not None:
                self.pool.encrypt_into(key, view, expected, self._tweak_base(page))
            consistent = expected == media
        kind = self.keys.kind(keyid).name.lower().replace("_", "-")
        return PageInfo(offset, keyid, kind, locked, int(self.pages.tweak[page]),
                        view[:16], bytes(media[:16]), consistent)
