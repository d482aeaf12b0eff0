"""The backend daemon: unix sockets, one connection per client, each with a role.

The asyncio loop only frames and routes messages; controller work runs on a
worker thread, one request at a time (the controller is not thread-safe),
so a slow flush never stops other clients from being read.  A client that
sends garbage gets an error and loses its connection; nothing else notices.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
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

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceConfig:
    """Where to listen, and how long a key program waits for a busy device."""

    admin_socket: Path
    guest_socket: Path | None
    busy_timeout: float = 5.0


class _Refused(Exception):
    """A request refused with a code; the connection stays up."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


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
        self._stopping = asyncio.Event()
        self._handlers: dict[p.Request, Callable[[bytes, p.Role], bytes | tuple[bytes, int]]] = {
            p.Request.GET_FEATURES: self._features,
            p.Request.GET_CONFIG: self._config,
            p.Request.KEY_PROGRAM: self._key_program,
            p.Request.MAP: self._map,
            p.Request.FLUSH: self._flush,
            p.Request.RELOCATE: self._relocate,
            p.Request.INSPECT: self._inspect,
            p.Request.POWER_CYCLE: self._power_cycle,
            p.Request.STATS: self._stats,
            p.Request.GET_VIEW_FD: self._view_fd,
            p.Request.SET_BASE: self._set_base,
        }

    # -- lifecycle -------------------------------------------------------------

    async def serve(self, ready: Callable[[], None] | None = None, *,
                    install_signals: bool = True) -> None:
        """Listen until SIGTERM/SIGINT (or :meth:`stop`), then write back and return.

        ``install_signals`` False leaves signals alone (a loop that is not on
        the main thread, as in tests).
        """
        loop = asyncio.get_running_loop()
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._stopping.set)
        await self._listen(self.config.admin_socket, p.Role.ADMIN)
        if self.config.guest_socket is not None:
            await self._listen(self.config.guest_socket, p.Role.GUEST)
        if ready:
            ready()
        await self._stopping.wait()
        for server in self._servers:
            server.close()
        await loop.run_in_executor(self._executor, self._close_controller)
        self._executor.shutdown()
        self._key_executor.shutdown()
        for path in (self.config.admin_socket, self.config.guest_socket):
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def stop(self) -> None:
        self._stopping.set()

    def _close_controller(self) -> None:
        with self._lock:
            if not self._closed:
                self.controller.close()
                self._closed = True  # requests still queued are refused, not run on closed files

    async def _listen(self, path: Path, role: p.Role) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        old_umask = os.umask(0o177)  # the socket is born 0600: no window for others
        try:
            server = await asyncio.start_unix_server(
                lambda r, w: self._client(r, w, role), path=str(path))
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        self._servers.append(server)
        log.info("listening on %s (%s role)", path, role.name.lower())

    # -- one connection ----------------------------------------------------------

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      role: p.Role) -> None:
        try:
            while not self._stopping.is_set():
                try:
                    head = await reader.readexactly(p.HEADER.size)
                except asyncio.IncompleteReadError:
                    return
                if not await self._one_message(head, reader, writer, role):
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        except asyncio.CancelledError:
            # Shutdown with the client still connected.  Returning (rather than
            # re-raising) spares the log Python 3.11's "Exception in callback
            # StreamReaderProtocol...: CancelledError" traceback.
            return
        finally:
            writer.close()

    async def _one_message(self, head: bytes, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter, role: p.Role) -> bool:
        """Handle one message; False when the connection must be dropped."""
        try:
            request, flags, size = p.parse_header(head)
        except ProtocolError as exc:
            log.warning("%s client sent garbage (%s); dropping it", role.name.lower(), exc)
            writer.write(p.error_reply(0, ErrorCode.INVALID, str(exc)))
            await writer.drain()
            return False
        payload = await reader.readexactly(size)
        reply, fd = await self._answer(request, flags, payload, role)
        if reply is not None:
            await self._send(writer, reply, fd)
        return True

    async def _answer(self, request: int, flags: int, payload: bytes,
                      role: p.Role) -> tuple[bytes | None, int | None]:
        try:
            req = self._route(request, flags, role)
            deadline = time.monotonic() + self.config.busy_timeout
            executor = self._key_executor if req is p.Request.KEY_PROGRAM else self._executor
            result = await asyncio.get_running_loop().run_in_executor(
                executor, self._run, req, payload, role, deadline)
        except _Refused as exc:
            if request in p.ACK_ONLY and not flags & (p.FLAG_NEED_REPLY | p.FLAG_REPLY):
                # No reply was asked for: an unrequested error would desynchronise the client.
                log.warning("%s client: request %d refused without a reply (%s)",
                            role.name.lower(), request, exc)
                return None, None
            return p.error_reply(request, exc.code, str(exc)), None
        body, fd = result if isinstance(result, tuple) else (result, None)
        if req in p.ACK_ONLY and not flags & p.FLAG_NEED_REPLY:
            return None, None
        return p.ok_reply(request, body), fd

    def _route(self, request: int, flags: int, role: p.Role) -> p.Request:
        if flags & p.FLAG_REPLY:
            raise _Refused(ErrorCode.INVALID, "a reply was sent as a request")
        try:
            req = p.Request(request)
        except ValueError:
            raise _Refused(ErrorCode.UNSUPPORTED, f"unknown request {request}") from None
        if role is p.Role.GUEST and req not in p.GUEST_REQUESTS:
            raise _Refused(ErrorCode.DENIED, f"{req.name} is not available to the guest")
        return req

    def _run(self, req: p.Request, payload: bytes, role: p.Role,
             deadline: float) -> bytes | tuple[bytes, int]:
        """On a worker thread: the controller call, serialised by the lock.

        A key program that cannot get the device by ``deadline`` answers
        DEVICE_BUSY, as PCONFIG does; other requests wait their turn.
        """
        if req in (p.Request.STATS, p.Request.GET_CONFIG):  # read-only: `status` answers
            return self._handlers[req](payload, role)      # while a long request runs
        if req is p.Request.KEY_PROGRAM:
            if not self._lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                return p.U32.pack(KeyStatus.DEVICE_BUSY)
        else:
            self._lock.acquire()
        try:
            if self._closed:
                raise _Refused(ErrorCode.STATE, "the backend is shutting down")
            self._busy = req.name.lower().replace("_", "-")
            return self._handlers[req](payload, role)
        except _Refused:
            raise
        except ControllerError as exc:
            raise _Refused(exc.code, str(exc)) from exc
        except (struct.error, ValueError) as exc:
            raise _Refused(ErrorCode.INVALID, f"malformed {req.name} payload: {exc}") from exc
        except (MktmeError, OSError) as exc:
            log.error("%s failed: %s", req.name, exc)
            raise _Refused(ErrorCode.INTERNAL, f"{req.name} failed: {exc}") from exc
        except Exception as exc:  # a bug must cost one request, never the daemon
            log.exception("%s crashed", req.name)
            raise _Refused(ErrorCode.INTERNAL, f"{req.name} failed: internal error") from exc
        finally:
            self._busy = ""
            self._lock.release()

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

    # -- the requests ---------------------------------------------------------------

    @staticmethod
    def _expect(payload: bytes, layout: struct.Struct) -> tuple[int, ...]:
        if len(payload) != layout.size:
            raise ValueError(f"{len(payload)} bytes, expected {layout.size}")
        return layout.unpack(payload)

    def _features(self, payload: bytes, role: p.Role) -> bytes:
        return p.FEATURES_REPLY.pack(p.FEATURES, p.VERSION, role)

    def _config(self, payload: bytes, role: p.Role) -> bytes:
        c = self.controller.config
        locked = sum(self.controller.locked_pages().values())
        body = p.CONFIG_REPLY.pack(c.size, c.label_size, self.controller.base, c.unit,
                                   p.TWEAK_MODES.index(c.tweak.value), c.keyid_bits,
                                   p.TME_POLICIES.index(c.tme.value), PAGE_SIZE, locked)
        return body + (str(c.view).encode() if role is p.Role.ADMIN else b"")

    def _key_program(self, payload: bytes, role: p.Role) -> bytes:
        status = self.controller.program_key(payload)
        log.info("key program from %s: %s", role.name.lower(), status.name)
        return p.U32.pack(status)

    def _map(self, payload: bytes, role: p.Role) -> bytes:
        offset, length, keyid, flags, tweak = self._expect(payload, p.MAP_REQ)
        self.controller.map_range(offset, length, keyid, tweak if flags & 1 else None)
        return b""

    def _flush(self, payload: bytes, role: p.Role) -> bytes:
        offset, length = self._expect(payload, p.RANGE_REQ)
        result = self.controller.flush(offset, length) if length else self.controller.flush()
        return p.U64.pack(result.written)

    def _relocate(self, payload: bytes, role: p.Role) -> bytes:
        src, dst, length, mode, _ = self._expect(payload, p.RELOCATE_REQ)
        if mode >= len(p.RELOCATE_MODES):
            raise ControllerError(f"unknown relocation mode {mode}")
        self.controller.relocate(src, dst, length, RelocateMode(p.RELOCATE_MODES[mode]))
        return b""

    def _inspect(self, payload: bytes, role: p.Role) -> bytes:
        offset, count, _ = self._expect(payload, p.INSPECT_REQ)
        if not 1 <= count <= p.INSPECT_MAX_PAGES:
            raise ControllerError(f"inspect takes 1..{p.INSPECT_MAX_PAGES} pages")
        pages = self.controller.inspect(offset, count)
        records = [p.PageRecord(i.offset, i.logical_tweak, i.keyid, i.kind, i.locked, i.consistent,
                                i.view_head, i.media_head).pack() for i in pages]
        return p.U32.pack(len(records)) + b"".join(records)

    def _power_cycle(self, payload: bytes, role: p.Role) -> bytes:
        log.info("power cycle")
        self.controller.power_cycle()
        return b""

    def _stats(self, payload: bytes, role: p.Role) -> bytes:
        s = self.controller.stats
        locked = sum(self.controller.locked_pages().values())
        busy = self._busy and f"{self._busy}: {self.controller.busy}".rstrip(": ")
        return p.STATS_REPLY.pack(s.pages_filled, s.pages_written_back, s.bytes_encrypted,
                                  s.bytes_decrypted, s.flushes, s.power_cycles, s.key_programs,
                                  locked, s.flush_seconds_total, s.flush_seconds_max) + busy.encode()

    def _view_fd(self, payload: bytes, role: p.Role) -> tuple[bytes, int]:
        view = self.controller.view
        return p.U64.pack(view.size + view.label_size), os.dup(view.fd)

    def _set_base(self, payload: bytes, role: p.Role) -> bytes:
        (base,) = self._expect(payload, p.U64)
        self.controller.set_base(base)
        return b""


def run_backend(controller: MemoryController, config: ServiceConfig,
                ready: Callable[[], None] | None = None) -> None:
    """Serve until SIGTERM/SIGINT; the controller is written back and closed on exit."""
    asyncio.run(Backend(controller, config).serve(ready))
