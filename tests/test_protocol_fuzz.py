"""Protocol fuzzing of both sockets of a real backend: structured (hypothesis) and mutational.

Each fuzz input goes on a fresh connection, which is then half-closed; the
backend's replies are read to the end.  After every input: the backend is
alive, a standing admin client and a standing guest client are still served,
and when nothing was accepted the device state (STATS, GET_CONFIG, INSPECT of
every page, media, view, metadata) is exactly what it was.  At the end, the
backend's log holds no traceback.

Bounded: a few seconds per test by default; set MKTME_FUZZ_SECONDS for a
longer run (the mutational seed is printed so a failure can be replayed with
MKTME_FUZZ_SEED).
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from backend_helpers import PAGE, Backend, Backends, program_user, user_program
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mktme_emu import protocol as p
from mktme_emu.errors import ErrorCode
from mktme_emu.vocabulary import RelocateMode

BUDGET = float(os.environ.get("MKTME_FUZZ_SECONDS", "3"))
SIZE = 2 << 20
STATE_CHANGING = {p.Request.KEY_PROGRAM, p.Request.MAP, p.Request.FLUSH, p.Request.RELOCATE,
                  p.Request.POWER_CYCLE, p.Request.SET_BASE}


class Target:
    """The backend under fuzz, with standing clients and the last known state."""

    def __init__(self, backend: Backend) -> None:
        self.b = backend
        self.admin = backend.client(timeout=30)
        self.guest = backend.client(guest=True, timeout=30)
        self.state = self.snapshot()
        self.inputs = 0

    def snapshot(self) -> tuple[object, ...]:
        stats = {k: v for k, v in self.admin.stats().as_dict().items() if not k.startswith("flush_")}
        pages = [r for off in range(0, SIZE, 256 * PAGE) for r in self.admin.inspect(off, 256)]
        files = {name: hashlib.sha256(data).hexdigest() for name, data in self.b.state_files().items()}
        return stats, self.admin.config(), pages, files, hashlib.sha256(self.b.read(0, SIZE)).hexdigest()

    def send(self, path: Path, data: bytes) -> list[tuple[int, int, int]]:
        """(request, tag, code) of every reply to ``data`` sent alone on a new connection."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(30)
        try:
            s.connect(str(path))
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            received = b""
            while chunk := s.recv(65536):
                received += chunk
        except (BrokenPipeError, ConnectionResetError):
            received = b""  # the backend dropped us mid-send: nothing was accepted from the rest
        finally:
            s.close()
        return _replies(received)

    def check(self, data: bytes, replies: list[tuple[int, int, int]]) -> None:
        """The invariants after one input."""
        self.inputs += 1
        assert self.b.running, "the backend died"
        assert self.admin.features().role == p.Role.ADMIN
        assert self.guest.features().role == p.Role.GUEST
        accepted = any(code == ErrorCode.OK and request in STATE_CHANGING for request, _, code in replies)
        now = self.snapshot()
        if now != self.state and not accepted:
            assert _may_be_a_silent_ack(data), f"state changed by refused input {data[:64].hex()}: {replies}"
        self.state = now


def _replies(raw: bytes) -> list[tuple[int, int, int]]:
    out = []
    while len(raw) >= p.PREFIX.size:
        request, flags, size = p.PREFIX.unpack_from(raw)
        if (request, flags) == (0, 1 | p.FLAG_REPLY):  # the version-1 notice, the last word
            assert len(raw) == p.PREFIX.size + size, "bytes after the version-1 notice"
            out.append((0, 0, p.U32.unpack_from(raw, p.PREFIX.size)[0]))
            return out
        request, flags, size, reserved, tag = p.HEADER.unpack_from(raw)
        assert flags & p.FLAG_REPLY and flags & p.FLAG_VERSION_MASK == p.VERSION and reserved == 0
        body = raw[p.HEADER.size:p.HEADER.size + size]
        assert len(body) == size >= 4, "a truncated reply"
        out.append((request, tag, p.U32.unpack_from(body)[0]))
        raw = raw[p.HEADER.size + size:]
    assert raw == b"", "trailing bytes after the replies"
    return out


def _may_be_a_silent_ack(data: bytes) -> bool:
    """Whether ``data`` holds an ack-only request without NEED_REPLY (accepted without a reply)."""
    while len(data) >= p.HEADER.size:
        request, flags, size, _, _ = p.HEADER.unpack_from(data)
        if request in p.ACK_ONLY and not flags & p.FLAG_NEED_REPLY:
            return True
        data = data[p.HEADER.size + size:]
    return False


@pytest.fixture
def target(tmp_path: Path) -> Iterator[Target]:
    with Backends(tmp_path) as pool:
        b = pool(size=SIZE)
        with b.client() as c:
            program_user(c, 1, os.urandom(16), os.urandom(16))
            c.map(0, 8 * PAGE, 1)
            b.write(0, os.urandom(8 * PAGE))
            c.flush()
        t = Target(b)
        yield t
        assert "Traceback" not in b.log_text()


def valid_frames() -> list[bytes]:
    """One well-formed request of every kind (on this device), the seeds of the mutations."""
    need = p.VERSION | p.FLAG_NEED_REPLY
    payloads: list[tuple[int, bytes]] = [
        (p.Request.GET_FEATURES, b""), (p.Request.GET_CONFIG, b""), (p.Request.STATS, b""),
        (p.Request.KEY_PROGRAM, user_program(2, os.urandom(16), os.urandom(16)).pack()),
        (p.Request.MAP, p.MapRequest(16 * PAGE, 2 * PAGE, 2).pack()),
        (p.Request.FLUSH, p.FlushRequest(0, 4 * PAGE).pack()),
        (p.Request.RELOCATE, p.RelocateRequest(0, 64 * PAGE, PAGE, RelocateMode.KEYED).pack()),
        (p.Request.INSPECT, p.InspectRequest(0, 4).pack()), (p.Request.POWER_CYCLE, b""),
        (p.Request.GET_VIEW_FD, b""), (p.Request.SET_BASE, p.U64.pack(0x1_0000_0000)),
    ]
    return [p.HEADER.pack(r, need, len(pl), 0, p.new_tag()) + pl for r, pl in payloads]


def mutate(rng: random.Random, corpus: list[bytes]) -> bytes:
    data = bytearray(rng.choice(corpus))
    for _ in range(rng.randint(1, 4)):
        how = rng.randrange(7)
        if how == 0 and data:  # flip bits
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        elif how == 1 and data:  # truncate
            del data[rng.randrange(len(data)):]
        elif how == 2:  # append random bytes
            data += rng.randbytes(rng.randint(1, 40))
        elif how == 3:  # splice another frame
            data += rng.choice(corpus)
        elif how == 4 and len(data) >= 12:  # lie about the size
            struct.pack_into("<I", data, 8, rng.choice([0, 1, 7, 191, 193, 65536, 65537, 0xFFFFFFFF]))
        elif how == 5 and len(data) >= 24:  # a reserved field, a tag of 0, a version
            field = rng.choice([(12, rng.randrange(1, 1 << 32), "<I"), (16, 0, "<Q"),
                                (4, rng.choice([0, 1, 3, 2 | 0x10, 2 | 0x8000_0000]), "<I")])
            struct.pack_into(field[2], data, field[0], field[1])
        elif how == 6 and len(data) > 24:  # a reserved byte inside the payload
            data[rng.randrange(24, len(data))] = rng.randrange(1, 256)
    return bytes(data)


def test_mutational_fuzz_of_both_sockets(target: Target) -> None:
    seed = int(os.environ.get("MKTME_FUZZ_SEED", str(random.SystemRandom().randrange(1 << 32))))
    print(f"mutational fuzz seed {seed} (MKTME_FUZZ_SEED to replay), budget {BUDGET:g} s")
    rng = random.Random(seed)
    corpus = valid_frames()
    sockets = (target.b.admin_socket, target.b.guest_socket)
    deadline = time.monotonic() + BUDGET
    while time.monotonic() < deadline:
        data = mutate(rng, corpus)
        target.check(data, target.send(rng.choice(sockets), data))
    print(f"{target.inputs} inputs")
    assert target.inputs >= 10


def _frames() -> st.SearchStrategy[bytes]:
    """Frames built field by field: any request number, flags, sizes, reserved fields, payloads."""
    request = st.one_of(st.sampled_from([int(r) for r in p.Request]), st.integers(0, 2**32 - 1))
    flags = st.one_of(st.just(p.VERSION | p.FLAG_NEED_REPLY), st.just(p.VERSION),
                      st.integers(0, 15), st.integers(0, 2**32 - 1))
    payload = st.one_of(st.binary(max_size=64), st.binary(min_size=190, max_size=194),
                        st.sampled_from([bytes(16), bytes(32), bytes(8), bytes(192)]))
    reserved = st.one_of(st.just(0), st.integers(1, 2**32 - 1))
    tag = st.one_of(st.integers(1, 2**64 - 1), st.just(0))
    size_lie = st.one_of(st.just(None), st.integers(0, 70000))

    @st.composite
    def frame(draw: st.DrawFn) -> bytes:
        body = draw(payload)
        size = draw(size_lie)
        return p.HEADER.pack(draw(request), draw(flags), len(body) if size is None else size,
                             draw(reserved), draw(tag)) + body
    return st.lists(frame(), min_size=1, max_size=3).map(b"".join)


def test_structured_fuzz_of_both_sockets(target: Target) -> None:
    deadline = time.monotonic() + BUDGET

    # About what the budget allows; inputs past the deadline are skipped unsent.
    @settings(max_examples=max(20, int(BUDGET * 60)), deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(data=_frames(), guest=st.booleans())
    def one(data: bytes, guest: bool) -> None:
        if time.monotonic() > deadline:
            return
        target.check(data, target.send(target.b.guest_socket if guest else target.b.admin_socket, data))

    one()
    print(f"{target.inputs} inputs")
    assert target.inputs >= 10
