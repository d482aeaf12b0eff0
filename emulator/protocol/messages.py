"""Request payloads and reply bodies: typed, immutable records next to their byte layouts.

Each request's payload has an exact size; reserved fields and unknown flag
bits must be zero (``unpack`` raises :class:`PayloadError`, which the
backend answers with INVALID before anything changes).  Each reply body is a
record with ``pack`` (the backend) and ``unpack`` (the client).  The
layouts are those of ``docs/protocol.md``; the tests pin them to bytes
written from that page.

The records are NamedTuples, not frozen dataclasses: the guest helpers
import this module for every ``mktme-guest`` call, and under TCG ``import
dataclasses`` costs the guest ~0.12 s (it loads inspect, ast, dis) and each
frozen dataclass another ~20 ms to build (its methods are ``exec``'d).
mypy checks them as ``typing.NamedTuple``s; at run time they are built
without importing typing (:mod:`.record`), ~1.5 ms a class.  They stay
typed and immutable (``_replace``, ``_asdict``); being tuples, compare them
only with records of their own type, and never unpack them by position
where a field may be added.
"""

from __future__ import annotations

import struct

from ..errors import ProtocolError
from ..vocabulary import RelocateMode, TmePolicy, TweakMode
from .framing import U32, U64, Role
from .record import NamedTuple

INSPECT_MAX_PAGES = 256
FEATURES = 0  # no optional features yet; the bit field is for later extensions
RELOCATE_MODES = RelocateMode.names()
TWEAK_MODES = TweakMode.names()
TME_POLICIES = TmePolicy.names()
KINDS = ("tme", "user", "random", "no-encrypt")

MAP_REQ = struct.Struct("<QQIIQ")  # offset, length, keyid, flags (bit 0: tweak valid), tweak
MAP_FLAG_TWEAK = 1
RANGE_REQ = struct.Struct("<QQ")  # offset, length (0 = everything)
RELOCATE_REQ = struct.Struct("<QQQII")  # src, dst, length, mode, reserved
INSPECT_REQ = struct.Struct("<QII")  # offset, count, reserved
FEATURES_REPLY = struct.Struct("<QII")  # features, version, role
CONFIG_REPLY = struct.Struct("<QQQIIIIII")  # size, label, base, unit, tweak, bits, tme, page, locked
FLUSH_REPLY = struct.Struct("<QQ")  # written, unwritable
PAGE_RECORD = struct.Struct("<QQHBBI16s16s")
STATS_REPLY = struct.Struct("<8Q2d")
PAGE_FLAG_LOCKED, PAGE_FLAG_CONSISTENT, PAGE_FLAG_CHECKED = 1, 2, 4
_KEYID_CTRL_RESERVED = 0xFF00_0000


class PayloadError(ProtocolError):
    """A request payload of the wrong size or with non-zero reserved bits."""


def _exact(payload: bytes, layout: struct.Struct, name: str) -> tuple[int, ...]:
    if len(payload) != layout.size:
        raise PayloadError(f"{name} payload is {len(payload)} bytes, expected {layout.size}")
    return layout.unpack(payload)


def expect_empty(payload: bytes, name: str) -> None:
    """GET_FEATURES, GET_CONFIG, POWER_CYCLE, STATS, GET_VIEW_FD carry nothing."""
    if payload:
        raise PayloadError(f"{name} takes no payload, got {len(payload)} bytes")


def check_key_program(payload: bytes) -> bytes:
    """The 192-byte struct with KEYID_CTRL bits 31:24 and bytes 6..63 zero."""
    from ..pconfig import STRUCT_SIZE  # here: the guest's light commands never program keys

    if len(payload) != STRUCT_SIZE:
        raise PayloadError(f"KEY_PROGRAM payload is {len(payload)} bytes, expected {STRUCT_SIZE}")
    if U32.unpack_from(payload, 2)[0] & _KEYID_CTRL_RESERVED:
        raise PayloadError("KEYID_CTRL bits 31:24 are reserved and must be 0")
    if any(payload[6:64]):
        raise PayloadError("bytes 6..63 of the key program struct are reserved and must be 0")
    return payload


# -- requests ---------------------------------------------------------------------------

class MapRequest(NamedTuple):
    """MAP: give pages a KeyID (and, in logical/dun tweak modes, a page tweak)."""

    offset: int
    length: int
    keyid: int
    page_tweak: int | None = None

    def pack(self) -> bytes:
        flags = MAP_FLAG_TWEAK if self.page_tweak is not None else 0
        return MAP_REQ.pack(self.offset, self.length, self.keyid, flags, self.page_tweak or 0)

    @classmethod
    def unpack(cls, payload: bytes) -> MapRequest:
        offset, length, keyid, flags, tweak = _exact(payload, MAP_REQ, "MAP")
        if flags & ~MAP_FLAG_TWEAK:
            raise PayloadError(f"unknown MAP flag bits {flags & ~MAP_FLAG_TWEAK:#x}")
        if not flags & MAP_FLAG_TWEAK and tweak:
            raise PayloadError("MAP carries a tweak but flags bit 0 (tweak valid) is clear")
        return cls(offset, length, keyid, tweak if flags & MAP_FLAG_TWEAK else None)


class FlushRequest(NamedTuple):
    """FLUSH: write back a range, or everything when length is 0 (then offset must be 0)."""

    offset: int = 0
    length: int = 0

    def pack(self) -> bytes:
        return RANGE_REQ.pack(self.offset, self.length)

    @classmethod
    def unpack(cls, payload: bytes) -> FlushRequest:
        offset, length = _exact(payload, RANGE_REQ, "FLUSH")
        if length == 0 and offset != 0:
            raise PayloadError("FLUSH of the whole device (length 0) takes offset 0")
        return cls(offset, length)


class RelocateRequest(NamedTuple):
    src: int
    dst: int
    length: int
    mode: RelocateMode

    def pack(self) -> bytes:
        return RELOCATE_REQ.pack(self.src, self.dst, self.length, self.mode.wire, 0)

    @classmethod
    def unpack(cls, payload: bytes) -> RelocateRequest:
        src, dst, length, mode, reserved = _exact(payload, RELOCATE_REQ, "RELOCATE")
        if reserved:
            raise PayloadError("RELOCATE's reserved field must be 0")
        try:
            return cls(src, dst, length, RelocateMode.from_wire(mode))
        except ValueError:
            raise PayloadError(f"unknown relocation mode {mode}") from None


class InspectRequest(NamedTuple):
    offset: int
    count: int = 1  # type: ignore[assignment]  # the wire's name; it hides tuple.count, unused here

    def pack(self) -> bytes:
        return INSPECT_REQ.pack(self.offset, self.count, 0)

    @classmethod
    def unpack(cls, payload: bytes) -> InspectRequest:
        offset, count, reserved = _exact(payload, INSPECT_REQ, "INSPECT")
        if reserved:
            raise PayloadError("INSPECT's reserved field must be 0")
        if not 1 <= count <= INSPECT_MAX_PAGES:
            raise PayloadError(f"INSPECT takes 1..{INSPECT_MAX_PAGES} pages, not {count}")
        return cls(offset, count)


def unpack_base(payload: bytes) -> int:
    """SET_BASE: one u64."""
    return int(_exact(payload, U64, "SET_BASE")[0])


# -- replies ----------------------------------------------------------------------------

def _reply_size(body: bytes, layout: struct.Struct, name: str, *, at_least: bool = False) -> None:
    if len(body) < layout.size or (not at_least and len(body) != layout.size):
        raise ProtocolError(f"{name} reply is {len(body)} bytes, expected {layout.size}")


class Features(NamedTuple):
    """GET_FEATURES: the feature bits, the protocol version and this connection's role."""

    features: int
    version: int
    role: Role

    def pack(self) -> bytes:
        return FEATURES_REPLY.pack(self.features, self.version, self.role)

    @classmethod
    def unpack(cls, body: bytes) -> Features:
        _reply_size(body, FEATURES_REPLY, "GET_FEATURES")
        features, version, role = FEATURES_REPLY.unpack(body)
        if role not in iter(Role):
            raise ProtocolError(f"GET_FEATURES reply with unknown role {role}")
        return cls(features, version, Role(role))

    def as_dict(self) -> dict[str, object]:
        return {"features": self.features, "version": self.version, "role": int(self.role)}


class DeviceConfig(NamedTuple):
    """GET_CONFIG: the device's geometry and modes; ``view`` only for the admin role."""

    size: int
    label_size: int
    base: int
    unit: int
    tweak: TweakMode
    keyid_bits: int
    tme: TmePolicy
    page_size: int
    locked_pages: int
    view: str | None = None

    def pack(self) -> bytes:
        return CONFIG_REPLY.pack(self.size, self.label_size, self.base, self.unit, self.tweak.wire,
                                 self.keyid_bits, self.tme.wire, self.page_size,
                                 self.locked_pages) + (self.view or "").encode()

    @classmethod
    def unpack(cls, body: bytes) -> DeviceConfig:
        _reply_size(body, CONFIG_REPLY, "GET_CONFIG", at_least=True)
        size, label, base, unit, tweak, bits, tme, page, locked = CONFIG_REPLY.unpack_from(body)
        try:
            modes = TweakMode.from_wire(tweak), TmePolicy.from_wire(tme)
        except ValueError as exc:
            raise ProtocolError(f"GET_CONFIG reply: {exc}") from None
        view = body[CONFIG_REPLY.size:].decode(errors="replace") or None
        return cls(size, label, base, unit, modes[0], bits, modes[1], page, locked, view)

    def as_dict(self) -> dict[str, object]:
        """JSON-ready: modes by name."""
        return {**self._asdict(), "tweak": self.tweak.value, "tme": self.tme.value}


class FlushReply(NamedTuple):
    """FLUSH: pages written back, and pages that could not be (their KeyID's key is lost)."""

    written: int
    unwritable: int = 0

    def pack(self) -> bytes:
        return FLUSH_REPLY.pack(self.written, self.unwritable)

    def __str__(self) -> str:
        """What ``flush`` prints, on the host and in the guest alike."""
        lost = f", {self.unwritable} not (their KeyID's key is lost)" if self.unwritable else ""
        return f"{self.written} pages written back{lost}"

    @classmethod
    def unpack(cls, body: bytes) -> FlushReply:
        _reply_size(body, FLUSH_REPLY, "FLUSH")
        return cls(*FLUSH_REPLY.unpack(body))


class Stats(NamedTuple):
    """STATS: the backend's counters since it started."""

    pages_filled: int
    pages_written_back: int
    bytes_encrypted: int
    bytes_decrypted: int
    flushes: int
    power_cycles: int
    key_programs: int
    locked_pages: int
    flush_seconds_total: float
    flush_seconds_max: float
    busy: str = ""  # the request running and its progress; "" when idle

    def pack(self) -> bytes:
        *counters, busy = self
        return STATS_REPLY.pack(*counters) + str(busy).encode()

    @classmethod
    def unpack(cls, body: bytes) -> Stats:
        _reply_size(body, STATS_REPLY, "STATS", at_least=True)
        busy = body[STATS_REPLY.size:].decode(errors="replace")
        (filled, written, encrypted, decrypted, flushes, cycles, programs, locked, total,
         longest) = STATS_REPLY.unpack_from(body)
        return cls(filled, written, encrypted, decrypted, flushes, cycles, programs, locked,
                   total, longest, busy)

    def as_dict(self) -> dict[str, object]:
        return self._asdict()


class PageRecord(NamedTuple):
    """One page as INSPECT reports it (56 bytes on the wire)."""

    offset: int
    logical_tweak: int
    keyid: int
    kind: str  # one of KINDS
    locked: bool
    consistent: bool | None  # None: not checked (the page is locked)
    view_head: bytes
    media_head: bytes

    def pack(self) -> bytes:
        flags = ((PAGE_FLAG_LOCKED if self.locked else 0)
                 | (PAGE_FLAG_CHECKED if self.consistent is not None else 0)
                 | (PAGE_FLAG_CONSISTENT if self.consistent else 0))
        return PAGE_RECORD.pack(self.offset, self.logical_tweak, self.keyid, KINDS.index(self.kind),
                                flags, 0, self.view_head, self.media_head)

    @classmethod
    def unpack_from(cls, raw: bytes, offset: int = 0) -> PageRecord:
        off, tweak, keyid, kind, flags, _, view, media = PAGE_RECORD.unpack_from(raw, offset)
        if kind >= len(KINDS):
            raise ProtocolError(f"INSPECT record with unknown kind {kind}")
        consistent = bool(flags & PAGE_FLAG_CONSISTENT) if flags & PAGE_FLAG_CHECKED else None
        return cls(off, tweak, keyid, KINDS[kind], bool(flags & PAGE_FLAG_LOCKED), consistent, view, media)

    def as_dict(self) -> dict[str, object]:
        return {"offset": self.offset, "keyid": self.keyid, "kind": self.kind, "locked": self.locked,
                "logical_tweak": self.logical_tweak, "consistent": self.consistent,
                "view_head": self.view_head.hex(), "media_head": self.media_head.hex()}


def pack_inspect(records: list[PageRecord]) -> bytes:
    """INSPECT's reply body: u32 n, then n page records."""
    return U32.pack(len(records)) + b"".join(r.pack() for r in records)


def unpack_inspect(body: bytes) -> list[PageRecord]:
    if len(body) < U32.size:
        raise ProtocolError("INSPECT reply is shorter than its count")
    (n,) = U32.unpack_from(body)
    if len(body) != U32.size + n * PAGE_RECORD.size:
        raise ProtocolError(f"INSPECT reply of {len(body)} bytes does not hold {n} records")
    return [PageRecord.unpack_from(body, U32.size + i * PAGE_RECORD.size) for i in range(n)]
