"""A flood of idle guest connections starves neither the admin socket nor the state files.

The backend runs as its own process with the usual soft limit of 1024
descriptors; the test opens ~1,050 idle connections to its guest socket
(loopback unix sockets only, a bounded loop), then uses the admin socket for
requests that write state files.  Before the connection bound, the backend
ran out of descriptors, the admin socket hung, and asyncio logged a
traceback per accept retry.
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from backend_helpers import PAGE, Backends, program_user
from mktme_emu import protocol as p
from mktme_emu.errors import ErrorCode
from mktme_emu.service_limits import RateLimiter

FLOOD = 1050
BACKEND_NOFILE = 1024


@contextlib.contextmanager
def soft_nofile(limit: int) -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < limit:
        pytest.skip(f"the hard descriptor limit {hard} is below {limit}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _connect_idle(path: Path) -> socket.socket:
    """Connect, retrying while the listen backlog is full (EAGAIN on a unix socket)."""
    deadline = time.monotonic() + 20
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(path))
        except BlockingIOError:
            s.close()
            assert time.monotonic() < deadline, "the backend stopped accepting connections"
            time.sleep(0.005)
            continue
        s.settimeout(10)
        return s


def test_a_thousand_idle_guest_connections_leave_the_admin_socket_working(tmp_path: Path) -> None:
    with Backends(tmp_path) as pool:
        with soft_nofile(BACKEND_NOFILE):  # the backend inherits the usual limit
            b = pool(start=False)
            b.start()
        flood: list[socket.socket] = []
        with soft_nofile(FLOOD + 256):
            try:
                for _ in range(FLOOD):
                    flood.append(_connect_idle(b.guest_socket))
                with b.client(timeout=15) as admin:  # requests that need descriptors and state files
                    program_user(admin, 1, os.urandom(16), os.urandom(16))
                    admin.map(0, 4 * PAGE, 1)
                    b.write(0, os.urandom(4 * PAGE))
                    assert admin.flush().written == 4
                    assert [r.keyid for r in admin.inspect(0, 4)] == [1] * 4
                # Connections over the bound were told why, in one message, and closed.
                last = flood[-1]
                head = last.recv(p.HEADER.size, socket.MSG_WAITALL)
                request, _flags, size, _, tag = p.HEADER.unpack(head)
                body = last.recv(size, socket.MSG_WAITALL)
                assert (request, tag, struct.unpack_from("<I", body)[0]) == (0, 0, ErrorCode.BUSY)
                assert b"too many guest connections" in body
            finally:
                for s in flood:
                    s.close()
        with b.client(guest=True, timeout=15) as guest:  # and guests get in again
            assert guest.features().role == p.Role.GUEST
        log = b.log_text()
        assert len(log) < 20_000, f"{len(log)} bytes of log for one flood"
        assert "Traceback" not in log
        assert log.count("refusing a guest connection") <= RateLimiter().burst


def test_the_rate_limiter_counts_what_it_suppresses() -> None:
    now = [0.0]
    limiter = RateLimiter(burst=2, period=10.0, clock=lambda: now[0])
    assert [limiter.allow("k") for _ in range(4)] == [(True, 0), (True, 0), (False, 0), (False, 0)]
    assert limiter.allow("other") == (True, 0)
    now[0] = 10.0
    assert limiter.allow("k") == (True, 2)
