"""The emulated TME-MK memory controller for one NVDIMM: the coordinator.

Every public method is a hardware request: it validates first (raising
:class:`ControllerError`, nothing changed), then acts, then persists the
per-page state before returning.  Methods block on disk I/O (fdatasync) and
on the CPU; they are not thread-safe, the service serialises them.

The parts it coordinates: the key table (keyslots, LOST ones included), the
page table (per-page KeyID and tweak, persisted), the media and the view,
and :class:`~.transfer.Transfer`, which moves pages between them.  A
controller is made by :func:`~.recovery.open_controller`, which does the
recovery; the constructor only assembles parts already opened.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

import numpy as np

from ..crypto import XtsPool
from ..errors import ControllerError, ErrorCode
from ..fileio import FileIO, atomic_write
from ..keytable import KeyStatus, KeyTable, SlotKind
from . import fastio
from .config import PAGE_SIZE, ControllerConfig, TweakMode
from .lock import StateLock
from .media import Media
from .pagetable import PageTable, Range
from .results import FlushResult, PageInfo, RelocateMode, Stats
from .transfer import Transfer
from .view import View

log = logging.getLogger(__name__)


@dataclass
class DeviceParts:
    """Everything an opened device consists of; the controller owns them once built."""

    config: ControllerConfig
    io: FileIO
    lock: StateLock
    keys: KeyTable
    media: Media
    view: View
    pages: PageTable
    pool: XtsPool
    base: int


class MemoryController:
    """Media + view + KeyID table + per-page KeyIDs of one emulated NVDIMM.

    Use as a context manager, or call :meth:`close`; made by ``open_controller``.
    """

    def __init__(self, parts: DeviceParts) -> None:
        self.config = parts.config
        self.keys = parts.keys
        self.media = parts.media
        self.view = parts.view
        self.pages = parts.pages
        self.stats = Stats()
        self._io = parts.io
        self._lock = parts.lock
        self._pool = parts.pool
        self._move = Transfer(parts.config, parts.keys, parts.pages, parts.media, parts.view,
                              parts.pool, self.stats, parts.base)
        self._closed = False

    @property
    def base(self) -> int:
        """The NVDIMM's guest physical base (the spa tweak's origin)."""
        return self._move.base

    @property
    def busy(self) -> str:
        """The transfer phase in progress and how far it got ("" when idle); any thread."""
        return self._move.activity.busy

    @property
    def page_keyid(self) -> np.ndarray:
        return self.pages.keyid

    @property
    def page_tweak(self) -> np.ndarray:
        return self.pages.tweak

    # -- the hardware requests ---------------------------------------------

    def program_key(self, raw: bytes) -> KeyStatus:
        """PCONFIG MKTME_KEY_PROGRAM; pages of the KeyID switch keys (write back, fill)."""
        prepared = self.keys.prepare(raw)
        if isinstance(prepared, KeyStatus):
            return prepared
        self.view.check()
        keyid = prepared.keyid
        ranges = self.pages.ranges_of(keyid)
        for start, end in ranges:
            self._move.write_back(start, end)
        self.media.sync()
        kinds = self.keys.slot_kinds()
        kinds[keyid] = prepared.kind
        self._persist(pending=ranges, kinds=kinds)
        self.keys.commit(prepared)
        self.stats.key_programs += 1
        self.finish_fill(ranges)
        return KeyStatus.PROG_SUCCESS

    def map_range(self, offset: int, length: int, keyid: int,
                  logical_tweak: int | None = None) -> None:
        """Give pages a KeyID (encrypt_mprotect): write back under the old, fill under the new.

        Refused with NO_KEY for a KeyID whose key was lost in a restart: what
        the guest then wrote could never be written back.
        """
        start, end = self._page_range(offset, length)
        self._check_keyid(keyid)
        if logical_tweak is not None and self.config.tweak not in (TweakMode.LOGICAL, TweakMode.DUN):
            raise ControllerError("a logical tweak needs the device in logical or dun tweak mode")
        if logical_tweak is not None and not 0 <= logical_tweak <= 2**64 - (end - start):
            raise ControllerError("logical tweak out of range (64-bit page tweak)")
        # Malformed requests are INVALID before the device's state is looked at.
        if self.keys.is_lost(keyid):
            raise ControllerError(f"KeyID {keyid} lost its key in a backend restart; program "
                                  "it again before mapping pages with it", ErrorCode.NO_KEY)
        self.view.check()
        self._move.write_back(start, end)
        self.media.sync()
        with self.pages.undo_on_error():
            self.pages.assign(start, end, keyid, logical_tweak)
            self._persist(pending=[(start, end)])
        self.finish_fill([(start, end)])

    def flush(self, offset: int = 0, length: int | None = None) -> FlushResult:
        """Write back what changed; durable on return.

        Returns the pages written and the pages that could not be (their
        KeyID's key was lost: they are never written with a wrong key).
        """
        start, end = (0, self.config.pages) if length is None else self._page_range(offset, length)
        self.view.check()
        began = time.perf_counter()
        written = self._move.write_back(start, end)
        if length is None:
            self._save_label()
        self.media.sync()
        if (end - start) * PAGE_SIZE >= fastio.STREAM_MIN_BYTES:  # its buffers were large
            fastio.return_freed_memory()
        self.stats.account_flush(time.perf_counter() - began)
        unwritable = sum(self.pages.count(k, start, end) for k in self.keys.lost_keyids())
        if unwritable:
            log.warning("flush: %d pages of KeyIDs whose key was lost were not written back",
                        unwritable)
        return FlushResult(written, unwritable)

    def relocate(self, src: int, dst: int, length: int, mode: RelocateMode) -> None:
        """Move data on the media from src to dst (both written back first, dst refilled)."""
        s0, s1 = self._page_range(src, length)
        d0, d1 = self._page_range(dst, length)
        if s0 < d1 and d0 < s1:
            raise ControllerError("relocation source and destination overlap", ErrorCode.RANGE)
        if mode is RelocateMode.KEYED:
            self._check_keys_present(s0, s1)
        self.view.check()
        self._move.write_back(s0, s1)
        self._move.write_back(d0, d1)
        if mode is RelocateMode.RAW:
            self._move.copy_media(s0, d0, s1 - s0)
        else:
            self._move.keyed_copy(s0, d0, s1 - s0, lambda pending: self._persist(pending))
        self.media.sync()
        self.refill([(d0, d1)])

    def power_cycle(self) -> None:
        """Write back everything, forget keys, every page back to KeyID 0, refill.

        The reset page table is persisted (fill pending) before any key is
        forgotten: if that fails, nothing changed and the keys still work.
        """
        self.view.check()
        self._move.write_back(0, self.config.pages)
        self._save_label()
        self.media.sync()
        everything = [(0, self.config.pages)]
        with self.pages.undo_on_error():
            self.pages.reset()
            self._persist(pending=everything, kinds=[SlotKind.TME] * self.keys.keyid_count)
        self.keys.power_cycle()
        self.stats.power_cycles += 1
        self.finish_fill(everything)
        if self.config.pages * PAGE_SIZE >= fastio.STREAM_MIN_BYTES:
            fastio.return_freed_memory()

    def set_base(self, base: int) -> None:
        """The NVDIMM's guest physical base (from QMP); a move is logged and refills."""
        if base < 0 or base % PAGE_SIZE:
            raise ControllerError(f"base {base:#x} is not a 4K-aligned physical address")
        if base == self.base:
            return
        self.view.check()
        log.warning("NVDIMM base moved from %#x to %#x%s", self.base, base,
                    " (spa tweaks: ciphertext will not decrypt at the new place)"
                    if self.config.tweak is TweakMode.SPA else "")
        moved = self._move.tweak_dependent_ranges(0, self.config.pages)  # the rest keep their view
        for start, end in moved:
            self._move.write_back(start, end)
        self.media.sync()
        old, self._move.base = self.base, base
        try:
            self._persist(pending=moved)
        except BaseException:
            self._move.base = old  # memory stays as the disk has it
            raise
        self.finish_fill(moved)

    def inspect(self, offset: int, count: int = 1) -> list[PageInfo]:
        """Per-page KeyID, kind, lock and whether media == write-back(view)."""
        start, end = self._page_range(offset, count * PAGE_SIZE)
        self.view.check()
        return [self._move.page_info(page) for page in range(start, end)]

    def locked_pages(self) -> dict[int, int]:
        """KeyID -> number of pages locked because its key was lost in a restart."""
        return {k: self.pages.count(k) for k in self.keys.lost_keyids()}

    # -- lifetime ------------------------------------------------------------

    def close(self) -> None:
        """Write everything back and release the files, threads and locks (SIGTERM path).

        The files are released even when the write-back fails; the error
        (OSError, StateError) is raised after, so no caller reports success.
        """
        if self._closed:
            return
        try:
            self.flush()
            self.pages.checkpoint_next()  # a cleanly closed device keeps no state log
            self._persist()
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Release files, threads and locks without writing anything, as a process death does.

        What is on disk stays as the last durable write left it (the crash
        tests' "the process died here"); keys are zeroed.
        """
        if self._closed:
            return
        self._closed = True
        with contextlib.ExitStack() as stack:  # every release runs, the first error wins
            stack.callback(self._lock.release)
            stack.callback(self.media.close)
            stack.callback(self.view.close)
            stack.callback(self._pool.close)
            stack.callback(self.keys.wipe)

    def __enter__(self) -> MemoryController:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- recovery's entry points ------------------------------------------------

    def refill(self, ranges: list[Range]) -> None:
        """Persist state with the fill marked pending, fill, persist it done.

        A crash mid-fill leaves the pending mark, and the next start fills
        again; the guest has had no answer yet, so no write is lost.
        """
        self._persist(pending=ranges)
        self.finish_fill(ranges)

    def finish_fill(self, ranges: list[Range]) -> None:
        """Fill ranges already marked pending in the metadata, then clear the mark."""
        for start, end in ranges:
            self._move.fill(start, end)
        self._persist()

    def restore_label(self) -> None:
        """Label area of the view = the label file (a new view, or after a power loss)."""
        if self.config.label_size:
            self.view.label[:] = self.media.read_label()

    # -- validation ----------------------------------------------------------

    def _page_range(self, offset: int, length: int) -> tuple[int, int]:
        if offset % PAGE_SIZE or length % PAGE_SIZE or length <= 0:
            raise ControllerError(f"range {offset:#x}+{length:#x} is not whole 4K pages",
                                  ErrorCode.RANGE)
        if offset < 0 or offset + length > self.config.size:
            raise ControllerError(f"range {offset:#x}+{length:#x} is outside the "
                                  f"{self.config.size:#x}-byte data area", ErrorCode.RANGE)
        return offset // PAGE_SIZE, (offset + length) // PAGE_SIZE

    def _check_keyid(self, keyid: int) -> None:
        if not 0 <= keyid < self.keys.keyid_count:
            raise ControllerError(f"KeyID {keyid} out of range 0..{self.keys.keyid_count - 1}")

    def _check_keys_present(self, start: int, end: int) -> None:
        for keyid in self.pages.keyids_in(start, end):
            if self.keys.is_lost(keyid) or (keyid and self.keys.kind(keyid) is SlotKind.TME):
                raise ControllerError(f"keyed relocation needs the key of KeyID {keyid}, "
                                      "which is not programmed", ErrorCode.NO_KEY)

    # -- persistence ----------------------------------------------------------

    def _persist(self, pending: list[Range] | None = None,
                 kinds: Sequence[int] | None = None) -> None:
        self.pages.save(self._stored_config(),
                        self.keys.slot_kinds() if kinds is None else kinds, pending or [])

    def _stored_config(self) -> dict[str, object]:
        c = self.config
        return {"size": c.size, "label_size": c.label_size, "base": self.base, "unit": c.unit,
                "tweak": c.tweak.value, "keyid_bits": c.keyid_bits, "tme": c.tme.value,
                "view": str(c.view), "view_inode": self.view.identity, "page_size": PAGE_SIZE}

    def _save_label(self) -> None:
        if self.config.label_size and bytes(self.view.label) != self.media.read_label():
            atomic_write(self.media.label_path, bytes(self.view.label), io=self._io)
