"""The guest's control channel: the virtio-serial port ``org.mktme.control``.

QEMU connects the port's chardev to the backend's guest socket, so the guest
speaks the ordinary control protocol (``mktme_emu.protocol``) in the guest
role over a character device.  Three facts about that device shape this
module:

- the port is a byte stream with no message boundaries, shared by everyone
  in the guest, so a request and its reply must never interleave with
  another's: every call holds an exclusive ``flock`` for its whole
  request/response (on a lock file opened per call, because virtio-serial
  lets only one open file description exist at a time, and flock between
  descriptors that share one description does not exclude);
- the lock alone cannot stop a reply from outliving its caller (a process
  killed, or a call timed out, after its request was sent): that reply
  arrives later, under someone else's lock.  Every request carries a fresh
  random tag that its reply echoes (protocol version 2), and the client
  takes only the reply with its own tag, so a leftover is discarded and
  can never answer a later caller;
- a second ``open()`` of a port fails with EBUSY while someone holds it, so
  :func:`open_port` retries until its deadline instead of failing at once;
- a reply that never comes must not hang a test forever: reads poll with a
  timeout and raise :class:`ChannelError`.

For tests on the host, ``connect("unix:/path/guest.sock")`` (or the
environment variable ``MKTME_GUEST_CHANNEL``) talks to a backend's guest
socket directly, with the same client.
"""

from __future__ import annotations

import _thread  # threading's lock without threading's import (~20 ms of each call under TCG)
import contextlib
import errno
import fcntl
import os
import select
import time
from pathlib import Path

from mktme_emu.errors import ReplyTimeout
from mktme_emu.protocol import Client, FileTransport, Request

from .errors import ChannelError

TYPE_CHECKING = False  # not typing's (see mktme_emu.protocol)
if TYPE_CHECKING:
    from collections.abc import Iterator

PORT_NAME = "org.mktme.control"
ENV_CHANNEL = "MKTME_GUEST_CHANNEL"
ENV_TIMEOUT = "MKTME_GUEST_TIMEOUT"
DEFAULT_TIMEOUT = 300.0  # a whole-device flush of a large NVDIMM under TCG takes a while
LOCK_PATHS = (Path("/run/mktme-guest.lock"), Path("/tmp/mktme-guest.lock"))
_BUSY_RETRY = 0.05


def find_port(name: str = PORT_NAME, dev: Path = Path("/dev"), sysfs: Path = Path("/sys")) -> Path:
    """The device node of the virtio-serial port called ``name``.

    Prefers the udev-style symlink ``/dev/virtio-ports/NAME`` (the guest's init
    makes it), else scans ``/sys/class/virtio-ports/*/name``.  Raises
    ChannelError when no port has that name (QEMU was started without it).
    """
    link = dev / "virtio-ports" / name
    if link.exists():
        return link
    ports = sysfs / "class" / "virtio-ports"
    for entry in sorted(ports.glob("*")):
        with contextlib.suppress(OSError):
            if (entry / "name").read_text().strip() == name:
                node = dev / entry.name
                if node.exists():
                    return node
                raise ChannelError(f"virtio-serial port {name} is {entry.name}, but {node} is missing")
    raise ChannelError(f"no virtio-serial port named {name} (is the VM started with the "
                       "emulator backend?)")


def open_port(path: Path, timeout: float = DEFAULT_TIMEOUT) -> int:
    """Open the port read-write, waiting while another process holds it (EBUSY).

    Blocks up to ``timeout`` seconds; raises ChannelError on any other error.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            return os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise ChannelError(f"cannot open {path}: {exc.strerror}") from exc
        time.sleep(_BUSY_RETRY)


class PortTransport(FileTransport):
    """The protocol's character-device transport, with a read timeout and draining.

    A reply that does not arrive within ``timeout`` raises ChannelError.
    """

    def __init__(self, fd: int, timeout: float = DEFAULT_TIMEOUT) -> None:
        super().__init__(fd, timeout)

    def recv_exact(self, size: int) -> tuple[bytes, list[int]]:
        """Exactly ``size`` bytes; ChannelError after ``timeout`` s without them."""
        try:
            return super().recv_exact(size)
        except ReplyTimeout as exc:
            raise ChannelError(str(exc)) from exc

    def drain(self) -> int:
        """Discard bytes already waiting (a reply whose reader died); returns how many."""
        dropped = 0
        while select.select([self.fd], [], [], 0)[0]:
            data = os.read(self.fd, 4096)
            if not data:
                break
            dropped += len(data)
        return dropped


@contextlib.contextmanager
def exclusive(lock_paths: tuple[Path, ...] = LOCK_PATHS) -> Iterator[None]:
    """Hold the guest-wide channel lock (flock LOCK_EX on a fresh descriptor).

    Blocks until every other holder in the guest is done.  Falls back to no
    lock when no lock file can be created (a read-only guest without /run).
    """
    fd = None
    for path in lock_paths:
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            break
    try:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the flock


class GuestClient(Client):
    """The protocol client with each request/response under the channel lock.

    Also serialises threads of one process.  Stale bytes already waiting on
    the port are drained before each request (a cheap clean-up); what makes
    a leftover reply harmless is the tag check of :meth:`Client.call`.
    """

    def __init__(self, transport: PortTransport, lock_paths: tuple[Path, ...] = LOCK_PATHS) -> None:
        super().__init__(transport)
        self._thread_lock = _thread.allocate_lock()
        self._lock_paths = lock_paths

    def call(self, request: Request, payload: bytes = b"") -> tuple[bytes, list[int]]:
        """One request and its reply, holding the thread lock and the guest-wide flock."""
        with self._thread_lock, exclusive(self._lock_paths):
            transport = self.transport
            if isinstance(transport, PortTransport):
                transport.drain()
            return super().call(request, payload)


def channel_timeout() -> float:
    """Seconds to wait for a reply: $MKTME_GUEST_TIMEOUT, else the default."""
    raw = os.environ.get(ENV_TIMEOUT)
    try:
        return float(raw) if raw else DEFAULT_TIMEOUT
    except ValueError:
        raise ChannelError(f"{ENV_TIMEOUT}={raw!r} is not a number of seconds") from None


def connect(path: str | os.PathLike[str] | None = None, timeout: float | None = None) -> Client:
    """A connected client in the guest role.

    ``path``: a port device (``/dev/vport0p2``), ``unix:SOCKET`` (a backend's
    guest socket, for tests outside a VM), or None: $MKTME_GUEST_CHANNEL, else
    the port named org.mktme.control.  Blocks while another process holds the
    port; raises ChannelError (no port, cannot open) or ProtocolError.
    """
    timeout = channel_timeout() if timeout is None else timeout
    where = os.fspath(path) if path is not None else os.environ.get(ENV_CHANNEL) or None
    if where is not None and where.startswith("unix:"):
        return Client.connect(where[len("unix:"):], timeout)
    port = Path(where) if where is not None else find_port()
    return GuestClient(PortTransport(open_port(port, timeout), timeout))
