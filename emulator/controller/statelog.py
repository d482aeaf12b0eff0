"""The page-state log: small changes of the page table, appended instead of rewritten.

The metadata file holds 10 bytes per page (10 MiB for 4 GiB), and replacing
it atomically on every ``map`` of 2 MiB cost tens of milliseconds.  Changes
that touch few pages are appended here instead, one CRC-protected record
per save, made durable (fdatasync) before the request is answered; a large
change, or a log grown past its budget, is a checkpoint: the full metadata
file is replaced and the log emptied.

Crash safety:

- A record is (generation, length, crc32, payload); a torn or damaged
  record ends the log: it and anything after it are ignored (a save that
  did not finish was never acknowledged).
- Every checkpoint writes the metadata with a new generation number, then
  empties the log.  Records of another generation are ignored, so a crash
  between the two never replays stale records over newer metadata.
- The first save after opening is always a checkpoint, so appends never
  follow a torn tail.
- A record that only clears fills in progress (the second half of a
  ``map``) is written but not synced: a backend that dies keeps it (the page
  cache survives a process), and a power loss loses the view anyway, whose
  every page is then refilled.

The payload: a JSON header (config, per-KeyID kinds, pending fills, the
changed page ranges), then each range's KeyIDs (<u2) and tweaks (<u8).
"""

from __future__ import annotations

import json
import logging
import os
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import StateError
from ..fileio import FileIO, write_all
from .persist import Metadata, load_metadata

log = logging.getLogger(__name__)

LOG_FILE = "metadata.log"
GENERATION = "log_generation"  # the key of the metadata's config that names its log
_HEAD = struct.Struct("<IQII")  # magic, generation, payload length, crc32 of the rest
_MAGIC = 0x474C534D  # "MSLG"
# Changes up to this many pages are appended; a bigger one is a checkpoint.
APPEND_MAX_PAGES = 1 << 16
# Bytes of zeros written ahead at each checkpoint (see StateLog.checkpointed).
PREALLOCATE = 1 << 20
# The log is checkpointed once it exceeds this many bytes.
LOG_BUDGET = 8 << 20

Range = tuple[int, int]


def load_state(state_dir: Path) -> Metadata | None:
    """The metadata file with the records of its log generation applied, or None."""
    meta = load_metadata(state_dir)
    if meta is None:
        return None
    generation = meta.config.get(GENERATION, 0)
    try:
        raw = (state_dir / LOG_FILE).read_bytes()
    except FileNotFoundError:
        return meta
    try:
        for header, body in _records(raw, generation):
            _apply(meta, header, body)
    except (ValueError, KeyError, TypeError, IndexError, struct.error) as exc:  # json, numpy
        raise StateError(f"{state_dir / LOG_FILE}: malformed state log record ({exc})") from None
    return meta


def _records(raw: bytes, generation: object) -> list[tuple[dict[str, object], bytes]]:
    out = []
    at = 0
    while at + _HEAD.size <= len(raw):
        magic, gen, length, crc = _HEAD.unpack_from(raw, at)
        payload = raw[at + _HEAD.size:at + _HEAD.size + length]
        if (magic != _MAGIC or gen != generation or len(payload) != length
                or zlib.crc32(payload, zlib.crc32(raw[at + 4:at + 16])) != crc):
            break  # a torn tail, a stale generation, or the zeros after the end
        (header_len,) = struct.unpack_from("<I", payload)
        out.append((json.loads(payload[4:4 + header_len]), payload[4 + header_len:]))
        at += _HEAD.size + length
    return out


def _apply(meta: Metadata, header: dict[str, object], body: bytes) -> None:
    """One record over ``meta``; a record that does not fit is left for Metadata.check."""
    config = dict(header["config"])  # type: ignore[call-overload]
    config[GENERATION] = meta.config.get(GENERATION, 0)
    meta.config = config
    meta.keyid_kind = np.asarray(header["kinds"], np.uint8)
    meta.pending_fill = [(int(a), int(b)) for a, b in header["pending"]]  # type: ignore[attr-defined]
    at = 0
    pages = len(meta.page_keyid)
    for start, end in header["ranges"]:  # type: ignore[attr-defined]
        n = int(end) - int(start)
        if not 0 <= int(start) < int(end) <= pages or at + 10 * n > len(body):
            raise ValueError(f"state log range {start}..{end} outside {pages} pages")
        meta.page_keyid[start:end] = np.frombuffer(body, "<u2", n, at)
        meta.page_tweak[start:end] = np.frombuffer(body, "<u8", n, at + 2 * n)
        at += 10 * n


class StateLog:
    """Appends page-state records to ``metadata.log``; not thread-safe.

    The file is opened per write (two syscalls), so there is nothing to close.

    ``generation`` is the one of the metadata file on disk.  Every method
    that writes goes through ``io`` and raises its OSError.
    """

    def __init__(self, state_dir: Path, io: FileIO, generation: int) -> None:
        self.path = state_dir / LOG_FILE
        self.generation = generation
        self._io = io
        self._end = 0
        self._must_checkpoint = True  # never append after a tail we did not write
        self._last: tuple[str, list[int], list[Range]] | None = None

    def force_checkpoint(self) -> None:
        self._must_checkpoint = True

    def wants_checkpoint(self, changed_pages: int, record_size: int) -> bool:
        return (self._must_checkpoint or changed_pages > APPEND_MAX_PAGES
                or self._end + record_size > LOG_BUDGET)

    def append(self, config: dict[str, object], kinds: Sequence[int], pending: Sequence[Range],
               changed: Sequence[Range], keyid: np.ndarray, tweak: np.ndarray) -> None:
        """Append (and, unless it only clears pending fills, fdatasync) one record."""
        record = encode_record(self.generation, config, kinds, pending, changed, keyid, tweak)
        fd = self._io.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            write_all(self._io, fd, record, self._end)
            if not self._only_clears(config, kinds, pending, changed):
                self._io.fdatasync(fd)
        except BaseException:
            self._must_checkpoint = True  # what follows the last good record is unknown
            raise
        finally:
            self._io.close(fd)
        self._end += len(record)
        self._last = (json.dumps(config, sort_keys=True), list(kinds), list(pending))

    def _only_clears(self, config: dict[str, object], kinds: Sequence[int],
                     pending: Sequence[Range], changed: Sequence[Range]) -> bool:
        if changed or self._last is None:
            return False
        last_config, last_kinds, last_pending = self._last
        return (json.dumps(config, sort_keys=True) == last_config and list(kinds) == last_kinds
                and set(pending) <= set(last_pending))

    def checkpointed(self, generation: int, config: dict[str, object], kinds: Sequence[int],
                     pending: Sequence[Range]) -> None:
        """The metadata of ``generation`` is durable: empty the log (its records are stale).

        Never raises OSError: the save already took effect, and a request
        must not be refused after it did.  A log that cannot be emptied only
        holds records of an older generation (ignored); the next save is then
        a checkpoint again, so nothing is ever appended after them.
        """
        self.generation = generation
        self._must_checkpoint = True
        self._end = 0
        try:
            fd = self._io.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                self._io.ftruncate(fd, 0)
                self._must_checkpoint = False
                # Zeros written ahead (synced with the first record): a record that
                # overwrites them needs no inode update, so its fdatasync is one
                # data write (1.9 ms here, against 3.2 ms for an append).
                write_all(self._io, fd, bytes(PREALLOCATE), 0)
            finally:
                self._io.close(fd)
        except OSError as exc:
            log.warning("state log %s: %s; the next save rewrites the metadata", self.path, exc)
        self._last = (json.dumps(config, sort_keys=True), list(kinds), list(pending))


def encode_record(generation: int, config: dict[str, object], kinds: Sequence[int],
                  pending: Sequence[Range], changed: Sequence[Range],
                  keyid: np.ndarray, tweak: np.ndarray) -> bytes:
    header = json.dumps({"config": config, "kinds": [int(k) for k in kinds],
                         "pending": [list(r) for r in pending],
                         "ranges": [list(r) for r in changed]}).encode()
    parts = [struct.pack("<I", len(header)), header]
    for start, end in changed:
        parts.append(keyid[start:end].astype("<u2").tobytes())
        parts.append(tweak[start:end].astype("<u8").tobytes())
    payload = b"".join(parts)
    head = struct.pack("<QI", generation, len(payload))
    crc = zlib.crc32(payload, zlib.crc32(head))
    return struct.pack("<I", _MAGIC) + head + struct.pack("<I", crc) + payload
