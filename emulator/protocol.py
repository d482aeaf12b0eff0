"""The control protocol: framing, request/reply payloads, roles, and a blocking client.

Shared by the host tools and the guest helpers (which reach the backend over a
virtio-serial port), so it depends on nothing heavier than the key-program
struct (:mod:`mktme_emu.pconfig`, pure Python).  The wire format is specified
in ``docs/protocol.md``; this module is its reference implementation.

Every message is a 12-byte header followed by ``size`` payload bytes::

    u32 request   u32 flags   u32 size        (little-endian)

``flags`` bits 1:0 are the protocol version (1), bit 2 marks a reply, bit 3
asks for a reply to a request that would otherwise have none.  A reply
payload starts with a u32 :class:`~mktme_emu.errors.ErrorCode`; on success
the request's reply body follows, on failure a UTF-8 message.
"""

from __future__ import annotations

import array
import enum
import os
import select
import socket
import struct
import time
from dataclasses import dataclass
from typing import Protocol

from .errors import ErrorCode, KeyProgramError, ProtocolError, RemoteError, ReplyTimeout
from .pconfig import (
    STRUCT_SIZE,
    Algorithm,
    KeyCommand,
    KeyProgram,
    KeyStatus,
    build_program,
    parse_key_options,
)

__all__ = [
    "STRUCT_SIZE", "Algorithm", "Client", "ErrorCode", "FileTransport", "KeyCommand",
    "KeyProgram", "KeyStatus", "PageRecord", "Request", "Role", "SocketTransport",
    "build_program", "parse_key_options",
]

VERSION = 1
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3
HEADER = struct.Struct("<III")
MAX_PAYLOAD = 64 * 1024
FEATURES = 0  # no optional features yet; the bit field is for later extensions
INSPECT_MAX_PAGES = 256


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

TWEAK_MODES = ("spa", "dpa", "logical")
TME_POLICIES = ("bypass", "ephemeral", "retained")
RELOCATE_MODES = ("raw", "keyed")
KINDS = ("tme", "user", "random", "no-encrypt")

FEATURES_REPLY = struct.Struct("<QII")  # features, version, role
CONFIG_REPLY = struct.Struct("<QQQIIIIII")  # size, label, base, unit, tweak, bits, tme, page, locked
MAP_REQ = struct.Struct("<QQIIQ")  # offset, length, keyid, flags (bit 0: tweak valid), tweak
RANGE_REQ = struct.Struct("<QQ")  # offset, length (0 = everything)
U64 = struct.Struct("<Q")
U32 = struct.Struct("<I")
RELOCATE_REQ = struct.Struct("<QQQII")  # src, dst, length, mode, reserved
INSPECT_REQ = struct.Struct("<QII")  # offset, count, reserved
PAGE_RECORD = struct.Struct("<QQHBBI16s16s")
STATS_FIELDS = ("pages_filled", "pages_written_back", "bytes_encrypted", "bytes_decrypted",
                "flushes", "power_cycles", "key_programs", "locked_pages")
STATS_REPLY = struct.Struct("<8Q2d")  # the counters above, flush seconds total and max
PAGE_FLAG_LOCKED, PAGE_FLAG_CONSISTENT, PAGE_FLAG_CHECKED = 1, 2, 4


@dataclass(frozen=True)
class Message:
    request: int
    flags: int
    payload: bytes
    fds: tuple[int, ...] = ()

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)


def encode(request: int, payload: bytes = b"", *, reply: bool = False, need_reply: bool = False) -> bytes:
    """A framed message."""
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    flags = VERSION | (FLAG_REPLY if reply else 0) | (FLAG_NEED_REPLY if need_reply else 0)
    return HEADER.pack(request, flags, len(payload)) + payload


def parse_header(raw: bytes) -> tuple[int, int, int]:
    """(request, flags, size) of a header; ProtocolError when it cannot be ours."""
    request, flags, size = HEADER.unpack(raw)
    if flags & FLAG_VERSION_MASK != VERSION:
        raise ProtocolError(f"unsupported protocol version {flags & FLAG_VERSION_MASK}")
    if flags & ~(FLAG_VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY):
        raise ProtocolError(f"unknown flag bits {flags:#x}")
    if size > MAX_PAYLOAD:
        raise ProtocolError(f"payload size {size} exceeds {MAX_PAYLOAD}")
    return request, flags, size


def ok_reply(request: int, body: bytes = b"") -> bytes:
    return encode(request, U32.pack(ErrorCode.OK) + body, reply=True)


def error_reply(request: int, code: ErrorCode, message: str) -> bytes:
    return encode(request, U32.pack(code) + message.encode()[:4096], reply=True)


@dataclass(frozen=True)
class PageRecord:
    """One page as INSPECT reports it."""

    offset: int
    logical_tweak: int
    keyid: int
    kind: str
    locked: bool
    consistent: bool | None
    view_head: bytes
    media_head: bytes

    def pack(self) -> bytes:
        flags = ((PAGE_FLAG_LOCKED if self.locked else 0)
                 | (PAGE_FLAG_CHECKED if self.consistent is not None else 0)
                 | (PAGE_FLAG_CONSISTENT if self.consistent else 0))
        return PAGE_RECORD.pack(self.offset, self.logical_tweak, self.keyid, KINDS.index(self.kind),
                                flags, 0, self.view_head, self.media_head)

    @classmethod
    def unpack_from(cls, raw: bytes, offset: int) -> PageRecord:
        off, tweak, keyid, kind, flags, _, view, media = PAGE_RECORD.unpack_from(raw, offset)
        consistent = bool(flags & PAGE_FLAG_CONSISTENT) if flags & PAGE_FLAG_CHECKED else None
        return cls(off, tweak, keyid, KINDS[kind], bool(flags & PAGE_FLAG_LOCKED), consistent, view, media)

    def as_dict(self) -> dict[str, object]:
        return {"offset": self.offset, "keyid": self.keyid, "kind": self.kind, "locked": self.locked,
                "logical_tweak": self.logical_tweak, "consistent": self.consistent,
                "view_head": self.view_head.hex(), "media_head": self.media_head.hex()}


# -- transports ---------------------------------------------------------------

class Transport(Protocol):
    def send(self, data: bytes) -> None: ...
    def recv_exact(self, size: int) -> tuple[bytes, list[int]]: ...
    def close(self) -> None: ...


class SocketTransport:
    """A connected unix stream socket; receives descriptors passed with SCM_RIGHTS."""

    def __init__(self, path: str | os.PathLike[str], timeout: float | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(os.fspath(path))
        except OSError as exc:
            self.sock.close()
            raise ProtocolError(f"cannot connect to {os.fspath(path)}: {exc.strerror or exc}") from exc

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, size: int) -> tuple[bytes, list[int]]:
        chunks: list[bytes] = []
        fds: list[int] = []
        got = 0
        while got < size:
            data, ancillary, _, _ = self.sock.recvmsg(size - got, socket.CMSG_SPACE(4 * 4))
            if not data:
                raise ProtocolError("the backend closed the connection")
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
            chunks.append(data)
            got += len(data)
        return b"".join(chunks), fds

    def close(self) -> None:
        self.sock.close()


class FileTransport:
    """A character device such as a virtio-serial port (no descriptor passing).

    With a ``timeout``, a reply that does not arrive in time raises
    :class:`ReplyTimeout`; without one, reads block.
    """

    def __init__(self, fd: int, timeout: float | None = None) -> None:
        self.fd = fd
        self.timeout = timeout

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]

    def recv_exact(self, size: int) -> tuple[bytes, list[int]]:
        chunks: list[bytes] = []
        got = 0
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while got < size:
            self._wait_readable(deadline)
            data = os.read(self.fd, size - got)
            if not data:
                raise ProtocolError("the control port closed")
            chunks.append(data)
            got += len(data)
        return b"".join(chunks), []

    def _wait_readable(self, deadline: float | None) -> None:
        if deadline is None:
            return
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([self.fd], [], [], left)[0]:
            raise ReplyTimeout(f"the backend did not answer within {self.timeout:g} s")

    def close(self) -> None:
        os.close(self.fd)


# -- the client -----------------------------------------------------------------

_MAX_STALE_REPLIES = 64


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


class Client:
    """Blocking client: one request at a time, each waiting for its reply.

    Every method raises :class:`RemoteError` when the backend refuses (with
    its error code) and :class:`ProtocolError` when the connection breaks.
    """

    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    @classmethod
    def connect(cls, path: str | os.PathLike[str], timeout: float | None = None) -> Client:
        return cls(SocketTransport(path, timeout))

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def call(self, request: Request, payload: bytes = b"") -> tuple[bytes, list[int]]:
        """Send a request (with NEED_REPLY) and return the reply body and any fds.

        A reply to another request is a leftover (on a shared guest port, of a
        process that died waiting for it): it is discarded and reading goes on.
        """
        self.transport.send(encode(request, payload, need_reply=True))
        for _ in range(_MAX_STALE_REPLIES):
            reply_request, flags, body, fds = self._read_message()
            if reply_request == request or reply_request == 0 or not flags & FLAG_REPLY:
                break
            _close_all(fds)
        if reply_request != request or not flags & FLAG_REPLY or len(body) < 4:
            _close_all(fds)
            detail = body[4:].decode(errors="replace") if reply_request == 0 else ""
            raise ProtocolError(f"unexpected reply {reply_request} to request {request.name}"
                                + (f": {detail}" if detail else ""))
        (code,) = U32.unpack_from(body)
        if code != ErrorCode.OK:
            _close_all(fds)
            message = body[4:].decode(errors="replace")
            raise RemoteError(message or ErrorCode(code).name, code)
        return body[4:], fds

    def _read_message(self) -> tuple[int, int, bytes, list[int]]:
        head, fds = self.transport.recv_exact(HEADER.size)
        reply_request, flags, size = parse_header(head)
        body, more = self.transport.recv_exact(size) if size else (b"", [])
        return reply_request, flags, body, fds + more

    def features(self) -> dict[str, int]:
        body, _ = self.call(Request.GET_FEATURES)
        features, version, role = FEATURES_REPLY.unpack_from(body)
        return {"features": features, "version": version, "role": role}

    def config(self) -> dict[str, object]:
        body, _ = self.call(Request.GET_CONFIG)
        size, label, base, unit, tweak, bits, tme, page, locked = CONFIG_REPLY.unpack_from(body)
        return {"size": size, "label_size": label, "base": base, "unit": unit,
                "tweak": TWEAK_MODES[tweak], "keyid_bits": bits, "tme": TME_POLICIES[tme],
                "page_size": page, "locked_pages": locked,
                "view": body[CONFIG_REPLY.size:].decode() or None}

    def program_key(self, program: KeyProgram | bytes) -> KeyStatus:
        raw = program.pack() if isinstance(program, KeyProgram) else program
        body, _ = self.call(Request.KEY_PROGRAM, raw)
        return KeyStatus(U32.unpack_from(body)[0])

    def map(self, offset: int, length: int, keyid: int, logical_tweak: int | None = None) -> None:
        flags = 1 if logical_tweak is not None else 0
        self.call(Request.MAP, MAP_REQ.pack(offset, length, keyid, flags, logical_tweak or 0))

    def flush(self, offset: int = 0, length: int = 0) -> int:
        body, _ = self.call(Request.FLUSH, RANGE_REQ.pack(offset, length))
        return int(U64.unpack_from(body)[0])

    def relocate(self, src: int, dst: int, length: int, mode: str) -> None:
        if mode not in RELOCATE_MODES:
            raise ProtocolError(f"relocation mode must be raw or keyed, not {mode!r}")
        self.call(Request.RELOCATE, RELOCATE_REQ.pack(src, dst, length, RELOCATE_MODES.index(mode), 0))

    def inspect(self, offset: int, count: int = 1) -> list[PageRecord]:
        body, _ = self.call(Request.INSPECT, INSPECT_REQ.pack(offset, count, 0))
        (n,) = U32.unpack_from(body)
        return [PageRecord.unpack_from(body, 4 + i * PAGE_RECORD.size) for i in range(n)]

    def power_cycle(self) -> None:
        self.call(Request.POWER_CYCLE)

    def stats(self) -> dict[str, float | int | str]:
        """The counters, and ``busy``: the request running and its progress ("" when idle)."""
        body, _ = self.call(Request.STATS)
        values = STATS_REPLY.unpack_from(body)
        result: dict[str, float | int | str] = dict(zip(STATS_FIELDS, values[:8], strict=True))
        result["flush_seconds_total"], result["flush_seconds_max"] = values[8], values[9]
        result["busy"] = body[STATS_REPLY.size:].decode(errors="replace")  # text after the counters
        return result

    def view_fd(self) -> tuple[int, int]:
        """(descriptor of the view, its size in bytes); the caller closes the fd."""
        body, fds = self.call(Request.GET_VIEW_FD)
        if len(fds) != 1:
            _close_all(fds)
            raise ProtocolError(f"GET_VIEW_FD passed {len(fds)} descriptors, expected 1")
        return fds[0], int(U64.unpack_from(body)[0])

    def set_base(self, base: int) -> None:
        self.call(Request.SET_BASE, U64.pack(base))


def key_program(keyid: int, command: KeyCommand, algorithm: str = "aes-xts-128",
                key_hex: str | None = None, tweak_hex: str | None = None) -> KeyProgram:
    """Build a key-program struct from CLI-style arguments (host and guest share it)."""
    return build_program(keyid, command, Algorithm.from_name(algorithm), key_hex, tweak_hex)


def key_program_from_choice(keyid: int, algorithm: str = "aes-xts-128", *, user: str | None = None,
                            random: bool = False, clear: bool = False,
                            options: str | None = None) -> KeyProgram:
    """The struct for the `key` commands' forms (host and guest CLIs share them).

    Exactly one form is expected: ``user`` as KEYHEX:TWEAKHEX, ``random``,
    ``clear``, the Linux key-service ``options`` string, or none of them for
    NO_ENCRYPT.  Raises KeyProgramError (never quoting key material).
    """
    if options is not None:
        return parse_key_options(keyid, options)
    if user is not None:
        key_hex, sep, tweak_hex = user.partition(":")
        if not sep:
            raise KeyProgramError("--user takes KEYHEX:TWEAKHEX")
        return key_program(keyid, KeyCommand.SET_KEY_DIRECT, algorithm, key_hex, tweak_hex)
    command = (KeyCommand.SET_KEY_RANDOM if random
               else KeyCommand.CLEAR_KEY if clear else KeyCommand.NO_ENCRYPT)
    return key_program(keyid, command, algorithm)
