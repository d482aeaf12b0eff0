"""The backend daemon: unix sockets, one connection per client, each with a role.

The asyncio loop only frames, checks and routes messages; controller work
runs on a worker thread, one request at a time (the controller is not
thread-safe), so a slow flush never stops other clients from being read.
A client that sends garbage gets an error and loses its connection; nothing
else notices.  A payload that is not exactly what docs/protocol.md says
(size, reserved fields, flag bits) is refused with INVALID before anything
changes.  Connections are bounded per role so that a flood of guest
connections can never starve the admin socket or the state files of
descriptors, and repeated log lines are rate-limited.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from . import protocol as p
from .controller import PAGE_SIZE, MemoryController, RelocateMode
from .errors import ControllerError, ErrorCode, MktmeError, ProtocolError
from .keytable import KeyStatus
from .service_limits import ClaimedSocket, RateLimiter, clear_stale_socket, connection_limit

log = logging.getLogger(__name__)

_HOST_PATH = re.compile(r"(?<![\w.])/[\w.+@%=,:~-]*(?:/[\w.+@%=,:~-]*)+")

Handler = Callable[[object, p.Role], bytes | tuple[bytes, int]]


@dataclass(frozen=True)
class ServiceConfig:
    """Where to listen, how long a key program waits for a busy device, how many clients."""

    admin_socket: Path
    guest_socket: Path | None
    busy_timeout: float = 5.0
    max_connections: int = 64  # per role; lowered if RLIMIT_NOFILE cannot hold them


class _Refused(Exception):
    """A request refused with a code; the connection stays up."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def guest_safe(message: str) -> str:
    """The message with host paths blanked out: the guest learns no host file name."""
    return _HOST_PATH.sub("<host path>", message)


class Backend:
    """Serves one controller on an admin socket and (optionally) a guest socket."""

    def __init__(self, controller: MemoryController, config: ServiceConfig) -> None:
        self.controller = controller
        self.config = config
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(2, thread_name_prefix="controller")
        # Key programs get their own worker, so one never waits in the queue
        # behind long requests: its busy timeout runs from its arrival.
        self._key_executor = ThreadPoolExecutor(1, thread_name_prefix="pconfig")
        self._closed = False
        self._busy = ""  # the request running under the lock, for STATS
        self._servers: list[asyncio.AbstractServer] = []
        self._claimed: list[ClaimedSocket] = []
        self._stopping = asyncio.Event()
        self._connections = {role: 0 for role in p.Role}
        self._limit = config.max_connections
        self.rate = RateLimiter()
        self._parsers: dict[p.Request, Callable[[bytes], object]] = {
            p.Request.KEY_PROGRAM: p.check_key_program,
            p.Request.MAP: p.MapRequest.unpack,
            p.Request.FLUSH: p.FlushRequest.unpack,
            p.Request.RELOCATE: p.RelocateRequest.unpack,
            p.Request.INSPECT: p.InspectRequest.unpack,
            p.Request.SET_BASE: p.unpack_base,
        }
        self._handlers: dict[p.Request, Handler] = {
            p.Request.GET_FEATURES: self._features,
            p.Request.GET_CONFIG: self._config,
            p.Request.KEY_PROGRAM: self._key_program,  # type: ignore[dict-item]
            p.Request.MAP: self._map,  # type: ignore[dict-item]
            p.Request.FLUSH: self._flush,  # type: ignore[dict-item]
            p.Request.RELOCATE: self._relocate,  # type: ignore[dict-item]
            p.Request.INSPECT: self._inspect,  # type: ignore[dict-item]
            p.Request.POWER_CYCLE: self._power_cycle,
            p.Request.STATS: self._stats,
            p.Request.GET_VIEW_FD: self._view_fd,
            p.Request.SET_BASE: self._set_base,  # type: ignore[dict-item]
        }

    # -- lifecycle -------------------------------------------------------------

    async def serve(self, ready: Callable[[], None] | None = None, *,
                    install_signals: bool = True) -> None:
        """Listen until SIGTERM/SIGINT (or :meth:`stop`), then write back and return.

        ``install_signals`` False leaves signals alone (a loop that is not on
        the main thread, as in tests).  Raises StateError (after writing
        back) when a socket path belongs to another live backend.
        """
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._loop_exception)
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._stopping.set)
        roles = 2 if self.config.guest_socket is not None else 1
        self._limit = connection_limit(self.config.max_connections, roles)
        try:
            await self._listen(self.config.admin_socket, p.Role.ADMIN)
            if self.config.guest_socket is not None:
                await self._listen(self.config.guest_socket, p.Role.GUEST)
            if ready:
                ready()
            await self._stopping.wait()
        finally:
            await self._shut_down(loop)

    async def _shut_down(self, loop: asyncio.AbstractEventLoop) -> None:
        for server in self._servers:
            server.close()
        await loop.run_in_executor(self._executor, self._close_controller)
        self._executor.shutdown()
        self._key_executor.shutdown()
        for claimed in self._claimed:
            claimed.release()

    def stop(self) -> None:
        self._stopping.set()

    def _close_controller(self) -> None:
        with self._lock:
            if not self._closed:
                self.controller.close()
                self._closed = True  # requests still queued are refused, not run on closed files

    async def _listen(self, path: Path, role: p.Role) -> None:
        clear_stale_socket(path)
        old_umask = os.umask(0o177)  # the socket is born 0600: no window for others
        try:
            server = await asyncio.start_unix_server(
                lambda r, w: self._client(r, w, role), path=str(path))
        finally:
            os.umask(old_umask)
        self._servers.append(server)
        self._claimed.append(ClaimedSocket.of(path))
        os.chmod(path, 0o600)
        log.info("listening on %s (%s role, at most %d connections)", path, role.name.lower(), self._limit)

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        """asyncio's own errors (an accept() out of descriptors): one rate-limited line each."""
        message = str(context.get("message", "event loop error"))
        exc = context.get("exception")
        detail = (exc.strerror or str(exc)) if isinstance(exc, OSError) else (exc or "")
        self.rate.log(log, logging.WARNING, "loop:" + message, "%s: %s", message, detail)

    # -- one connection ----------------------------------------------------------

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      role: p.Role) -> None:
        if self._connections[role] >= self._limit:
            await self._refuse_connection(writer, role)
            return
        self._connections[role] += 1
        try:
            while not self._stopping.is_set():
                try:
                    prefix = await reader.readexactly(p.PREFIX.size)
                except asyncio.IncompleteReadError:
                    return
                if not await self._one_message(prefix, reader, writer, role):
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        except asyncio.CancelledError:
            # Shutdown with the client still connected.  Returning (rather than
            # re-raising) spares the log Python 3.11's "Exception in callback
            # StreamReaderProtocol...: CancelledError" traceback.
            return
        finally:
            self._connections[role] -= 1
            writer.close()

    async def _refuse_connection(self, writer: asyncio.StreamWriter, role: p.Role) -> None:
        name = role.name.lower()
        self.rate.log(log, logging.WARNING, "limit:" + name,
                      "refusing a %s connection: %d already open", name, self._limit)
        try:
            writer.write(p.error_reply(0, p.NO_TAG, ErrorCode.BUSY,
                                       f"too many {name} connections (at most {self._limit})"))
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _one_message(self, prefix: bytes, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter, role: p.Role) -> bool:
        """Handle one message; False when the connection must be dropped."""
        try:
            p.check_prefix(prefix)
            header = p.Header.unpack(prefix + await reader.readexactly(p.HEADER.size - p.PREFIX.size))
            if header.tag == p.NO_TAG and not header.is_reply:
                raise ProtocolError("a request's tag must not be 0")
        except p.LegacyClient as exc:
            return await self._drop(writer, role, exc, p.legacy_error_reply(str(exc)))
        except ProtocolError as exc:
            notice = p.error_reply(0, p.NO_TAG, ErrorCode.INVALID, str(exc))
            return await self._drop(writer, role, exc, notice)
        payload = await reader.readexactly(header.size)
        reply, fd = await self._answer(header, payload, role)
        if reply is not None:
            await self._send(writer, reply, fd)
        return True

    async def _drop(self, writer: asyncio.StreamWriter, role: p.Role, exc: Exception, notice: bytes) -> bool:
        name = role.name.lower()
        self.rate.log(log, logging.WARNING, "garbage:" + name, "%s client sent garbage (%s); dropping it",
                      name, exc)
        writer.write(notice)
        await writer.drain()
        return False

    async def _answer(self, header: p.Header, payload: bytes,
                      role: p.Role) -> tuple[bytes | None, int | None]:
        try:
            req = self._route(header, role)
            args = self._parse(req, payload)
            deadline = time.monotonic() + self.config.busy_timeout
            executor = self._key_executor if req is p.Request.KEY_PROGRAM else self._executor
            result = await asyncio.get_running_loop().run_in_executor(
                executor, self._run, req, args, role, deadline)
        except _Refused as exc:
            message = str(exc) if role is p.Role.ADMIN else guest_safe(str(exc))
            if header.request in p.ACK_ONLY and not header.flags & (p.FLAG_NEED_REPLY | p.FLAG_REPLY):
                # No reply was asked for: an unrequested error would desynchronise the client.
                self.rate.log(log, logging.WARNING, "silent", "%s client: request %d refused without a "
                              "reply (%s)", role.name.lower(), header.request, message)
                return None, None
            return p.error_reply(header.request, header.tag, exc.code, message), None
        body, fd = result if isinstance(result, tuple) else (result, None)
        if req in p.ACK_ONLY and not header.need_reply:
            return None, None
        return p.ok_reply(header.request, header.tag, body), fd

    def _route(self, header: p.Header, role: p.Role) -> p.Request:
        if header.is_reply:
            raise _Refused(ErrorCode.INVALID, "a reply was sent as a request")
        try:
            req = p.Request(header.request)
        except ValueError:
            raise _Refused(ErrorCode.UNSUPPORTED, f"unknown request {header.request}") from None
        if role is p.Role.GUEST and req not in p.GUEST_REQUESTS:
            raise _Refused(ErrorCode.DENIED, f"{req.name} is not available to the guest")
        return req

    def _parse(self, req: p.Request, payload: bytes) -> object:
        """The request's arguments, checked on the loop before any controller work."""
        try:
            parser = self._parsers.get(req)
            if parser is None:
                p.expect_empty(payload, req.name)
                return None
            return parser(payload)
        except p.PayloadError as exc:
            raise _Refused(ErrorCode.INVALID, str(exc)) from None

    def _run(self, req: p.Request, args: object, role: p.Role,
             deadline: float) -> bytes | tuple[bytes, int]:
        """On a worker thread: the controller call, serialised by the lock.

        A key program that cannot get the device by ``deadline`` answers
        DEVICE_BUSY, as PCONFIG does; other requests wait their turn.
        """
        if req in (p.Request.STATS, p.Request.GET_CONFIG):  # read-only: `status` answers
            return self._handlers[req](args, role)         # while a long request runs
        if req is p.Request.KEY_PROGRAM:
            if not self._lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                return p.U32.pack(KeyStatus.DEVICE_BUSY)
        else:
            self._lock.acquire()
        try:
            if self._closed:
                raise _Refused(ErrorCode.STATE, "the backend is shutting down")
            self._busy = req.name.lower().replace("_", "-")
            return self._handlers[req](args, role)
        except _Refused:
            raise
        except ControllerError as exc:
            raise _Refused(exc.code, str(exc)) from exc
        except (MktmeError, OSError) as exc:
            log.error("%s from the %s failed: %s", req.name, role.name.lower(), exc)
            raise _Refused(ErrorCode.INTERNAL, self._failure_text(req, exc, role)) from exc
        except Exception as exc:  # a bug must cost one request, never the daemon
            if self.rate.allow("crash:" + req.name)[0]:
                log.exception("%s crashed", req.name)
            raise _Refused(ErrorCode.INTERNAL, f"{req.name} failed: internal error") from exc
        finally:
            self._busy = ""
            self._lock.release()

    @staticmethod
    def _failure_text(req: p.Request, exc: BaseException, role: p.Role) -> str:
        """What the client is told of an I/O failure: the host's admin gets it all.

        The guest gets the errno's text at most (``No space left on device``),
        never a host file name; the host log keeps the detail.
        """
        if role is p.Role.ADMIN:
            return f"{req.name} failed: {exc}"
        cause: BaseException | None = exc
        while cause is not None and not (isinstance(cause, OSError) and cause.strerror):
            cause = cause.__cause__ or cause.__context__
        reason = cause.strerror if isinstance(cause, OSError) else "I/O error on the host"
        return f"{req.name} failed: {reason} (details in the backend's log)"

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, reply: bytes, fd: int | None) -> None:
        if fd is None:
            writer.write(reply)
            await writer.drain()
            return
        await writer.drain()
        # asyncio's TransportSocket has no sendmsg(): send on a duplicate of
        # the connection's descriptor (drained, so the short reply fits).
        sock = socket.socket(fileno=os.dup(writer.get_extra_info("socket").fileno()))
        try:
            sent = sock.sendmsg([reply], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))])
        finally:
            sock.close()
            os.close(fd)
        if sent < len(reply):
            writer.write(reply[sent:])
            await writer.drain()

    # -- the requests (on the worker, under the lock) -------------------------------

    def _features(self, args: object, role: p.Role) -> bytes:
        return p.Features(p.FEATURES, p.VERSION, role).pack()

    def _config(self, args: object, role: p.Role) -> bytes:
        c = self.controller.config
        locked = sum(self.controller.locked_pages().values())
        return p.DeviceConfig(c.size, c.label_size, self.controller.base, c.unit, c.tweak, c.keyid_bits,
                              c.tme, PAGE_SIZE, locked,
                              str(c.view) if role is p.Role.ADMIN else None).pack()

    def _key_program(self, payload: bytes, role: p.Role) -> bytes:
        status = self.controller.program_key(payload)
        log.info("key program from %s: %s", role.name.lower(), status.name)
        return p.U32.pack(status)

    def _map(self, req: p.MapRequest, role: p.Role) -> bytes:
        self.controller.map_range(req.offset, req.length, req.keyid, req.page_tweak)
        return b""

    def _flush(self, req: p.FlushRequest, role: p.Role) -> bytes:
        result = self.controller.flush(req.offset, req.length) if req.length else self.controller.flush()
        return p.FlushReply(written=result.written, unwritable=result.unwritable).pack()

    def _relocate(self, req: p.RelocateRequest, role: p.Role) -> bytes:
        self.controller.relocate(req.src, req.dst, req.length, RelocateMode(req.mode.value))
        return b""

    def _inspect(self, req: p.InspectRequest, role: p.Role) -> bytes:
        pages = self.controller.inspect(req.offset, req.count)
        return p.pack_inspect([p.PageRecord(i.offset, i.logical_tweak, i.keyid, i.kind, i.locked,
                                            i.consistent, i.view_head, i.media_head) for i in pages])

    def _power_cycle(self, args: object, role: p.Role) -> bytes:
        log.info("power cycle")
        self.controller.power_cycle()
        return b""

    def _stats(self, args: object, role: p.Role) -> bytes:
        s = self.controller.stats
        locked = sum(self.controller.locked_pages().values())
        busy = self._busy and f"{self._busy}: {self.controller.busy}".rstrip(": ")
        return p.Stats(s.pages_filled, s.pages_written_back, s.bytes_encrypted, s.bytes_decrypted,
                       s.flushes, s.power_cycles, s.key_programs, locked, s.flush_seconds_total,
                       s.flush_seconds_max, busy).pack()

    def _view_fd(self, args: object, role: p.Role) -> tuple[bytes, int]:
        view = self.controller.view
        return p.U64.pack(view.size + view.label_size), os.dup(view.fd)

    def _set_base(self, base: int, role: p.Role) -> bytes:
        self.controller.set_base(base)
        return b""


def run_backend(controller: MemoryController, config: ServiceConfig,
                ready: Callable[[], None] | None = None) -> None:
    """Serve until SIGTERM/SIGINT; the controller is written back and closed on exit."""
    asyncio.run(Backend(controller, config).serve(ready))
