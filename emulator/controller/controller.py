"""The emulated TME-MK memory controller for one NVDIMM.

Every public method is a hardware request: it validates first (raising
:class:`ControllerError`, nothing changed), then acts, then persists the
per-page state before returning.  Methods block on disk I/O (fdatasync) and
on the CPU; they are not thread-safe, the service serialises them.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..crypto import XtsKey, XtsPool
from ..errors import ControllerError, ErrorCode, StateError
from ..fileio import atomic_write
from ..keytable import KeyStatus, KeyTable, SlotKind, TmePolicy
from .config import PAGE_SIZE, ControllerConfig, TweakMode
from .media import JOURNAL_BATCH_PAGES, Media
from .persist import JournalRecord, Metadata, PageState, load_metadata, save_metadata
from .view import View

log = logging.getLogger(__name__)

# Pages handled per round: bounds the two scratch buffers (2 x 4 MiB).
CHUNK_PAGES = 1024
_PERSISTED_CONFIG = ("size", "label_size", "unit", "tweak", "keyid_bits", "tme")


class RelocateMode(enum.Enum):
    RAW = "raw"  # copy media as it is (a KeyID-unaware mover)
    KEYED = "keyed"  # decrypt at src, encrypt at dst; carries KeyID and tweak


@dataclass(frozen=True)
class PageInfo:
    """What ``inspect`` reports for one page; never key material."""

    offset: int
    keyid: int
    kind: str
    locked: bool  # mapped with a KeyID whose key this backend no longer has
    logical_tweak: int
    view_head: bytes
    media_head: bytes
    consistent: bool | None  # media == write-back(view)? None when locked


@dataclass
class Stats:
    """Counters since the backend started."""

    pages_filled: int = 0
    pages_written_back: int = 0
    bytes_encrypted: int = 0
    bytes_decrypted: int = 0
    flushes: int = 0
    flush_seconds_total: float = 0.0
    flush_seconds_max: float = 0.0
    power_cycles: int = 0
    key_programs: int = 0

    def as_dict(self) -> dict[str, float | int]:
        return dict(vars(self))


class MemoryController:
    """Media + view + KeyID table + per-page KeyIDs of one emulated NVDIMM."""

    def __init__(self, config: ControllerConfig, *, keytable: KeyTable | None = None) -> None:
        self.config = config
        config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        stored = load_metadata(config.state_dir)
        if stored is not None:
            _check_same_device(config, stored)
        self.keys = keytable or KeyTable(config.keyid_bits, config.tme, config.state_dir)
        self.media = Media(config.state_dir, config.size, config.label_size)
        self.view = View(config.view, config.size, config.label_size)
        self._pool = XtsPool(config.unit)
        self._scratch = bytearray(CHUNK_PAGES * PAGE_SIZE)
        self._scratch2 = bytearray(CHUNK_PAGES * PAGE_SIZE)
        self.stats = Stats()
        self._locked: set[int] = set()
        self.base = 0
        self._start(stored, self.media.replay())

    # -- start-up ----------------------------------------------------------

    def _start(self, stored: Metadata | None, replayed: JournalRecord | None) -> None:
        """Load or create the state; finish what a crash interrupted; fill the view.

        ``replayed`` is the journal batch a crash interrupted (already back on
        the media); the page states it carries are applied here, and it is
        retired once they are persisted.
        """
        pages, keyids = self.config.pages, self.keys.keyid_count
        if stored is None:
            self.page_keyid = np.zeros(pages, np.uint16)
            self.page_tweak = np.arange(pages, dtype=np.uint64)
            self.keyid_kind = np.zeros(keyids, np.uint8)
            self.base = self.config.base or 0
            self._restore_label()
            self._refill([(0, pages)])
            self.media.journal.retire()
            return
        self.page_keyid, self.page_tweak = stored.page_keyid, stored.page_tweak
        self.keyid_kind = stored.keyid_kind
        self.base = int(stored.config["base"])  # type: ignore[call-overload]
        self._recover_keys()
        pending = list(stored.pending_fill) + self._apply_replayed_states(replayed)
        if not self._view_is_current(stored):
            self._restore_label()
            pending = [(0, pages)]
        # A fill a crash interrupted is marked pending in the metadata; so is
        # the whole view when it is new, so a crash mid-fill never leaves a
        # half-filled view that a later start would trust and write back.
        self._refill(pending)
        self.media.journal.retire()
        if self.config.base is not None and self.config.base != self.base:
            self.set_base(self.config.base)

    def _apply_replayed_states(self, replayed: JournalRecord | None) -> list[tuple[int, int]]:
        """Page states carried by a replayed journal batch; returns the pages to refill."""
        if replayed is None or replayed.states is None:
            return []
        touched = []
        for (offset, _), state in zip(replayed.pages, replayed.states, strict=True):
            page = offset // PAGE_SIZE
            self.page_keyid[page], self.page_tweak[page] = state.keyid, state.tweak
            touched.append(page)
        return _ranges(np.asarray(sorted(touched)))

    def _view_is_current(self, stored: Metadata) -> bool:
        """Is the view file the one this device last served (not new, not another's)?

        A view of the right size is only trusted when it is the very file
        recorded in the metadata (same device and inode): a stale view left
        under another path must not be written back over newer media.
        """
        return self.view.reattached and stored.config.get("view_inode") == self.view.identity

    def _recover_keys(self) -> None:
        """After a restart: which KeyIDs lost their key (SPEC 3, "what a crash may cost")."""
        in_use = set(np.unique(self.page_keyid).tolist())
        for keyid, kind in enumerate(self.keyid_kind.tolist()):
            if kind == SlotKind.NO_ENCRYPT:
                self.keys.restore_no_encrypt(keyid)
            elif keyid not in in_use:
                self.keyid_kind[keyid] = SlotKind.TME  # its key is gone, and no page needs it
            elif kind != SlotKind.TME or self.config.tme is TmePolicy.EPHEMERAL:
                # A user or random key, or the ephemeral platform key, died with
                # the old process.  The kind stays persisted, so a second
                # restart still knows these pages are locked.
                self._locked.add(keyid)
        for keyid in sorted(self._locked):
            count = int(np.count_nonzero(self.page_keyid == keyid))
            log.warning("KeyID %d: key lost in a backend restart; %d pages locked until it is "
                        "programmed again (they are never written back)", keyid, count)

    # -- the hardware requests ---------------------------------------------

    def program_key(self, raw: bytes) -> KeyStatus:
        """PCONFIG MKTME_KEY_PROGRAM; pages of the KeyID switch keys (write back, fill)."""
        prepared = self.keys.prepare(raw)
        if isinstance(prepared, KeyStatus):
            return prepared
        keyid = prepared.keyid
        affected = np.flatnonzero(self.page_keyid == keyid)
        ranges = _ranges(affected)
        for start, end in ranges:
            self._write_back(start, end)
        self.media.sync()
        with self._undo_on_error():
            self.keyid_kind[keyid] = prepared.kind
            self._persist(pending=ranges)
        self.keys.commit(prepared)
        self._locked.discard(keyid)
        self.stats.key_programs += 1
        self._finish_fill(ranges)
        return KeyStatus.PROG_SUCCESS

    def map_range(self, offset: int, length: int, keyid: int,
                  logical_tweak: int | None = None) -> None:
        """Give pages a KeyID (encrypt_mprotect): write back under the old, fill under the new."""
        start, end = self._page_range(offset, length)
        self._check_keyid(keyid)
        if logical_tweak is not None and self.config.tweak not in (TweakMode.LOGICAL, TweakMode.DUN):
            raise ControllerError("a logical tweak needs the device in logical or dun tweak mode")
        if logical_tweak is not None and not 0 <= logical_tweak <= 2**64 - (end - start):
            raise ControllerError("logical tweak out of range (64-bit page tweak)")
        self._write_back(start, end)
        self.media.sync()
        with self._undo_on_error():
            self.page_keyid[start:end] = keyid
            if logical_tweak is not None:
                self.page_tweak[start:end] = (np.arange(end - start, dtype=np.uint64)
                                              + np.uint64(logical_tweak))
            self._persist(pending=[(start, end)])
        self._finish_fill([(start, end)])

    def flush(self, offset: int = 0, length: int | None = None) -> int:
        """Write back what changed; returns pages written. Durable on return."""
        start, end = (0, self.config.pages) if length is None else self._page_range(offset, length)
        began = time.perf_counter()
        written = self._write_back(start, end)
        if length is None:
            self._save_label()
        self.media.sync()
        self._account_flush(time.perf_counter() - began)
        return written

    def relocate(self, src: int, dst: int, length: int, mode: RelocateMode) -> None:
        """Move data on the media from src to dst (both written back first, dst refilled)."""
        s0, s1 = self._page_range(src, length)
        d0, d1 = self._page_range(dst, length)
        if s0 < d1 and d0 < s1:
            raise ControllerError("relocation source and destination overlap", ErrorCode.RANGE)
        if mode is RelocateMode.KEYED:
            self._check_keys_present(s0, s1)
        self._write_back(s0, s1)
        self._write_back(d0, d1)
        if mode is RelocateMode.RAW:
            self._copy_media(s0, d0, s1 - s0)
        else:
            self._keyed_copy(s0, d0, s1 - s0)
        self.media.sync()
        self._refill([(d0, d1)])

    def power_cycle(self) -> None:
        """Write back everything, forget keys, every page back to KeyID 0, refill."""
        self._write_back(0, self.config.pages)
        self._save_label()
        self.media.sync()
        self.keys.power_cycle()
        self._locked.clear()
        self.page_keyid[:] = 0
        self.page_tweak[:] = np.arange(self.config.pages, dtype=np.uint64)
        self.keyid_kind[:] = SlotKind.TME
        self.stats.power_cycles += 1
        self._refill([(0, self.config.pages)])

    def set_base(self, base: int) -> None:
        """The NVDIMM's guest physical base (from QMP); a move is logged and refills."""
        if base < 0 or base % PAGE_SIZE:
            raise ControllerError(f"base {base:#x} is not a 4K-aligned physical address")
        if base == self.base:
            return
        log.warning("NVDIMM base moved from %#x to %#x%s", self.base, base,
                    " (spa tweaks: ciphertext will not decrypt at the new place)"
                    if self.config.tweak is TweakMode.SPA else "")
        self._write_back(0, self.config.pages)
        self.media.sync()
        self.base = base
        self._refill([(0, self.config.pages)])

    def inspect(self, offset: int, count: int = 1) -> list[PageInfo]:
        """Per-page KeyID, kind and whether media == write-back(view)."""
        start, end = self._page_range(offset, count * PAGE_SIZE)
        return [self._page_info(page) for page in range(start, end)]

    def locked_pages(self) -> dict[int, int]:
        """KeyID -> number of pages locked because its key was lost in a restart."""
        return {k: int(np.count_nonzero(self.page_keyid == k)) for k in sorted(self._locked)}

    def close(self) -> None:
        """Write everything back and release the files (SIGTERM path)."""
        self.flush()
        self._persist()
        self._pool.close()
        self.view.close()
        self.media.close()

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
        for keyid in np.unique(self.page_keyid[start:end]).tolist():
            if keyid in self._locked or (keyid and self.keys.kind(keyid) is SlotKind.TME):
                raise ControllerError(f"keyed relocation needs the key of KeyID {keyid}, "
                                      "which is not programmed", ErrorCode.NO_KEY)

    # -- moving pages between media and view ---------------------------------

    def _tweak_base(self, page: int) -> int:
        if self.config.tweak is TweakMode.SPA:
            return self.base + page * PAGE_SIZE
        if self.config.tweak is TweakMode.DPA:
            return page * PAGE_SIZE
        if self.config.tweak is TweakMode.DUN:  # the page tweak is the data unit number itself
            return int(self.page_tweak[page])
        return int(self.page_tweak[page]) * PAGE_SIZE

    def _runs(self, start: int, end: int) -> Iterator[tuple[int, int, int]]:
        """(start, end, keyid) runs of pages sharing a KeyID and a contiguous tweak."""
        keyids = self.page_keyid[start:end]
        cuts = np.flatnonzero(keyids[1:] != keyids[:-1]) + 1
        if self.config.tweak is TweakMode.LOGICAL:
            tweaks = self.page_tweak[start:end]
            jumps = np.flatnonzero(tweaks[1:] - tweaks[:-1] != 1) + 1
            cuts = np.union1d(cuts, jumps)
        if self.config.tweak is TweakMode.DUN:
            # The engine steps a run's tweak by the unit's byte size, a DUN by one:
            # every encrypted page is a run of its own.
            cuts = np.union1d(cuts, np.flatnonzero(keyids[1:] != 0) + 1)
        bounds = [start, *(cuts + start).tolist(), end]
        for run_start, run_end in itertools.pairwise(bounds):
            for chunk in range(run_start, run_end, CHUNK_PAGES):
                yield chunk, min(chunk + CHUNK_PAGES, run_end), int(self.page_keyid[run_start])

    def _fill(self, start: int, end: int) -> None:
        """view = decrypt(key of each page's KeyID, tweak, media)."""
        for run_start, run_end, keyid in self._runs(start, end):
            offset, length = run_start * PAGE_SIZE, (run_end - run_start) * PAGE_SIZE
            target = self.view.data[offset:offset + length]
            key = None if keyid in self._locked else self.keys.cipher(keyid)
            if key is None:  # no encryption, or locked: the CPU sees the cells as they are
                self.media.read_into(offset, target)
            else:
                staged = memoryview(self._scratch)[:length]
                self.media.read_into(offset, staged)
                self._pool.decrypt_into(key, staged, target, self._tweak_base(run_start))
                self.stats.bytes_decrypted += length
            self.stats.pages_filled += run_end - run_start

    def _refill(self, ranges: list[tuple[int, int]]) -> None:
        """Persist state with the fill marked pending, fill, persist it done.

        A crash mid-fill leaves the pending mark, and the next start fills
        again; the guest has had no answer yet, so no write is lost.
        """
        self._persist(pending=ranges)
        self._finish_fill(ranges)

    def _finish_fill(self, ranges: list[tuple[int, int]]) -> None:
        """Fill ranges already marked pending in the metadata, then clear the mark."""
        for start, end in ranges:
            self._fill(start, end)
        self._persist()

    @contextlib.contextmanager
    def _undo_on_error(self) -> Iterator[None]:
        """Restore the per-page and per-KeyID state if the block raises (say, ENOSPC
        persisting it): a refused request must leave memory as it left the disk."""
        saved = (self.page_keyid.copy(), self.page_tweak.copy(), self.keyid_kind.copy())
        try:
            yield
        except BaseException:
            self.page_keyid[:], self.page_tweak[:], self.keyid_kind[:] = saved
            raise

    def _write_back(self, start: int, end: int) -> int:
        """media = encrypt(view) for every page whose media differs; returns pages written.

        Exact by construction: a page is skipped only when its media already
        equals the write-back of its view.  Locked pages are never written.
        """
        dirty: list[tuple[int, memoryview]] = []
        written = 0
        for run_start, run_end, keyid in self._runs(start, end):
            if keyid in self._locked:
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
            self._pool.encrypt_into(key, source, encrypted, self._tweak_base(start))
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

    def _copy_media(self, src: int, dst: int, count: int) -> None:
        for done in range(0, count, CHUNK_PAGES):
            n = min(CHUNK_PAGES, count - done)
            buf = memoryview(bytearray(n * PAGE_SIZE))
            self.media.read_into((src + done) * PAGE_SIZE, buf)
            pages = [((dst + done + i) * PAGE_SIZE, buf[i * PAGE_SIZE:(i + 1) * PAGE_SIZE])
                     for i in range(n)]
            self._commit_pages(pages)

    def _keyed_copy(self, src: int, dst: int, count: int) -> None:
        """Decrypt at src, encrypt at dst, run by run; KeyID and tweak travel along.

        Each destination page's data and its new KeyID and tweak go into the
        same journal record, so a crash leaves either the old page with its
        old KeyID or the new one with the new KeyID, never a mix.
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
                self._pool.decrypt_into(key, piece, piece, self._tweak_base(run_start))
                self._pool.encrypt_into(key, piece, piece, self._moved_tweak_base(run_start, d0 - s0))
            states = [PageState(int(self.page_keyid[s0 + i]), int(self.page_tweak[s0 + i]))
                      for i in range(n)]
            pages = [((d0 + i) * PAGE_SIZE, data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]) for i in range(n)]

            def applied(first: int, end: int, d0: int = d0, s0: int = s0) -> None:
                self.page_keyid[d0 + first:d0 + end] = self.page_keyid[s0 + first:s0 + end]
                self.page_tweak[d0 + first:d0 + end] = self.page_tweak[s0 + first:s0 + end]
                self._persist(pending=[(dst, dst + count)])

            self.media.write_pages(pages, states, applied)
            self.stats.pages_written_back += n

    def _moved_tweak_base(self, page: int, distance: int) -> int:
        """Tweak base of src page ``page`` once moved ``distance`` pages (logical: unchanged)."""
        if self.config.tweak in (TweakMode.LOGICAL, TweakMode.DUN):
            return self._tweak_base(page)
        return self._tweak_base(page + distance)

    def _page_info(self, page: int) -> PageInfo:
        offset = page * PAGE_SIZE
        keyid = int(self.page_keyid[page])
        locked = keyid in self._locked
        media = bytearray(PAGE_SIZE)
        self.media.read_into(offset, memoryview(media))
        view = bytes(self.view.data[offset:offset + PAGE_SIZE])
        consistent = None
        if not locked:
            key = self.keys.cipher(keyid)
            expected = bytearray(view)
            if key is not None:
                self._pool.encrypt_into(key, view, expected, self._tweak_base(page))
            consistent = expected == media
        kind = SlotKind(int(self.keyid_kind[keyid])).name.lower().replace("_", "-")
        return PageInfo(offset, keyid, kind, locked, int(self.page_tweak[page]),
                        view[:16], bytes(media[:16]), consistent)

    # -- persistence ----------------------------------------------------------

    def _persist(self, pending: list[tuple[int, int]] | None = None) -> None:
        save_metadata(self.config.state_dir, Metadata(
            config=self._stored_config(), page_keyid=self.page_keyid,
            page_tweak=self.page_tweak, keyid_kind=self.keyid_kind,
            pending_fill=list(pending or [])))

    def _stored_config(self) -> dict[str, object]:
        c = self.config
        return {"size": c.size, "label_size": c.label_size, "base": self.base, "unit": c.unit,
                "tweak": c.tweak.value, "keyid_bits": c.keyid_bits, "tme": c.tme.value,
                "view": str(c.view), "view_inode": self.view.identity, "page_size": PAGE_SIZE}

    def _save_label(self) -> None:
        if self.config.label_size and bytes(self.view.label) != self.media.read_label():
            atomic_write(self.media.label_path, bytes(self.view.label))

    def _restore_label(self) -> None:
        if self.config.label_size:
            self.view.label[:] = self.media.read_label()

    def _account_flush(self, seconds: float) -> None:
        s = self.stats
        s.flushes += 1
        s.flush_seconds_total += seconds
        s.flush_seconds_max = max(s.flush_seconds_max, seconds)


def _ranges(pages: np.ndarray) -> list[tuple[int, int]]:
    """Sorted page indices -> [(start, end)) runs."""
    if pages.size == 0:
        return []
    cuts = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = [int(pages[0]), *pages[cuts].tolist()]
    ends = [*(pages[cuts - 1] + 1).tolist(), int(pages[-1]) + 1]
    return list(zip(starts, ends, strict=True))


def _check_same_device(config: ControllerConfig, stored: Metadata) -> None:
    """A state directory belongs to one device shape; refuse to reinterpret it."""
    current = {"size": config.size, "label_size": config.label_size, "unit": config.unit,
               "tweak": config.tweak.value, "keyid_bits": config.keyid_bits,
               "tme": config.tme.value}
    for name in _PERSISTED_CONFIG:
        if stored.config.get(name) != current[name]:
            raise StateError(f"{config.state_dir}: existing device has {name}="
                             f"{stored.config.get(name)}, not {current[name]} "
                             "(use another --state-dir)")
