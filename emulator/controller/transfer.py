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

from collections.abc import Callable, Iterator

import numpy as np

from ..crypto import XtsKey, XtsPool
from ..keytable import KeyTable
from .config import PAGE_SIZE, ControllerConfig, TweakMode
from .media import JOURNAL_BATCH_PAGES, Media
from .pagetable import PageTable, Range
from .persist import PageState
from .results import PageInfo, Stats
from .view import View

# Pages handled per round: bounds the two scratch buffers (2 x 4 MiB).
CHUNK_PAGES = 1024


class Transfer:
    """Fill and write-back between ``media`` and ``view`` through the key table."""

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
        self._scratch = bytearray(CHUNK_PAGES * PAGE_SIZE)
        self._scratch2 = bytearray(CHUNK_PAGES * PAGE_SIZE)

    def _tweak_base(self, page: int) -> int:
        if self.config.tweak is TweakMode.SPA:
            return self.base + page * PAGE_SIZE
        if self.config.tweak is TweakMode.DPA:
            return page * PAGE_SIZE
        return int(self.pages.tweak[page]) * PAGE_SIZE

    def _moved_tweak_base(self, page: int, distance: int) -> int:
        """Tweak base of src page ``page`` once moved ``distance`` pages (logical: unchanged)."""
        if self.config.tweak is TweakMode.LOGICAL:
            return self._tweak_base(page)
        return self._tweak_base(page + distance)

    def _runs(self, start: int, end: int) -> Iterator[tuple[int, int, int]]:
        """(start, end, keyid) runs of pages sharing a KeyID and a contiguous tweak."""
        return self.pages.runs(start, end, self.config.tweak is TweakMode.LOGICAL, CHUNK_PAGES)

    # -- fill ------------------------------------------------------------------

    def fill(self, start: int, end: int) -> None:
        """view = decrypt(key of each page's KeyID, tweak, media)."""
        for run_start, run_end, keyid in self._runs(start, end):
            offset, length = run_start * PAGE_SIZE, (run_end - run_start) * PAGE_SIZE
            target = self.view.data[offset:offset + length]
            key = None if self.keys.is_lost(keyid) else self.keys.cipher(keyid)
            if key is None:  # no encryption, or lost: the CPU sees the cells as they are
                self.media.read_into(offset, target)
            else:
                staged = memoryview(self._scratch)[:length]
                self.media.read_into(offset, staged)
                self.pool.decrypt_into(key, staged, target, self._tweak_base(run_start))
                self.stats.bytes_decrypted += length
            self.stats.pages_filled += run_end - run_start

    # -- write-back ------------------------------------------------------------

    def write_back(self, start: int, end: int) -> int:
        """media = encrypt(view) for every page whose media differs; returns pages written.

        Exact by construction: a page is skipped only when its media already
        equals the write-back of its view.  Pages of a LOST KeyID are never written.
        """
        dirty: list[tuple[int, memoryview]] = []
        written = 0
        for run_start, run_end, keyid in self._runs(start, end):
            if self.keys.is_lost(keyid):
                continue
            dirty.extend(self._dirty_pages(run_start, run_end, self.keys.cipher(keyid)))
            if len(dirty) >= JOURNAL_BATCH_PAGES:
                written += self._commit_pages(dirty)
                dirty = []
        return written + self._commit_pages(dirty)

    def _dirty_pages(self, start: int, end: int, key: XtsKey | None) -> list[tuple[int, memoryview]]:
        offset, length = start * PAGE_SIZE, (end - start) * PAGE_SIZE
        source = self.view.data[offset:offset + length]
        if key is not None:
            encrypted = memoryview(self._scratch)[:length]
            self.pool.encrypt_into(key, source, encrypted, self._tweak_base(start))
            self.stats.bytes_encrypted += length
            source = encrypted
        stored = memoryview(self._scratch2)[:length]
        self.media.read_into(offset, stored)
        new = np.frombuffer(source, np.uint64).reshape(-1, PAGE_SIZE // 8)
        old = np.frombuffer(stored, np.uint64).reshape(-1, PAGE_SIZE // 8)
        changed = np.flatnonzero((new != old).any(axis=1)).tolist()
        if not changed:
            return []
        snapshot = memoryview(bytes(source))  # one copy per chunk: the scratch is reused
        return [(offset + i * PAGE_SIZE, snapshot[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]) for i in changed]

    def _commit_pages(self, pages: list[tuple[int, memoryview]]) -> int:
        if pages:
            self.media.write_pages(pages)
            self.stats.pages_written_back += len(pages)
        return len(pages)

    # -- relocation --------------------------------------------------------------

    def copy_media(self, src: int, dst: int, count: int) -> None:
        """Raw relocation: the cells move as they are; dst keeps its KeyID."""
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

