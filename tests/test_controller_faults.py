"""Failed, short and refused I/O, locks, crafted state and lost keys, in-process (issue 8).

Faults go through the controller's I/O seam (``fault_io.FaultyIO``), never
by monkeypatching.  Each test names the old behaviour it guards against.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from backend_helpers import xts_fast
from fault_io import FaultyIO, at_call
from mktme_emu.controller import (
    ControllerConfig,
    FlushResult,
    MemoryController,
    RelocateMode,
    open_controller,
)
from mktme_emu.controller.media import REWRITE_FILE
from mktme_emu.crypto import XtsKey
from mktme_emu.errors import ControllerError, CryptoError, ErrorCode, StateError
from mktme_emu.fileio import atomic_write
from mktme_emu.keytable import KeyTable, TmePolicy
from mktme_emu.protocol import KeyCommand, key_program

SIZE = 2 << 20
PAGE = 4096
BASE = 0x1_0000_0000
KEY_A = ("11" * 16, "22" * 16)
KEY_B = ("33" * 16, "44" * 16)


def config(tmp_path: Path, **extra: object) -> ControllerConfig:
    fields: dict[str, object] = {"state_dir": tmp_path / "state", "size": SIZE, "base": BASE,
                                 "view_path": tmp_path / "view", **extra}
    return ControllerConfig(**fields)  # type: ignore[arg-type]


def program(c: MemoryController, keyid: int, key: tuple[str, str] = KEY_A) -> None:
    raw = key_program(keyid, KeyCommand.SET_KEY_DIRECT, "aes-xts-128", *key).pack()
    assert c.program_key(raw) == 0


def xts_key(key: tuple[str, str]) -> bytes:
    return bytes.fromhex(key[0]) + bytes.fromhex(key[1])


def media(tmp_path: Path) -> bytes:
    return (tmp_path / "state" / "media").read_bytes()


# -- atomic_write: all or nothing (bug 2) --------------------------------------------------------

def test_atomic_write_on_a_full_disk_raises_and_keeps_the_old_file(tmp_path: Path) -> None:
    """Old code: os.write's short count was ignored and the short file renamed over the good one.

    RLIMIT_FSIZE makes the kernel cut the write short exactly as a full disk
    does; a child process carries the limit so pytest's own files are safe.
    """
    target = tmp_path / "metadata"
    target.write_bytes(b"GOOD" * 1024)
    script = textwrap.dedent(f"""
        import resource, signal, sys
        from pathlib import Path
        from mktme_emu.fileio import atomic_write
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))
        try:
            atomic_write(Path({str(target)!r}), b"NEW!" * 8192)
        except OSError as exc:
            print("raised", exc.errno)
            sys.exit(0)
        print("returned")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["raised", str(errno.EFBIG)], run.stdout
    assert target.read_bytes() == b"GOOD" * 1024
    assert not (tmp_path / "metadata.tmp").exists()


@pytest.mark.parametrize("action", ["eio", "enospc"])
@pytest.mark.parametrize("call", [1, 2, 3, 4, 5, 6])  # open, pwrite, fsync, rename, open dir, fsync dir
def test_atomic_write_fails_cleanly_at_every_call(tmp_path: Path, action: str, call: int) -> None:
    target = tmp_path / "file"
    target.write_bytes(b"old")
    io = FaultyIO(at_call(call, action))
    with pytest.raises(OSError):
        atomic_write(target, b"new" * 100, io=io)
    assert io.fired is not None and io.fired.index == call
    renamed = call > 4  # the rename happened; only its durability failed
    assert target.read_bytes() == (b"new" * 100 if renamed else b"old")
    assert not (tmp_path / "file.tmp").exists()


def test_atomic_write_finishes_short_writes(tmp_path: Path) -> None:
    target = tmp_path / "file"
    io = FaultyIO(lambda call: "short" if call.name == "pwrite" and call.offset == 0 else None)
    atomic_write(target, bytes(range(256)) * 64, io=io)
    assert target.read_bytes() == bytes(range(256)) * 64
    assert [c.name for c in io.calls].count("pwrite") == 2


def test_a_write_that_makes_no_progress_is_enospc(tmp_path: Path) -> None:
    class NoSpace(FaultyIO):
        def pwrite(self, fd: int, data: object, offset: int) -> int:
            return 0

    target = tmp_path / "file"
    target.write_bytes(b"old")
    with pytest.raises(OSError) as err:
        atomic_write(target, b"new", io=NoSpace())
    assert err.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"old"


# -- one backend per state directory and per view (bug 3) -------------------------------------

def test_a_second_open_of_a_state_directory_is_refused_naming_the_pid(tmp_path: Path) -> None:
    """Old code: two controllers on one state directory both ran, overwriting each other."""
    first = open_controller(config(tmp_path))
    try:
        with pytest.raises(StateError) as err:
            open_controller(config(tmp_path, view_path=tmp_path / "other-view"))
        assert f"pid {os.getpid()}" in str(err.value) and "\n" not in str(err.value)
        assert not (tmp_path / "other-view").exists()  # refused before anything was touched
        with pytest.raises(StateError, match=r"view .* is in use"):
            open_controller(ControllerConfig(state_dir=tmp_path / "state2", size=SIZE,
                                             view_path=tmp_path / "view"))
    finally:
        first.close()
    open_controller(config(tmp_path)).close()  # released on close


def test_a_refused_open_touches_nothing(tmp_path: Path) -> None:
    first = open_controller(config(tmp_path))
    first.view.data[:5] = b"dirty"
    before = {f.name: f.read_bytes() for f in (tmp_path / "state").iterdir() if f.name != "lock"}
    with pytest.raises(StateError):
        open_controller(config(tmp_path))
    after = {f.name: f.read_bytes() for f in (tmp_path / "state").iterdir() if f.name != "lock"}
    assert after == before
    assert bytes(first.view.data[:5]) == b"dirty"
    first.close()


# -- keys lost in a restart (smaller holes) ---------------------------------------------------------

def lost_key_device(tmp_path: Path) -> MemoryController:
    """KeyID 1 maps pages 0..3; the backend restarts, so KeyID 1's key is lost."""
    c = open_controller(config(tmp_path))
    program(c, 1)
    c.map_range(0, 4 * PAGE, 1)
    c.view.data[:4 * PAGE] = b"SECRET!!" * (PAGE // 2)
    c.close()
    return open_controller(config(tmp_path))


def test_map_onto_a_keyid_whose_key_was_lost_is_refused_with_no_key(tmp_path: Path) -> None:
    """Old code: the MAP succeeded, and what the guest then wrote was silently dropped."""
    c = lost_key_device(tmp_path)
    keyids_before = c.page_keyid.copy()
    with pytest.raises(ControllerError) as err:
        c.map_range(8 * PAGE, 2 * PAGE, 1)
    assert err.value.code == ErrorCode.NO_KEY
    assert (c.page_keyid == keyids_before).all()
    c.map_range(8 * PAGE, 2 * PAGE, 2)  # another KeyID is fine
    program(c, 1)  # programming it again ends the lost state
    c.map_range(8 * PAGE, 2 * PAGE, 1)
    c.close()


def test_flush_and_inspect_report_pages_that_cannot_be_written_back(tmp_path: Path) -> None:
    """Old code: flush returned a bare count and never said that writes were dropped."""
    c = lost_key_device(tmp_path)
    stored = media(tmp_path)
    c.view.data[:PAGE] = os.urandom(PAGE)  # the guest writes into a locked page
    c.view.data[100 * PAGE:101 * PAGE] = b"\x01" * PAGE
    assert c.flush() == FlushResult(written=1, unwritable=4)
    assert c.flush(0, 2 * PAGE) == FlushResult(written=0, unwritable=2)
    assert c.flush(8 * PAGE, PAGE) == FlushResult(written=0, unwritable=0)
    assert media(tmp_path)[:4 * PAGE] == stored[:4 * PAGE]
    info = c.inspect(0, 6)
    assert [(i.keyid, i.locked, i.consistent) for i in info] == \
        [(1, True, None)] * 4 + [(0, False, True)] * 2
    assert c.locked_pages() == {1: 4}
    program(c, 1)
    assert c.flush() == FlushResult(written=0, unwritable=0)
    assert bytes(c.view.data[:4 * PAGE]) == b"SECRET!!" * (PAGE // 2)
    assert not any(i.locked for i in c.inspect(0, 4))
    c.close()


# -- crafted state is refused before replay (smaller holes) -------------------------------------

_JR_HEAD = struct.Struct("<QQIIQ")
_JR_MAGIC = 0x4C4E524A4D544B4D


def journal_record(offsets: list[int], count: int | None = None) -> bytes:
    index = np.asarray(offsets, dtype="<u8").tobytes()
    body = index + b"\xee" * (PAGE * len(offsets))
    n = len(offsets) if count is None else count
    return _JR_HEAD.pack(_JR_MAGIC, 7, n, zlib.crc32(body), 0) + body


@pytest.mark.parametrize("record", [
    pytest.param(journal_record([(1 << 40) - PAGE]), id="page-at-1TiB"),
    pytest.param(journal_record([SIZE]), id="page-just-past-the-end"),
    pytest.param(journal_record([100]), id="unaligned"),
    pytest.param(journal_record([0], count=0xFFFFFFFF), id="count-0xFFFFFFFF"),
])
def test_a_crafted_journal_record_is_refused_before_replay(tmp_path: Path, record: bytes) -> None:
    """Old code: the media grew to 1 TiB, or a count of 0xFFFFFFFF died in MemoryError."""
    open_controller(config(tmp_path)).close()
    (tmp_path / "state" / "journal").write_bytes(record)
    before = media(tmp_path)
    with pytest.raises(StateError) as err:
        open_controller(config(tmp_path))
    assert "journal" in str(err.value) and "\n" not in str(err.value)
    assert (tmp_path / "state" / "media").stat().st_size == SIZE
    assert media(tmp_path) == before
    (tmp_path / "state" / "journal").unlink()  # what the message says to do
    open_controller(config(tmp_path)).close()  # and no lock was left behind


MetadataChange = Callable[[dict[str, object], bytes], tuple[dict[str, object], bytes]]


def rewrite_metadata(tmp_path: Path, change: MetadataChange) -> None:
    path = tmp_path / "state" / "metadata"
    raw = path.read_bytes()
    (header_len,) = struct.unpack_from("<I", raw, 8)
    header = json.loads(raw[12:12 + header_len])
    arrays = raw[12 + header_len:-4]
    header, arrays = change(header, arrays)
    text = json.dumps(header).encode()
    body = b"MKTMEMD1" + struct.pack("<I", len(text)) + text + arrays
    path.write_bytes(body + struct.pack("<I", zlib.crc32(body)))


@pytest.mark.parametrize("change", [
    pytest.param(lambda h, a: ({**h, "pages": 0xFFFFFFFF}, a), id="pages-0xFFFFFFFF"),
    pytest.param(lambda h, a: ({**h, "keyids": 1 << 20}, a), id="keyids-huge"),
    pytest.param(lambda h, a: ({**h, "pending_fill": [[0, 1 << 40]]}, a), id="pending-fill-past-the-end"),
    pytest.param(lambda h, a: (h, b"\xff\xff" + a[2:]), id="page-keyid-65535"),
    pytest.param(lambda h, a: ({**h, "config": {**h["config"], "base": 5}}, a), id="unaligned-base"),
    pytest.param(lambda h, a: ({"pages": 3}, a), id="no-config"),
])
def test_crafted_metadata_is_one_clear_error(tmp_path: Path, change: MetadataChange) -> None:
    open_controller(config(tmp_path)).close()
    rewrite_metadata(tmp_path, change)
    with pytest.raises(StateError) as err:
        open_controller(config(tmp_path))
    assert "metadata" in str(err.value) and "\n" not in str(err.value)


# -- the view truncated or deleted under a running backend (smaller holes) -------------------------

@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_damaged_view_is_a_clear_error_not_a_crash(tmp_path: Path, damage: str,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Old code: the first touch of a truncated view killed the process with SIGBUS."""
    c = open_controller(config(tmp_path))
    if damage == "truncate":
        os.truncate(tmp_path / "view", PAGE)
    else:
        (tmp_path / "view").unlink()
    for request in (c.flush, lambda: c.map_range(0, PAGE, 0), lambda: c.inspect(SIZE - PAGE),
                    c.power_cycle, lambda: c.relocate(0, SIZE - PAGE, PAGE, RelocateMode.RAW)):
        with pytest.raises(StateError, match="view"):
            request()
    assert "view" in caplog.text
    with pytest.raises(StateError):
        c.close()  # the write-back at exit cannot happen either: never a silent success
    if damage == "truncate":
        with pytest.raises(StateError, match="holds 4096 bytes"):
            open_controller(config(tmp_path))  # a start checks the size before mapping
        (tmp_path / "view").unlink()
    open_controller(config(tmp_path)).close()  # everything was released


# -- keys are zeroed ---------------------------------------------------------------------------

def test_a_wiped_key_is_zeroed_and_never_builds_a_cipher() -> None:
    key = XtsKey(bytes(range(32)))
    key.contexts()
    held = key._key  # the very buffer the key bytes live in
    key.wipe()
    assert held == bytearray(32) and key.wiped
    with pytest.raises(CryptoError):
        key.contexts()


def test_power_cycle_wipes_the_old_ephemeral_platform_key() -> None:
    table = KeyTable(tme=TmePolicy.EPHEMERAL)
    old = table.cipher(0)
    assert old is not None
    table.power_cycle()
    assert old.wiped
    new = table.cipher(0)
    assert new is not None and not new.wiped


def test_closing_a_controller_wipes_its_keys(tmp_path: Path) -> None:
    c = open_controller(config(tmp_path, tme=TmePolicy.EPHEMERAL))
    program(c, 1)
    keys = [c.keys.cipher(0), c.keys.cipher(1)]
    c.close()
    assert all(k is not None and k.wiped for k in keys)


# -- faults at every durable call of a flush, a map and a key program -------------------------------

# How write-backs reach the media: always through the journal, or as soon as
# anything changed by rewriting the media file (see emulator/controller/media.py).
WRITE_PATHS = {"journal": None, "rewrite": 0.0}


def prepared(tmp_path: Path, io: FaultyIO, path: str = "journal") -> tuple[MemoryController, bytes]:
    """KeyID 1 (key A) over the first half, flushed; then new, unflushed guest writes."""
    c = open_controller(config(tmp_path, rewrite_at=WRITE_PATHS[path]), io=io)
    program(c, 1)
    c.map_range(0, SIZE // 2, 1)
    c.view.data[:SIZE] = np.random.default_rng(1).bytes(SIZE)
    c.flush()
    new = np.random.default_rng(2).bytes(SIZE)
    c.view.data[:SIZE] = new
    return c, new


OPERATIONS: dict[str, Callable[[MemoryController], object]] = {
    "flush": lambda c: c.flush(),
    "map": lambda c: c.map_range(0, SIZE // 2, 2),
    "program": lambda c: program(c, 1, KEY_B),
    "power-cycle": lambda c: c.power_cycle(),
}


def count_calls(tmp_path: Path, operation: str, path: str) -> tuple[int, int]:
    io = FaultyIO(sync=False)
    c, _ = prepared(tmp_path / "count", io, path)
    first = len(io.calls)
    OPERATIONS[operation](c)
    last = len(io.calls)
    c.close()
    return first, last


@pytest.mark.parametrize("path", list(WRITE_PATHS))
@pytest.mark.parametrize("operation", list(OPERATIONS))
def test_a_fault_at_any_call_is_reported_and_leaves_a_consistent_device(
        tmp_path: Path, operation: str, path: str) -> None:
    first, last = count_calls(tmp_path, operation, path)
    assert last - first >= 5
    for action in ("eio", "enospc", "short"):
        for index in range(first + 1, last + 1):
            root = tmp_path / f"{action}-{index}"
            io = FaultyIO(at_call(index, action), sync=False)
            c, new = prepared(root, io, path)
            try:
                OPERATIONS[operation](c)
            except OSError:
                assert action != "short", "a short write must be finished, not reported"
            else:  # a fault in a new media file (before its rename) is redone through the journal
                recovered = io.fired is not None and io.fired.path is not None \
                    and io.fired.path.name == REWRITE_FILE
                assert action == "short" or io.fired is None or recovered, (action, index, io.fired)
            check_consistent(root, c, io, new, operation)


def check_consistent(root: Path, c: MemoryController, io: FaultyIO, new: bytes, operation: str) -> None:
    """After the fault: the device still works, and the media holds the guest's data."""
    io.rule = None  # the disk has space again
    keyids = set(c.page_keyid[:SIZE // 2 // PAGE].tolist())
    assert len(keyids) == 1 and keyids <= {0, 1, 2}, keyids  # all old or all new
    keyid = keyids.pop()
    c.flush()
    c.close()
    stored = media(root)
    plain = xts_fast(xts_key(KEY_A), stored[:SIZE // 2], BASE, 64, decrypt=True)
    assert plain == new[:SIZE // 2], f"KeyID-1 half lost (now KeyID {keyid}) at {io.fired}"
    assert stored[SIZE // 2:] == new[SIZE // 2:]


# -- a raw relocation between KeyIDs (a surviving mutation) -----------------------------------------

def test_raw_relocation_between_keyids_keeps_the_destination_keyid(tmp_path: Path) -> None:
    c = open_controller(config(tmp_path))
    program(c, 1)
    program(c, 2, KEY_B)
    c.map_range(0, 2 * PAGE, 1)
    c.map_range(8 * PAGE, 2 * PAGE, 2)
    c.view.data[:2 * PAGE] = b"SRC-DATA" * (PAGE // 4)
    c.relocate(0, 8 * PAGE, 2 * PAGE, RelocateMode.RAW)
    info = c.inspect(8 * PAGE, 2)
    assert [(i.keyid, i.kind, i.consistent) for i in info] == [(2, "user", True)] * 2
    assert media(tmp_path)[8 * PAGE:10 * PAGE] == media(tmp_path)[:2 * PAGE]
    assert bytes(c.view.data[8 * PAGE:10 * PAGE]) != b"SRC-DATA" * (PAGE // 4)
    c.close()


def test_the_seam_sees_every_durable_write(tmp_path: Path) -> None:
    """The power-loss tests rely on it: no media, journal, metadata or label write bypasses ``io``."""
    names = set()
    for path in WRITE_PATHS:
        io = FaultyIO()
        c, _ = prepared(tmp_path / path, io, path)
        c.close()
        names |= {(call.name, call.path.name if call.path else "") for call in io.calls}
    for expected in [("pwritev", "journal"), ("fdatasync", "journal"), ("pwritev", "media"),
                     ("fdatasync", "media"), ("pwrite", "metadata.tmp"), ("rename", "metadata"),
                     ("ftruncate", "media"), ("pwritev", "media.new"), ("fdatasync", "media.new"),
                     ("rename", "media"), ("fsync", "state")]:
        assert expected in names, expected
