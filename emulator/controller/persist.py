"""Crash-safe files of the state directory: the metadata file and the page journal.

Metadata (``metadata``): the device configuration, the per-page KeyID and
logical tweak, the per-KeyID kind (user/random/no-encrypt, never a key), and
the page ranges whose view fill was in progress.  It is replaced atomically
(write a temporary file, fsync, rename, fsync the directory), so a reader
finds the old or the new state, never a mix.

Journal (``journal``): the double-write buffer that makes media writes
torn-page-free.  A batch of pages is written to the journal with a CRC and
made durable *before* any of them touches the media; after a crash the last
valid batch is written again (idempotent).  Every media write goes through
it, but a rewrite of the whole media file (see :mod:`.media`), which first
retires the journal durably: so a valid record is always the batch in flight.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import StateError
from ..fileio import OS_IO, FileIO, atomic_write, pwritev_all, write_all
from .config import PAGE_SIZE

METADATA_FILE = "metadata"
JOURNAL_FILE = "journal"
_MD_MAGIC = b"MKTMEMD1"
_MD_HEAD = struct.Struct("<8sI")
_JR_MAGIC = 0x4C4E524A4D544B4D  # "MKTMJRNL"
_JR_HEAD = struct.Struct("<QQIIQ")  # magic, sequence, page count, crc32, flags
_JR_HAS_STATES = 1  # the record carries each page's new KeyID and tweak
# Pages per journal batch: bounds the journal file and the memory a batch pins.
JOURNAL_BATCH_PAGES = 4096
# The largest batch a record may hold: big devices write back in bigger batches
# (fewer fdatasync barriers; see docs/performance.md), and replay accepts them.
JOURNAL_MAX_BATCH_PAGES = 16384
_MD_HEADER_MAX = 1 << 20  # the JSON header is a few hundred bytes


@dataclass
class Metadata:
    """Device configuration and per-page state; contains no key material."""

    config: dict[str, object]
    page_keyid: np.ndarray  # uint16 per page
    page_tweak: np.ndarray  # uint64 per page: the logical page tweak
    keyid_kind: np.ndarray  # uint8 per KeyID: keytable.SlotKind
    pending_fill: list[tuple[int, int]] = field(default_factory=list)

    def encode(self) -> bytes:
        header = json.dumps({"config": self.config, "pending_fill": self.pending_fill,
                             "pages": len(self.page_keyid),
                             "keyids": len(self.keyid_kind)}).encode()
        body = (_MD_HEAD.pack(_MD_MAGIC, len(header)) + header
                + self.page_keyid.astype("<u2").tobytes()
                + self.page_tweak.astype("<u8").tobytes()
                + self.keyid_kind.astype("u1").tobytes())
        return body + struct.pack("<I", zlib.crc32(body))

    @classmethod
    def decode(cls, raw: bytes, where: Path) -> Metadata:
        """Parse and check a metadata file; any damage is one StateError, never a crash."""
        if len(raw) < _MD_HEAD.size + 4 or raw[:8] != _MD_MAGIC:
            raise StateError(f"{where}: not an mktme-emu metadata file")
        body, (crc,) = raw[:-4], struct.unpack("<I", raw[-4:])
        if zlib.crc32(body) != crc:
            raise StateError(f"{where}: metadata checksum mismatch (damaged file)")
        try:
            return cls._decode_body(body, where)
        except (ValueError, KeyError, TypeError) as exc:  # json, numpy, shapes
            raise StateError(f"{where}: malformed metadata ({exc})") from None

    @classmethod
    def _decode_body(cls, body: bytes, where: Path) -> Metadata:
        _, header_len = _MD_HEAD.unpack_from(body)
        if header_len > min(_MD_HEADER_MAX, len(body) - _MD_HEAD.size):
            raise StateError(f"{where}: metadata header length {header_len} is impossible")
        start = _MD_HEAD.size + header_len
        header = json.loads(body[_MD_HEAD.size:start])
        pages, keyids = int(header["pages"]), int(header["keyids"])
        if pages < 0 or keyids < 0 or len(body) != start + 10 * pages + keyids:
            raise StateError(f"{where}: metadata of {len(body)} bytes cannot hold "
                             f"{pages} pages and {keyids} KeyIDs")
        keyid = np.frombuffer(body, "<u2", pages, start).astype(np.uint16)
        tweak = np.frombuffer(body, "<u8", pages, start + 2 * pages).astype(np.uint64)
        kinds = np.frombuffer(body, "u1", keyids, start + 10 * pages).astype(np.uint8)
        pending = [(int(a), int(b)) for a, b in header.get("pending_fill", [])]
        if not isinstance(header["config"], dict):
            raise StateError(f"{where}: metadata without a device configuration")
        return cls(header["config"], keyid, tweak, kinds, pending)

    def check(self, pages: int, keyids: int, kinds: int, where: Path) -> None:
        """Refuse metadata that does not fit the device: no later step may trust it blindly."""
        if len(self.page_keyid) != pages or len(self.keyid_kind) != keyids:
            raise StateError(f"{where}: metadata holds {len(self.page_keyid)} pages and "
                             f"{len(self.keyid_kind)} KeyIDs, the device has {pages} and {keyids}")
        if pages and int(self.page_keyid.max()) >= keyids:
            raise StateError(f"{where}: a page has KeyID {int(self.page_keyid.max())}, "
                             f"beyond the device's {keyids}")
        if keyids and int(self.keyid_kind.max()) >= kinds:
            raise StateError(f"{where}: unknown KeyID kind {int(self.keyid_kind.max())}")
        for start, end in self.pending_fill:
            if not 0 <= start < end <= pages:
                raise StateError(f"{where}: pending fill {start}..{end} outside {pages} pages")


def save_metadata(state_dir: Path, meta: Metadata, io: FileIO = OS_IO) -> None:
    """Replace the metadata file atomically and durably. Blocks on fsync; raises OSError."""
    atomic_write(state_dir / METADATA_FILE, meta.encode(), io=io)


def load_metadata(state_dir: Path) -> Metadata | None:
    """The stored metadata, or None for a new state directory."""
    path = state_dir / METADATA_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    return Metadata.decode(raw, path)


@dataclass(frozen=True)
class PageState:
    """A page's KeyID and logical tweak, carried by a journal record with its data."""

    keyid: int
    tweak: int


@dataclass
class JournalRecord:
    """A batch of pages (media offset, data) and, optionally, their new per-page state."""

    pages: list[tuple[int, bytes]]
    states: list[PageState] | None = None


class Journal:
    """Double-write buffer for media pages. Not thread-safe (the controller serialises).

    A record may carry each page's new KeyID and tweak: a page whose media
    and KeyID change together (keyed relocation) then changes atomically,
    since a restart replays both.
    """

    def __init__(self, path: Path, io: FileIO = OS_IO) -> None:
        self.path = path
        self._io = io
        self._fd = io.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self._sequence = 0
        self._durably_retired = -1  # unknown at start: the first rewrite syncs a retire

    def close(self) -> None:
        self._io.close(self._fd)

    def record(self, pages: Sequence[tuple[int, bytes | memoryview]],
               states: Sequence[PageState] | None = None) -> None:
        """Make a batch durable in the journal. Blocks on fdatasync."""
        index = np.asarray([offset for offset, _ in pages], dtype="<u8").tobytes()
        meta = b""
        if states is not None:
            meta = (np.asarray([s.keyid for s in states], dtype="<u8").tobytes()
                    + np.asarray([s.tweak for s in states], dtype="<u8").tobytes())
        chunks = [page for _, page in pages]
        crc = zlib.crc32(meta, zlib.crc32(index))
        for chunk in chunks:
            crc = zlib.crc32(chunk, crc)
        self._sequence += 1
        flags = _JR_HAS_STATES if states is not None else 0
        header = _JR_HEAD.pack(_JR_MAGIC, self._sequence, len(pages), crc, flags)
        buffers: list[bytes | memoryview] = [header, index, meta, *chunks]
        pwritev_all(self._io, self._fd, buffers, 0)
        self._io.fdatasync(self._fd)

    def retire(self) -> None:
        """Mark the batch applied (a lost retire only means an idempotent replay)."""
        write_all(self._io, self._fd, bytes(_JR_HEAD.size), 0)

    def retire_durably(self) -> None:
        """Retire, and make it survive a power loss, if a record was written since the
        last durable retire.  Needed before the media changes other than through the
        journal (a rewrite of the media file): a replay is idempotent only while every
        media write goes through the journal, and a stale record would put older pages
        over the rewrite.  Blocks on fdatasync."""
        if self._sequence != self._durably_retired:
            self.retire()
            self._io.fdatasync(self._fd)
            self._durably_retired = self._sequence

    def pending(self, device_size: int, keyids: int) -> JournalRecord | None:
        """The last batch if it is complete and valid, else None.

        A complete record that does not fit the device (a page outside
        ``device_size``, a KeyID beyond ``keyids``, more pages than a batch
        holds) is refused with StateError rather than replayed: replaying it
        would grow or scribble over the media.
        """
        head = os.pread(self._fd, _JR_HEAD.size, 0)
        if len(head) < _JR_HEAD.size:
            return None
        magic, sequence, count, crc, flags = _JR_HEAD.unpack(head)
        if magic != _JR_MAGIC or count == 0:
            return None
        if count > JOURNAL_MAX_BATCH_PAGES or flags & ~_JR_HAS_STATES:
            raise StateError(f"{self.path}: journal record of {count} pages (flags {flags:#x}) "
                             f"is not one this program writes (at most {JOURNAL_MAX_BATCH_PAGES}); "
                             "damaged or crafted: move it away to start without it")
        meta_size = 16 * count if flags & _JR_HAS_STATES else 0
        body_size = 8 * count + meta_size + PAGE_SIZE * count
        body = os.pread(self._fd, body_size, _JR_HEAD.size)
        if len(body) != body_size or zlib.crc32(body) != crc:
            return None
        record = self._parse(body, count, meta_size)
        self._check(record, device_size, keyids)
        self._sequence = sequence
        return record

    def _check(self, record: JournalRecord, device_size: int, keyids: int) -> None:
        for offset, _ in record.pages:
            if offset % PAGE_SIZE or offset + PAGE_SIZE > device_size:
                raise StateError(f"{self.path}: journal record writes a page at {offset:#x}, "
                                 f"outside the {device_size:#x}-byte device; damaged or crafted: "
                                 "move it away to start without it")
        for state in record.states or []:
            if state.keyid >= keyids:
                raise StateError(f"{self.path}: journal record gives a page KeyID "
                                 f"{state.keyid}, beyond the device's {keyids}")

    @staticmethod
    def _parse(body: bytes, count: int, meta_size: int) -> JournalRecord:
        offsets = np.frombuffer(body, "<u8", count)
        data = body[8 * count + meta_size:]
        pages = [(int(off), data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]) for i, off in enumerate(offsets)]
        states = None
        if meta_size:
            keyids = np.frombuffer(body, "<u8", count, 8 * count)
            tweaks = np.frombuffer(body, "<u8", count, 16 * count)
            states = [PageState(int(k), int(t)) for k, t in zip(keyids, tweaks, strict=True)]
        return JournalRecord(pages, states)
