"""The service around the controller: sockets, roles, garbage, concurrency, signals, CLI."""

from __future__ import annotations

import json
import mmap
import os
import signal
import socket
import stat
import struct
import threading

import pytest
from backend_helpers import (
    DEFAULT_BASE,
    PAGE,
    Backends,
    cli,
    program,
    program_user,
    remote_error,
    user_program,
    xts_fast,
)
from mktme_emu import protocol as p
from mktme_emu.errors import ErrorCode
from mktme_emu.protocol import KeyCommand, KeyStatus

LEGACY_HEADER = struct.Struct("<III")  # protocol version 1: request, flags, size


def frame(request: int, flags: int, size: int, tag: int | None = None) -> bytes:
    """A version-2 header (docs/protocol.md): request, flags, size, reserved 0, tag."""
    return p.HEADER.pack(request, flags, size, 0, p.new_tag() if tag is None else tag)


@pytest.fixture
def backends(tmp_path):
    with Backends(tmp_path) as pool:
        yield pool


# -- raw socket helpers ------------------------------------------------------------------------

def raw(path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(str(path))
    return s


def recv_exact(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def read_reply(s: socket.socket) -> tuple[int, int, int, bytes] | None:
    """(request, flags, code, rest) of the next reply, None at end of stream."""
    head = recv_exact(s, p.HEADER.size)
    if not head:
        return None
    assert len(head) == p.HEADER.size
    request, flags, size, reserved, _tag = p.HEADER.unpack(head)
    assert reserved == 0
    payload = recv_exact(s, size)
    assert len(payload) == size and size >= 4
    return request, flags, struct.unpack_from("<I", payload)[0], payload[4:]


def assert_dropped_with(s: socket.socket, code: ErrorCode) -> None:
    reply = read_reply(s)
    assert reply is not None, "no error reply before the connection was dropped"
    assert reply[1] & p.FLAG_REPLY and reply[2] == code, reply
    assert read_reply(s) is None, "the connection should have been closed"


def state_of(b, client) -> tuple:
    """Everything a bad client must not change (every state file: media, metadata, log)."""
    stats = client.stats().as_dict()
    counters = {k: v for k, v in stats.items() if not k.startswith("flush")}
    records = [(r.offset, r.keyid, r.kind, r.locked, r.logical_tweak, r.consistent)
               for r in client.inspect(0, 256)]
    return (b.state_files(), b.read(0, b.size), records, counters, client.config())


def setup_some_state(b) -> tuple[bytes, bytes]:
    with b.client() as c:
        key = os.urandom(16), os.urandom(16)
        program_user(c, 1, *key)
        c.map(0, 8 * PAGE, 1)
        b.write(0, os.urandom(8 * PAGE))
        b.write(64 * PAGE, os.urandom(PAGE))
        c.flush()
    return key


# -- files and sockets -------------------------------------------------------------------------

@pytest.mark.parametrize("tme", ["bypass", "retained"])
def test_sockets_and_state_files_are_private(backends, tme):
    b = backends(tme=tme, label_size="128K")
    with b.client() as c:
        setup_some_state(b)
        c.power_cycle()
    for sock in (b.admin_socket, b.guest_socket):
        mode = os.stat(sock).st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600, (sock, oct(mode))
    assert stat.S_IMODE(os.stat(b.view_path).st_mode) == 0o600
    names = []
    for f in b.state_dir.iterdir():
        names.append(f.name)
        assert stat.S_IMODE(os.stat(f).st_mode) & 0o077 == 0, (f, oct(os.stat(f).st_mode))
    assert stat.S_IMODE(os.stat(b.state_dir).st_mode) & 0o077 == 0
    assert {"media", "metadata", "control.sock", "guest.sock"} <= set(names)
    key_files = [n for n in names if "key" in n]
    assert len(key_files) == (1 if tme == "retained" else 0), names  # only the retained platform key


# -- bad clients -------------------------------------------------------------------------------

def test_garbage_and_half_messages_disturb_no_one_and_change_nothing(backends):
    b = backends()
    setup_some_state(b)
    good = b.client()
    before = state_of(b, good)
    key_struct = user_program(2, os.urandom(16), os.urandom(16)).pack()

    # A client that stalls in the middle of a message must not block the others.
    stalled = raw(b.admin_socket)
    stalled.sendall(frame(p.Request.KEY_PROGRAM, p.VERSION | p.FLAG_NEED_REPLY, 192) + key_struct[:50])
    half_header = raw(b.guest_socket)
    half_header.sendall(b"\x03\x00\x00")

    dropped_cases = [
        ("version 0", frame(p.Request.GET_FEATURES, 0, 0)),
        ("reserved field", p.HEADER.pack(p.Request.GET_FEATURES, p.VERSION | p.FLAG_NEED_REPLY, 0, 1, 7)),
        ("tag 0", frame(p.Request.GET_FEATURES, p.VERSION | p.FLAG_NEED_REPLY, 0, tag=0)),
        ("version 3", frame(p.Request.GET_CONFIG, 3, 0)),
        ("unknown flag bits", frame(p.Request.GET_FEATURES, p.VERSION | 0x100, 0)),
        ("oversize payload", frame(p.Request.KEY_PROGRAM, p.VERSION | p.FLAG_NEED_REPLY,
                                         p.MAX_PAYLOAD + 1) + key_struct),
        ("huge payload", frame(p.Request.MAP, p.VERSION, 0xFFFF_FFFF)),
    ]
    for path in (b.admin_socket, b.guest_socket):
        for name, message in dropped_cases:
            s = raw(path)
            s.sendall(message)
            try:
                assert_dropped_with(s, ErrorCode.INVALID)
            except AssertionError as err:
                raise AssertionError(f"{name} on {path.name}: {err}") from None
            finally:
                s.close()
            assert good.features().version == p.VERSION

    # Random bytes, and disconnects in the middle of a header or a payload.
    for seed in range(8):
        s = raw(b.admin_socket if seed % 2 else b.guest_socket)
        s.sendall(os.urandom(7 + 997 * seed))
        s.close()
        assert good.features().version == p.VERSION
    for message in (frame(p.Request.KEY_PROGRAM, p.VERSION | p.FLAG_NEED_REPLY, 192)[:7],
                    frame(p.Request.KEY_PROGRAM, p.VERSION | p.FLAG_NEED_REPLY, 192) + key_struct[:100],
                    frame(p.Request.MAP, p.VERSION, p.MAP_REQ.size)
                    + p.MAP_REQ.pack(0, PAGE, 3, 0, 0)[:9],
                    frame(p.Request.POWER_CYCLE, p.VERSION | p.FLAG_NEED_REPLY, 8)):
        s = raw(b.admin_socket)
        s.sendall(message)
        s.close()
        assert good.features().version == p.VERSION

    # Malformed but well-framed requests: refused, the connection stays usable.
    s = raw(b.admin_socket)
    for request, flags, payload, code in [
        (p.Request.MAP, p.VERSION | p.FLAG_NEED_REPLY, b"\x00" * 5, ErrorCode.INVALID),
        (p.Request.FLUSH, p.VERSION | p.FLAG_NEED_REPLY, b"\x00" * 17, ErrorCode.INVALID),
        (p.Request.RELOCATE, p.VERSION | p.FLAG_NEED_REPLY, p.RELOCATE_REQ.pack(0, 64 * PAGE, PAGE, 7, 0),
         ErrorCode.INVALID),
        (p.Request.INSPECT, p.VERSION | p.FLAG_NEED_REPLY, p.INSPECT_REQ.pack(0, 0, 0), ErrorCode.INVALID),
        (p.Request.INSPECT, p.VERSION | p.FLAG_NEED_REPLY, p.INSPECT_REQ.pack(0, 100000, 0),
         ErrorCode.INVALID),
        (p.Request.GET_FEATURES, p.VERSION | p.FLAG_REPLY, b"", ErrorCode.INVALID),
        (12345, p.VERSION | p.FLAG_NEED_REPLY, b"", ErrorCode.UNSUPPORTED),
    ]:
        s.sendall(frame(request, flags, len(payload)) + payload)
        reply = read_reply(s)
        assert reply is not None and reply[2] == code, (request, reply)
    # A short key-program struct is malformed on the wire: INVALID, nothing changes.
    s.sendall(frame(p.Request.KEY_PROGRAM, p.VERSION | p.FLAG_NEED_REPLY, 100) + key_struct[:100])
    reply = read_reply(s)
    assert reply is not None and reply[2] == ErrorCode.INVALID
    s.sendall(frame(p.Request.GET_FEATURES, p.VERSION | p.FLAG_NEED_REPLY, 0))
    reply = read_reply(s)
    assert reply is not None and reply[:3] == (p.Request.GET_FEATURES, p.VERSION | p.FLAG_REPLY, 0)
    s.close()

    assert state_of(b, good) == before
    stalled.close()
    half_header.close()
    assert state_of(b, good) == before
    assert b.running


def test_unknown_request_is_unsupported_and_the_connection_stays(backends):
    b = backends()
    for c in (b.client(), b.client(guest=True)):
        for request in (0, 12, 999, 0xFFFF_FFFF):
            with remote_error(ErrorCode.UNSUPPORTED):
                c.call(request)  # type: ignore[arg-type]
            assert c.features().version == p.VERSION
        assert c.config().size == b.size


def test_ack_only_requests_without_need_reply_get_no_reply_even_when_refused(backends):
    """docs/protocol.md: ack requests are answered only when NEED_REPLY is set."""
    b = backends()
    s = raw(b.admin_socket)
    good_map = p.MAP_REQ.pack(0, PAGE, 1, 0, 0)
    bad_map = p.MAP_REQ.pack(100, PAGE, 1, 0, 0)
    bad_relocate = p.RELOCATE_REQ.pack(0, 0, PAGE, 0, 0)
    for request, payload in [(p.Request.MAP, good_map), (p.Request.MAP, bad_map),
                             (p.Request.RELOCATE, bad_relocate), (p.Request.SET_BASE, b"\x01" * 8)]:
        s.sendall(frame(request, p.VERSION, len(payload)) + payload)
    s.sendall(frame(p.Request.GET_FEATURES, p.VERSION | p.FLAG_NEED_REPLY, 0))
    reply = read_reply(s)
    assert reply is not None and reply[0] == p.Request.GET_FEATURES, (
        f"the next reply should answer GET_FEATURES, got one for request {reply and reply[0]}")
    s.close()
    with b.client() as c:
        assert c.inspect(0)[0].keyid == 1  # the good MAP was done, silently


# -- roles -------------------------------------------------------------------------------------

def test_guest_role_is_denied_host_requests_and_may_do_the_rest(backends):
    b = backends()
    admin = b.client()
    guest = b.client(guest=True)
    assert admin.features().role == p.Role.ADMIN
    assert guest.features().role == p.Role.GUEST
    assert admin.config().view == str(b.view_path)
    assert guest.config().view is None  # the host path is not the guest's business

    key = os.urandom(16), os.urandom(16)
    program_user(guest, 4, *key)
    guest.map(0, 2 * PAGE, 4)
    plain = os.urandom(2 * PAGE)
    b.write(0, plain)
    assert guest.flush().written >= 2
    assert [r.keyid for r in guest.inspect(0, 2)] == [4, 4]
    guest.relocate(0, 16 * PAGE, 2 * PAGE, "keyed")
    assert b.read(16 * PAGE, 2 * PAGE) == plain

    before = state_of(b, admin)
    for request in (guest.power_cycle, guest.view_fd, guest.stats, lambda: guest.set_base(0x2000_0000)):
        with remote_error(ErrorCode.DENIED):
            request()
        assert guest.features().role == p.Role.GUEST
    assert state_of(b, admin) == before
    assert b.read(0, 2 * PAGE) == plain  # no power cycle happened
    assert admin.config().base == DEFAULT_BASE
    admin.power_cycle()  # the host may
    assert b.read(0, 2 * PAGE) != plain


def test_get_view_fd_returns_a_usable_descriptor_of_the_view(backends):
    b = backends(label_size="128K")
    c = b.client()
    fd, size = c.view_fd()
    try:
        assert size == b.size + b.label_size
        assert os.fstat(fd).st_size == size
        assert os.fstat(fd).st_ino == os.stat(b.view_path).st_ino
        view = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    try:
        plain = os.urandom(PAGE)
        view[5 * PAGE:6 * PAGE] = plain  # the guest writes through the handed-out fd
        c.flush()
        assert b.media(5 * PAGE, PAGE) == plain
        b.write(9 * PAGE, plain[::-1])
        assert view[9 * PAGE:10 * PAGE] == plain[::-1]
    finally:
        view.close()
    fd2, size2 = c.view_fd()  # again, on the same connection
    os.close(fd2)
    assert size2 == size and c.features().version == p.VERSION


# -- many clients at once ----------------------------------------------------------------------

def test_many_clients_at_once_all_get_answers(backends):
    b = backends()
    threads, rounds = 8, 15
    with b.client() as c:
        program_user(c, 1, os.urandom(16), os.urandom(16))
    errors: list[BaseException] = []
    answers = [0] * threads
    barrier = threading.Barrier(threads)

    def worker(i: int) -> None:
        try:
            with p.Client.connect(b.guest_socket if i % 2 else b.admin_socket, timeout=120) as c:
                off = (100 + 4 * i) * PAGE
                c.map(off, 2 * PAGE, i % 3)
                barrier.wait(60)
                for r in range(rounds):
                    plain = bytes([i, r]) * (PAGE // 2)
                    b.view[off:off + PAGE] = plain
                    assert c.flush(off, 2 * PAGE).written in (0, 1, 2)  # a full flush may have won
                    record = c.inspect(off)[0]
                    assert record.keyid == i % 3 and record.consistent
                    assert c.flush().written >= 0
                    assert c.config().size == b.size
                    answers[i] += 1
        except BaseException as exc:
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(120)
    assert not any(t.is_alive() for t in pool)
    assert not errors, errors
    assert answers == [rounds] * threads


# -- signals ------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_writes_back_unflushed_view_changes_and_exits_0(backends, sig):
    b = backends()
    key = os.urandom(16), os.urandom(16)
    with b.client() as c:
        program_user(c, 2, *key)
        c.map(10 * PAGE, 3 * PAGE, 2)
    plain_user, plain_tme = os.urandom(3 * PAGE), os.urandom(5 * PAGE)
    b.write(10 * PAGE, plain_user)
    b.write(40 * PAGE, plain_tme)
    assert b.media(40 * PAGE, 5 * PAGE) != plain_tme
    # Connections still open (one idle, one stalled mid-message) must not hold the exit up.
    idle, stalled = raw(b.admin_socket), raw(b.guest_socket)
    stalled.sendall(frame(p.Request.FLUSH, p.VERSION | p.FLAG_NEED_REPLY, 16) + b"\0" * 3)
    try:
        b.stop(sig, timeout=30)  # asserts exit status 0
    finally:
        idle.close()
        stalled.close()
    assert b.media(40 * PAGE, 5 * PAGE) == plain_tme
    media = b.media(10 * PAGE, 3 * PAGE)
    assert xts_fast(key[0] + key[1], media, DEFAULT_BASE + 10 * PAGE, 64, decrypt=True) == plain_user


# -- the command line ---------------------------------------------------------------------------

def test_cli_commands_and_json_output(backends):
    b = backends(label_size="128K")
    sock = str(b.admin_socket)
    status = cli("status", "--socket", sock, "--json")
    assert status.returncode == 0, status.stderr
    info = json.loads(status.stdout)
    assert {"view", "size", "base", "unit", "tweak"} <= set(info)
    assert (info["view"], info["size"], info["base"], info["unit"], info["tweak"]) == (
        str(b.view_path), b.size, DEFAULT_BASE, 64, "spa")
    assert cli("status", "--socket", sock).returncode == 0

    key, tweak = os.urandom(16).hex(), os.urandom(16).hex()
    run = cli("key", "--socket", sock, "--keyid", "3", "--user", f"{key}:{tweak}")
    assert (run.returncode, run.stdout.strip()) == (0, "PROG_SUCCESS"), run.stderr
    run = cli("map", "--socket", sock, "--offset", "0x4000", "--length", "8K", "--keyid", "3")
    assert run.returncode == 0, run.stderr
    plain = os.urandom(2 * PAGE)
    b.write(0x4000, plain)
    run = cli("flush", "--socket", sock)
    assert run.returncode == 0 and run.stdout.split()[0] == "2", run.stdout
    assert xts_fast(bytes.fromhex(key + tweak), b.media(0x4000, 2 * PAGE), DEFAULT_BASE + 0x4000, 64,
                    decrypt=True) == plain

    run = cli("inspect", "--socket", sock, "--offset", "0x4000", "--length", "8K", "--json")
    assert run.returncode == 0, run.stderr
    records = json.loads(run.stdout)
    assert [(r["offset"], r["keyid"], r["kind"], r["locked"], r["consistent"]) for r in records] == [
        (0x4000, 3, "user", False, True), (0x5000, 3, "user", False, True)]
    assert records[0]["view_head"] == plain[:16].hex()
    run = cli("inspect", "--socket", sock, "--pa", hex(DEFAULT_BASE + 0x5000), "--json")
    assert [r["offset"] for r in json.loads(run.stdout)] == [0x5000]
    assert cli("inspect", "--socket", sock, "--offset", "0x4000").returncode == 0

    run = cli("relocate", "--socket", sock, "--src", "0x4000", "--dst", "1M", "--length", "8K",
              "--mode", "keyed")
    assert run.returncode == 0, run.stderr
    assert b.read(1 << 20, 2 * PAGE) == plain
    assert cli("key", "--socket", sock, "--keyid", "5", "--options",
               f"type=user algorithm=aes-xts-128 key={tweak} tweak={key}").returncode == 0
    assert cli("power-cycle", "--socket", sock).returncode == 0
    assert b.read(1 << 20, 2 * PAGE) != plain
    assert b.client().stats().power_cycles == 1


def test_cli_errors_are_one_line_nonzero_and_change_nothing(backends):
    b = backends()
    setup_some_state(b)
    sock = str(b.admin_socket)
    good = b.client()
    secret = os.urandom(16).hex()
    failing = [
        ("map", "--socket", sock, "--offset", "100", "--length", "4K", "--keyid", "1"),
        ("map", "--socket", sock, "--offset", "0", "--length", "16M", "--keyid", "1"),
        ("map", "--socket", sock, "--offset", "0", "--length", "4K", "--keyid", "64"),
        ("flush", "--socket", sock, "--offset", "0x10", "--length", "4K"),
        ("relocate", "--socket", sock, "--src", "0", "--dst", "4K", "--length", "8K", "--mode", "raw"),
        ("relocate", "--socket", sock, "--src", "256K", "--dst", "1M", "--length", "4K", "--mode", "keyed"),
        ("inspect", "--socket", sock, "--offset", "8M"),
        ("inspect", "--socket", sock, "--pa", "0x1000"),
        ("key", "--socket", sock, "--keyid", "2", "--user", f"{secret}zz:{secret}"),
        ("key", "--socket", sock, "--keyid", "2", "--user", f"{secret}00:{secret}"),
        ("key", "--socket", sock, "--keyid", "2", "--user", secret),
        ("key", "--socket", sock, "--keyid", "2", "--options", f"type=user key={secret}"),
        ("key", "--socket", sock, "--keyid", "2", "--options", "type=bogus"),
        ("status", "--socket", str(b.root / "no-such.sock")),
        ("power-cycle", "--socket", str(b.state_dir / "media")),
    ]
    # KeyID 1 is programmed; give a page KeyID 9 (no key) for the keyed relocation case.
    good.map(64 * PAGE, PAGE, 9)
    before = state_of(b, good)
    for args in failing:
        run = cli(*args)
        assert run.returncode != 0, args
        err = run.stderr.strip()
        assert err and "\n" not in err, (args, run.stderr)
        assert err.startswith("mktme-emu: ") and "Traceback" not in err, (args, err)
        assert secret not in run.stderr and secret not in run.stdout, args
    # PCONFIG refusals are a status on stdout and a non-zero exit.
    for args, expected in [(("--keyid", "0", "--random"), "INVALID_KEYID"),
                           (("--keyid", "64", "--clear"), "INVALID_KEYID"),
                           (("--keyid", "2", "--user", f"{secret}:{secret}"), "INVALID_PROG_CMD")]:
        run = cli("key", "--socket", sock, *args)
        assert (run.returncode, run.stdout.strip()) == (1, expected), (args, run)
        assert secret not in run.stderr and secret not in run.stdout
    assert state_of(b, good) == before

    # serve refuses to reinterpret an existing state directory, and changes nothing in it.
    b.stop()
    files = b.state_files()
    run = cli("serve", "--state-dir", str(b.state_dir), "--view", str(b.view_path), "--size", "16M")
    assert run.returncode != 0
    err = run.stderr.strip()
    assert err.startswith("mktme-emu: ") and "\n" not in err, run.stderr
    assert b.state_files() == files


def test_serve_takes_left_out_options_from_the_state_dir(backends):
    b = backends(tweak="logical", tme="retained", unit=512, label_size="128K", keyid_bits=4,
                 base=0x3_0000_0000)
    with b.client() as c:
        expected = c.config()
        program_user(c, 3, os.urandom(16), os.urandom(16))
        c.map(0, PAGE, 3, 99)
        b.write(0, b"kept")
    b.stop()
    b.start(tweak=None, tme=None, unit=None, label_size=None, keyid_bits=None, base=None, size=None)
    with b.client() as c:
        assert c.config() == expected._replace(locked_pages=1)
        record = c.inspect(0)[0]
        assert (record.keyid, record.logical_tweak, record.locked) == (3, 99, True)
        assert b.read(0, 4) == b"kept"  # re-attached to the view


# -- key material ----------------------------------------------------------------------------------

def test_no_key_material_in_logs_state_dir_or_view(backends):
    b = backends(label_size="128K")  # -v: debug logging on
    sock = str(b.admin_socket)
    keys = {n: (os.urandom(16), os.urandom(16)) for n in (1, 2)}
    keys[3] = (os.urandom(32), os.urandom(32))
    keys[4] = (os.urandom(16), os.urandom(16))
    keys[6] = (os.urandom(16), os.urandom(16))
    entropy = os.urandom(32)
    refused = os.urandom(16)
    c = b.client()
    guest = b.client(guest=True)
    program_user(c, 1, *keys[1])
    program_user(guest, 2, *keys[2])
    run = cli("key", "--socket", sock, "--keyid", "3", "--alg", "aes-xts-256", "--user",
              f"{keys[3][0].hex()}:{keys[3][1].hex()}")
    assert run.returncode == 0, run.stderr
    run = cli("key", "--socket", sock, "--keyid", "4", "--options",
              f"type=user algorithm=aes-xts-128 key={keys[4][0].hex()} tweak={keys[4][1].hex()}")
    assert run.returncode == 0, run.stderr
    assert c.program_key(p.key_program(5, KeyCommand.SET_KEY_RANDOM, "aes-xts-128",
                                       entropy[:16].hex(), entropy[16:].hex())) is KeyStatus.PROG_SUCCESS
    assert c.program_key(user_program(7, refused, refused)) is KeyStatus.INVALID_PROG_CMD
    program_user(c, 6, *keys[6])
    for keyid in range(1, 8):
        c.map(keyid * 8 * PAGE, 4 * PAGE, keyid)
        b.write(keyid * 8 * PAGE, os.urandom(4 * PAGE))
    c.flush()
    c.relocate(8 * PAGE, 512 * PAGE, 4 * PAGE, "keyed")
    program(c, 6, KeyCommand.CLEAR_KEY)
    c.inspect(0, 256)
    c.stats()
    cli("status", "--socket", sock, "--json")
    c.power_cycle()
    b.restart()
    with b.client() as c2:
        program_user(c2, 1, *keys[1])
        c2.map(8 * PAGE, 4 * PAGE, 1)
    b.stop()

    secrets = [refused, entropy[:16], entropy[16:]]
    for data_key, tweak_key in keys.values():
        secrets += [data_key, tweak_key, data_key + tweak_key]
    needles = []
    for s in secrets:
        needles += [s, s.hex().encode(), s.hex().upper().encode()]
    places = {log.name: log.read_bytes() for log in b.logs}
    places.update({f"state/{name}": content for name, content in b.state_files().items()})
    places["view"] = b.view_path.read_bytes()
    assert places["view"] and places["state/media"]
    for where, content in places.items():
        for needle in needles:
            assert needle not in content, f"key material found in {where}"
    assert not [f for f in b.state_dir.iterdir() if "key" in f.name]  # bypass: no platform key either


# -- strict wire input --------------------------------------------------------------------------

def _key_struct_with(offset: int, value: bytes) -> bytes:
    raw = bytearray(user_program(2, os.urandom(16), os.urandom(16)).pack())
    raw[offset:offset + len(value)] = value
    return bytes(raw)


_NEED = p.VERSION | p.FLAG_NEED_REPLY
STRICT_CASES = [
    ("POWER_CYCLE with a payload", p.Request.POWER_CYCLE, b"garbage!"),
    ("GET_FEATURES with a payload", p.Request.GET_FEATURES, b"\0"),
    ("GET_CONFIG with a payload", p.Request.GET_CONFIG, b"\0" * 4),
    ("STATS with a payload", p.Request.STATS, b"\1"),
    ("GET_VIEW_FD with a payload", p.Request.GET_VIEW_FD, b"\0" * 8),
    ("KEY_PROGRAM KEYID_CTRL bits 31:24", p.Request.KEY_PROGRAM, _key_struct_with(5, b"\x01")),
    ("KEY_PROGRAM reserved byte 6", p.Request.KEY_PROGRAM, _key_struct_with(6, b"\x01")),
    ("KEY_PROGRAM reserved byte 63", p.Request.KEY_PROGRAM, _key_struct_with(63, b"\x80")),
    ("KEY_PROGRAM one byte too long", p.Request.KEY_PROGRAM, _key_struct_with(0, b"") + b"\0"),
    ("FLUSH length 0 with an offset", p.Request.FLUSH, p.RANGE_REQ.pack(8 * PAGE, 0)),
    ("FLUSH short", p.Request.FLUSH, p.RANGE_REQ.pack(0, PAGE)[:15]),
    ("MAP unknown flag bits", p.Request.MAP, p.MAP_REQ.pack(0, PAGE, 1, 2, 0)),
    ("MAP tweak without its flag", p.Request.MAP, p.MAP_REQ.pack(0, PAGE, 1, 0, 5)),
    ("MAP long", p.Request.MAP, p.MAP_REQ.pack(0, PAGE, 1, 0, 0) + b"\0"),
    ("RELOCATE reserved field", p.Request.RELOCATE, p.RELOCATE_REQ.pack(0, 64 * PAGE, PAGE, 0, 1)),
    ("RELOCATE unknown mode", p.Request.RELOCATE, p.RELOCATE_REQ.pack(0, 64 * PAGE, PAGE, 2, 0)),
    ("INSPECT reserved field", p.Request.INSPECT, p.INSPECT_REQ.pack(0, 1, 1)),
    ("SET_BASE short", p.Request.SET_BASE, b"\0" * 7),
]


def test_malformed_payloads_are_invalid_and_change_nothing(backends):
    """docs/protocol.md: exact payload sizes; reserved fields and unknown flag bits zero."""
    b = backends()
    setup_some_state(b)
    good = b.client()
    before = state_of(b, good)
    s = raw(b.admin_socket)
    try:
        for name, request, payload in STRICT_CASES:
            s.sendall(frame(request, _NEED, len(payload)) + payload)
            reply = read_reply(s)
            assert reply is not None and reply[0] == request, (name, reply)
            assert reply[2] == ErrorCode.INVALID, (name, reply)
            assert state_of(b, good) == before, name
    finally:
        s.close()
    assert good.stats().power_cycles == 0


def test_a_version_1_client_is_told_in_its_own_framing(backends):
    """A v1 header gets a v1 error reply (request 0, INVALID) naming version 2, then a close."""
    b = backends()
    for path in (b.admin_socket, b.guest_socket):
        s = raw(path)
        try:
            s.sendall(LEGACY_HEADER.pack(p.Request.GET_FEATURES, 1 | p.FLAG_NEED_REPLY, 0))
            head = recv_exact(s, LEGACY_HEADER.size)
            request, flags, size = LEGACY_HEADER.unpack(head)
            body = recv_exact(s, size)
            assert (request, flags) == (0, 1 | p.FLAG_REPLY)
            assert struct.unpack_from("<I", body)[0] == ErrorCode.INVALID
            assert b"version 2" in body[4:]
            assert recv_exact(s, 1) == b"", "the connection should have been closed"
        finally:
            s.close()
    assert b.client().features().version == 2
