"""Framing of protocol version 2: the 24-byte header, tags, request numbers, roles.

Every message is a header followed by ``size`` payload bytes (little-endian)::

    0  u32 request   4  u32 flags   8  u32 size   12  u32 reserved (0)   16  u64 tag

``flags`` bits 1:0 are the protocol version (2), bit 2 marks a reply, bit 3
asks for a reply to a request that would otherwise have none.  The tag is
chosen by the client (never 0) and echoed by the reply: on the guest's
shared virtio-serial port it is what tells a caller its own reply from a
leftover of a caller that died.  A reply with request 0 and tag 0 is the
backend's last word before it drops a connection whose framing it cannot
follow.  The first 12 bytes are where version 1's whole header was, so a
version-1 client is told, in its own framing, that it is out of date.
"""

from __future__ import annotations

import enum
import os
import struct

from ..errors import ErrorCode, ProtocolError
from .record import NamedTuple

VERSION = 2
LEGACY_VERSION = 1
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3
KNOWN_FLAGS = FLAG_VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY
PREFIX = struct.Struct("<III")  # request, flags, size: common to versions 1 and 2
HEADER = struct.Struct("<IIIIQ")  # request, flags, size, reserved, tag
MAX_PAYLOAD = 64 * 1024
MAX_MESSAGE_TEXT = 4096
NO_TAG = 0  # never a request's tag; the tag of a connection-level error
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")


class Request(enum.IntEnum):
    GET_FEATURES = 1
    GET_CONFIG = 2
    KEY_PROGRAM = 3
    MAP = 4
    FLUSH = 5
    RELOCATE = 6
    INSPECT = 7
    POWER_CYCLE = 8
    STATS = 9
    GET_VIEW_FD = 10
    SET_BASE = 11


class Role(enum.IntEnum):
    ADMIN = 0  # the host control socket
    GUEST = 1  # the virtio-serial channel of the guest


GUEST_REQUESTS = frozenset({Request.GET_FEATURES, Request.GET_CONFIG, Request.KEY_PROGRAM,
                            Request.MAP, Request.FLUSH, Request.RELOCATE, Request.INSPECT})
# Requests whose reply carries only the result: answered only on NEED_REPLY.
ACK_ONLY = frozenset({Request.MAP, Request.RELOCATE, Request.POWER_CYCLE, Request.SET_BASE})


def new_tag() -> int:
    """A fresh request tag: 64 random bits, never 0.

    Drawn per request from the kernel's generator rather than counted, so
    that processes (and a forked child sharing its parent's client) can
    never pick the same tag by construction.
    """
    return int.from_bytes(os.urandom(8), "little") or 1


class Header(NamedTuple):
    """A decoded version-2 header (a NamedTuple for the guest's sake: see :mod:`.messages`)."""

    request: int
    flags: int
    size: int
    tag: int

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def is_connection_error(self) -> bool:
        """The backend's notice before it drops the connection (request 0, tag 0)."""
        return self.request == 0 and self.tag == NO_TAG

    def pack(self) -> bytes:
        return HEADER.pack(self.request, self.flags, self.size, 0, self.tag)

    @classmethod
    def unpack(cls, raw: bytes) -> Header:
        """Decode and check 24 bytes; ProtocolError when they cannot be a v2 header."""
        request, flags, size = check_prefix(raw[:PREFIX.size])
        _, _, _, reserved, tag = HEADER.unpack(raw)
        if reserved:
            raise ProtocolError(f"reserved header field is {reserved:#x}, must be 0")
        return cls(request, flags, size, tag)


class LegacyClient(ProtocolError):
    """The peer speaks protocol version 1 (12-byte header, no tags)."""


def check_prefix(raw: bytes) -> tuple[int, int, int]:
    """(request, flags, size) of a header's first 12 bytes, checked.

    Raises :class:`LegacyClient` for version 1 and ProtocolError for any
    other version, unknown flag bits or a size over MAX_PAYLOAD.
    """
    request, flags, size = PREFIX.unpack(raw)
    version = flags & FLAG_VERSION_MASK
    if version == LEGACY_VERSION:
        raise LegacyClient("protocol version 1 is not supported: this backend speaks version 2 "
                           "(a 24-byte header with a tag); update the client")
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version {version}")
    if flags & ~KNOWN_FLAGS:
        raise ProtocolError(f"unknown flag bits {flags & ~KNOWN_FLAGS:#x}")
    if size > MAX_PAYLOAD:
        raise ProtocolError(f"payload size {size} exceeds {MAX_PAYLOAD}")
    return request, flags, size


def encode(request: int, payload: bytes = b"", *, tag: int | None = None, reply: bool = False,
           need_reply: bool = False) -> bytes:
    """A framed message; a request without ``tag`` gets a fresh one."""
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    flags = VERSION | (FLAG_REPLY if reply else 0) | (FLAG_NEED_REPLY if need_reply else 0)
    return HEADER.pack(request, flags, len(payload), 0, new_tag() if tag is None else tag) + payload


def ok_reply(request: int, tag: int, body: bytes = b"") -> bytes:
    """A successful reply: result code OK, then the request's reply body."""
    return encode(request, U32.pack(ErrorCode.OK) + body, tag=tag, reply=True)


def error_reply(request: int, tag: int, code: ErrorCode, message: str) -> bytes:
    """A refusal: the result code and a UTF-8 message of at most 4096 bytes."""
    text = message.encode()[:MAX_MESSAGE_TEXT]
    return encode(request, U32.pack(code) + text, tag=tag, reply=True)


def legacy_error_reply(message: str) -> bytes:
    """A version-1 error reply (request 0, INVALID): what a v1 client can still read."""
    body = U32.pack(ErrorCode.INVALID) + message.encode()[:MAX_MESSAGE_TEXT]
    return PREFIX.pack(0, LEGACY_VERSION | FLAG_REPLY, len(body)) + body
