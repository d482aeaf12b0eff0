"""Data-loss bug 1: on the guest's shared port, a reply must reach only the caller that asked.

The virtio-serial port is one byte stream shared by every process in the
guest.  Here one connection to the real backend's guest socket stands in for
it: every client gets a duplicate of the same descriptor.  Caller A sends a
FLUSH that the backend holds (a gated controller), then gives up (timeout)
or is killed; caller B sends its own FLUSH.  A's reply then arrives while B
waits.  Before protocol version 2, B took it (same request number) and
returned before its own data was on the media.
"""

from __future__ import annotations

import mmap
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from inprocess_backend import GatedController, new_controller, served
from mktme_emu.protocol import FlushReply
from mktme_guest import channel
from mktme_guest.errors import ChannelError

PAGE = 4096
CHILD = """
import sys
from pathlib import Path
from mktme_guest.channel import GuestClient, PortTransport
client = GuestClient(PortTransport(int(sys.argv[1]), timeout=60), lock_paths=(Path(sys.argv[2]),))
client.flush(0, 4096)
"""


def _shared_port(guest_socket: Path) -> int:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(guest_socket))
    fd = os.dup(sock.fileno())
    sock.close()
    return fd


def _caller(port: int, lock: Path, timeout: float) -> channel.GuestClient:
    return channel.GuestClient(channel.PortTransport(os.dup(port), timeout=timeout), lock_paths=(lock,))


def _abandon_a_flush(how: str, gate: GatedController, port: int, lock: Path) -> None:
    """Caller A: a FLUSH of page 0 the backend is still working on when A goes away."""
    if how == "timeout":
        with _caller(port, lock, timeout=0.3) as a, pytest.raises(ChannelError, match="did not answer"):
            a.flush(0, PAGE)
        assert gate.arrived.acquire(timeout=30)
        return
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(port), str(lock)], pass_fds=(port,))
    try:
        assert gate.arrived.acquire(timeout=60), "A's flush never reached the backend"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)


@pytest.mark.parametrize("how", ["timeout", "killed"])
def test_a_dead_callers_reply_never_answers_the_next_caller(tmp_path: Path, how: str) -> None:
    gate = GatedController(new_controller(tmp_path))
    with served(gate, tmp_path) as backend:
        assert backend.config.guest_socket is not None
        port, lock = _shared_port(backend.config.guest_socket), tmp_path / "port.lock"
        view_fd = os.open(gate.config.view, os.O_RDWR)
        view = mmap.mmap(view_fd, gate.config.size)
        os.close(view_fd)
        try:
            _abandon_a_flush(how, gate, port, lock)
            data = os.urandom(2 * PAGE)
            view[8 * PAGE:10 * PAGE] = data  # B's pages, dirty in the view
            got: list[FlushReply] = []
            errors: list[BaseException] = []

            def caller_b() -> None:
                try:
                    with _caller(port, lock, timeout=60) as b:
                        got.append(b.flush(8 * PAGE, 2 * PAGE))
                except BaseException as exc:
                    errors.append(exc)

            b_thread = threading.Thread(target=caller_b)
            b_thread.start()
            gate.permit()  # A's flush completes; its reply lands on the shared stream
            assert gate.arrived.acquire(timeout=30), "B's flush never reached the backend"
            b_thread.join(1.0)
            assert b_thread.is_alive() and not got, f"B returned before its flush ran: {got or errors}"
            gate.permit()
            b_thread.join(30)
            assert not errors, errors
            assert got == [FlushReply(written=2, unwritable=0)]
            with open(tmp_path / "state" / "media", "rb") as media:
                media.seek(8 * PAGE)
                assert media.read(2 * PAGE) == data  # bypass TME: B's data is on the media
            with _caller(port, lock, timeout=30) as c:  # the stream is still in step
                assert c.features().role == 1
        finally:
            gate.permit(10)
            view.close()
            os.close(port)
