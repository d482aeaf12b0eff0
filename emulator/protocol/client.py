"""Transports and the blocking client (host tools and, through the port, the guest).

The client tags every request (:func:`~.framing.new_tag`) and accepts only
the reply that echoes its tag: on the guest's shared port a reply left over
by a process that died, or by an earlier call that timed out, is read and
discarded, never taken as the answer to a later request.
"""

from __future__ import annotations

import errno
import os
import select
import time

from ..errors import (
    BackendUnreachable,
    ErrorCode,
    KeyProgramError,
    ProtocolError,
    RemoteError,
    ReplyTimeout,
)
from ..vocabulary import RelocateMode
from .framing import HEADER, U32, U64, Header, Request, encode, new_tag
from .messages import (
    DeviceConfig,
    Features,
    FlushReply,
    FlushRequest,
    InspectRequest,
    MapRequest,
    PageRecord,
    RelocateRequest,
    Stats,
    unpack_inspect,
)

# Replies of other callers a call reads past before it gives up: one per dead
# caller at most, so this only bounds a stream that has gone mad.
MAX_FOREIGN_REPLIES = 1024


TYPE_CHECKING = False  # not typing's: importing typing costs the guest's CLI ~0.1 s under TCG
if TYPE_CHECKING:
    from typing import Protocol

    # The key-program struct is imported by the functions that build or send one:
    # `mktme-guest status` and the other light commands never need it.
    from ..pconfig import KeyCommand, KeyProgram, KeyStatus

    class Transport(Protocol):
        def send(self, data: bytes) -> None: ...
        def recv_exact(self, size: int) -> tuple[bytes, list[int]]: ...
        def close(self) -> None: ...


class SocketTransport:
    """A connected unix stream socket; receives descriptors passed with SCM_RIGHTS."""

    def __init__(self, path: str | os.PathLike[str], timeout: float | None = None) -> None:
        import socket  # here: the guest's port transport never needs it, and it is slow there

        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(os.fspath(path))
        except OSError as exc:
            self.sock.close()
            # No socket, or nobody listening on it: the backend exited or is restarting.
            gone = exc.errno in (errno.ENOENT, errno.ECONNREFUSED)
            error = BackendUnreachable if gone else ProtocolError
            raise error(f"cannot connect to {os.fspath(path)}: {exc.strerror or exc}") from exc

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, size: int) -> tuple[bytes, list[int]]:
        import array  # here, as socket: the guest's port transport needs neither
        import socket  # already loaded by __init__: a dictionary lookup

        chunks: list[bytes] = []
        fds: list[int] = []
        got = 0
        while got < size:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(size - got, socket.CMSG_SPACE(4 * 4))
            except TimeoutError:
                _close_all(fds)
                limit = self.sock.gettimeout()
                raise ReplyTimeout(f"the backend did not answer within {limit:g} s") from None
            if not data:
                _close_all(fds)
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


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


class Client:
    """Blocking client: one request at a time, each waiting for the reply with its tag.

    Every method raises :class:`RemoteError` when the backend refuses (with
    its error code) and :class:`ProtocolError` when the connection breaks,
    the backend drops it, or no reply comes within the transport's timeout.
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
        """Send a request (with NEED_REPLY and a fresh tag); its reply body and any fds.

        Replies with another tag belong to other callers (on a shared port,
        to one that died or timed out): they are discarded.  A connection
        error notice (request 0, tag 0) raises ProtocolError: the request
        may or may not have been carried out, and no reply will come.
        """
        tag = new_tag()
        self.transport.send(encode(request, payload, tag=tag, need_reply=True))
        for _ in range(MAX_FOREIGN_REPLIES):
            header, body, fds = self._read_message()
            if header.tag == tag or header.is_connection_error:
                break
            _close_all(fds)
        else:
            raise ProtocolError(f"no reply to {request.name} among {MAX_FOREIGN_REPLIES} foreign replies")
        if header.request != request or not header.is_reply or len(body) < U32.size:
            _close_all(fds)
            detail = body[4:].decode(errors="replace")
            what = ("the backend dropped the connection" if header.request == 0
                    else f"unexpected reply {header.request} to request {request.name}")
            raise ProtocolError(what + (f": {detail}" if detail else ""))
        (code,) = U32.unpack_from(body)
        if code != ErrorCode.OK:
            _close_all(fds)
            message = body[4:].decode(errors="replace")
            raise RemoteError(message or _code_name(code), code)
        return body[4:], fds

    def _read_message(self) -> tuple[Header, bytes, list[int]]:
        head, fds = self.transport.recv_exact(HEADER.size)
        try:
            header = Header.unpack(head)
            body, more = self.transport.recv_exact(header.size) if header.size else (b"", [])
        except BaseException:
            _close_all(fds)
            raise
        return header, body, fds + more

    def features(self) -> Features:
        return Features.unpack(self.call(Request.GET_FEATURES)[0])

    def config(self) -> DeviceConfig:
        return DeviceConfig.unpack(self.call(Request.GET_CONFIG)[0])

    def program_key(self, program: KeyProgram | bytes) -> KeyStatus:
        from ..pconfig import KeyStatus

        raw = program if isinstance(program, (bytes, bytearray)) else program.pack()
        body, _ = self.call(Request.KEY_PROGRAM, raw)
        return KeyStatus(U32.unpack_from(body)[0])

    def map(self, offset: int, length: int, keyid: int, logical_tweak: int | None = None) -> None:
        self.call(Request.MAP, MapRequest(offset, length, keyid, logical_tweak).pack())

    def flush(self, offset: int = 0, length: int = 0) -> FlushReply:
        return FlushReply.unpack(self.call(Request.FLUSH, FlushRequest(offset, length).pack())[0])

    def relocate(self, src: int, dst: int, length: int, mode: str | RelocateMode) -> None:
        try:
            how = RelocateMode(mode)
        except ValueError:
            raise ProtocolError(f"relocation mode must be raw or keyed, not {mode!r}") from None
        self.call(Request.RELOCATE, RelocateRequest(src, dst, length, how).pack())

    def inspect(self, offset: int, count: int = 1) -> list[PageRecord]:
        return unpack_inspect(self.call(Request.INSPECT, InspectRequest(offset, count).pack())[0])

    def power_cycle(self) -> None:
        self.call(Request.POWER_CYCLE)

    def stats(self) -> Stats:
        return Stats.unpack(self.call(Request.STATS)[0])

    def view_fd(self) -> tuple[int, int]:
        """(descriptor of the view, its size in bytes); the caller closes the fd."""
        body, fds = self.call(Request.GET_VIEW_FD)
        if len(fds) != 1:
            _close_all(fds)
            raise ProtocolError(f"GET_VIEW_FD passed {len(fds)} descriptors, expected 1")
        return fds[0], int(U64.unpack_from(body)[0])

    def set_base(self, base: int) -> None:
        self.call(Request.SET_BASE, U64.pack(base))


def _code_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return f"error {code}"


def key_program(keyid: int, command: KeyCommand, algorithm: str = "aes-xts-128",
                key_hex: str | None = None, tweak_hex: str | None = None) -> KeyProgram:
    """Build a key-program struct from CLI-style arguments (host and guest share it)."""
    from ..pconfig import Algorithm, build_program

    return build_program(keyid, command, Algorithm.from_name(algorithm), key_hex, tweak_hex)


def key_program_from_choice(keyid: int, algorithm: str = "aes-xts-128", *, user: str | None = None,
                            random: bool = False, clear: bool = False,
                            options: str | None = None) -> KeyProgram:
    """The struct for the `key` commands' forms (host and guest CLIs share them).

    Exactly one form is expected: ``user`` as KEYHEX:TWEAKHEX, ``random``,
    ``clear``, the Linux key-service ``options`` string, or none of them for
    NO_ENCRYPT.  Raises KeyProgramError (never quoting key material).
    """
    from ..pconfig import KeyCommand, parse_key_options

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
