"""The controller in-process: crashes and failures at awkward moments lose nothing.

A crash is simulated through the I/O seam (``fault_io``): at the chosen call
the fake "dies" (every later durable call fails too), and the controller is
abandoned without writing anything, which leaves the files as a SIGKILL
there would.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from fault_io import Call, Died, FaultyIO
from mktme_emu.controller import ControllerConfig, MemoryController, open_controller
from mktme_emu.controller.statelog import LOG_FILE, PREALLOCATE
from mktme_emu.errors import StateError
from mktme_emu.protocol import KeyCommand, key_program

SIZE = 4 << 20
BASE = 0x1_0000_0000


def config(tmp_path: Path, view: str = "view") -> ControllerConfig:
    return ControllerConfig(state_dir=tmp_path / "state", size=SIZE, base=BASE,
                            view_path=tmp_path / view)


def media(tmp_path: Path) -> bytes:
    return (tmp_path / "state" / "media").read_bytes()


def is_metadata_rename(call: Call) -> bool:
    """A save of the page state: the metadata file's replacement, or a state-log record
    (not the zeros a checkpoint writes ahead into the emptied log)."""
    if call.path is None:
        return False
    return ((call.name == "rename" and call.path.name == "metadata")
            or (call.name == "pwrite" and call.path.name == LOG_FILE and call.size != PREALLOCATE))


def test_crash_during_the_start_up_fill_of_a_new_view_loses_nothing(tmp_path: Path) -> None:
    first = open_controller(config(tmp_path))
    first.view.data[:] = b"\xab" * SIZE
    first.close()
    (tmp_path / "view").unlink()  # a host reboot emptied /dev/shm
    renames = []

    def die_at_second_metadata_rename(call: Call) -> str | None:
        renames.extend([call] if is_metadata_rename(call) else [])
        return "die" if len(renames) == 2 else None  # the fill is marked pending, not done

    io = FaultyIO(die_at_second_metadata_rename)
    with pytest.raises(Died):
        open_controller(config(tmp_path), io=io)
    # The fill a crash interrupts may have left any part of the view unfilled.
    with open(tmp_path / "view", "r+b") as view:
        view.write(b"\x00" * (SIZE // 2))
    again = open_controller(config(tmp_path))
    assert bytes(again.view.data) == b"\xab" * SIZE  # the interrupted fill was redone
    assert again.flush().written == 0
    again.close()
    assert media(tmp_path) == b"\xab" * SIZE


def test_a_failed_start_releases_everything_and_can_be_retried(tmp_path: Path) -> None:
    """Old code: a constructor that raised leaked its descriptors, mapping and threads."""
    open_controller(config(tmp_path)).close()
    (tmp_path / "view").unlink()  # so the start has a fill to do, with the pool's threads
    fds, threads = len(os.listdir("/proc/self/fd")), threading.active_count()
    for action in ("eio", "enospc", "die"):
        for nth in (1, 2):  # the first metadata write, or the one after the fill
            def rule(call: Call, action: str = action, nth: int = nth,
                     seen: list[Call] = []) -> str | None:  # noqa: B006 - one list per rule
                seen.extend([call] if is_metadata_rename(call) else [])
                return action if is_metadata_rename(call) and len(seen) == nth else None

            with pytest.raises((Died, StateError)):
                open_controller(config(tmp_path), io=FaultyIO(rule))
            assert len(os.listdir("/proc/self/fd")) == fds, (action, nth)
            assert threading.active_count() == threads, (action, nth)
    again = open_controller(config(tmp_path))  # no lock was left behind
    again.close()


@pytest.mark.parametrize("action", ["eio", "enospc"])
def test_a_map_whose_state_cannot_be_persisted_changes_nothing(tmp_path: Path, action: str) -> None:
    rule: dict[str, str | None] = {"action": None}
    io = FaultyIO(lambda call: rule["action"] if is_metadata_rename(call) else None)
    c = open_controller(config(tmp_path), io=io)
    program = key_program(1, KeyCommand.SET_KEY_DIRECT, "aes-xts-128", "11" * 16, "22" * 16)
    c.program_key(program.pack())
    c.map_range(0, 4096, 1)
    c.view.data[:4096] = b"SECRET!!" * 512
    c.flush()
    rule["action"] = action
    with pytest.raises(OSError):
        c.map_range(0, 4096, 0)
    with pytest.raises(OSError):
        c.program_key(key_program(1, KeyCommand.CLEAR_KEY).pack())
    assert int(c.page_keyid[0]) == 1 and c.keys.cipher(1) is not None
    rule["action"] = None
    assert c.flush().written == 0
    assert b"SECRET!!" not in media(tmp_path)
    c.close()


def test_a_stale_view_under_another_path_is_not_trusted(tmp_path: Path) -> None:
    old = open_controller(config(tmp_path, "v1"))
    old.view.data[:8] = b"OLDDATA!"
    old.close()
    new = open_controller(config(tmp_path, "v2"))  # v2 is new: filled from the media
    assert bytes(new.view.data[:8]) == b"OLDDATA!"
    new.view.data[:8] = b"NEWDATA!"
    new.close()
    back = open_controller(config(tmp_path, "v1"))  # v1 still holds OLDDATA! from before
    assert bytes(back.view.data[:8]) == b"NEWDATA!"
    back.close()
    assert media(tmp_path)[:8] == b"NEWDATA!"


KEYS = {1: ("11" * 16, "22" * 16), 2: ("33" * 16, "44" * 16)}


def program(c: MemoryController, keyid: int) -> None:
    raw = key_program(keyid, KeyCommand.SET_KEY_DIRECT, "aes-xts-128", *KEYS[keyid]).pack()
    assert c.program_key(raw) == 0


@pytest.mark.parametrize("when", ["after-journal-record", "before-second-record",
                                  "after-second-retire"])
def test_crash_during_keyed_relocation_leaves_old_or_new_pages(tmp_path: Path, when: str) -> None:
    from mktme_emu.controller import RelocateMode

    cfg = ControllerConfig(state_dir=tmp_path / "state", size=16 << 20, base=BASE,
                           view_path=tmp_path / "view")
    span = 2048 * 4096  # two journal batches of 1024 pages
    armed = {"on": False}
    seen: dict[str, int] = {"pwritev": 0, "fdatasync": 0, "pwrite": 0}

    def rule(call: Call) -> str | None:
        if not armed["on"] or call.path is None or call.path.name != "journal":
            return None
        if call.name in seen and call.offset == 0:  # a record's first write, or its retire
            seen[call.name] += 1
        if when == "before-second-record" and call.name == "pwritev" and seen["pwritev"] == 2:
            return "die"
        if when == "after-journal-record" and call.name == "fdatasync" and seen["fdatasync"] == 2:
            return "die-after"  # the record is durable, the media not yet written
        if when == "after-second-retire" and call.name == "pwrite" and seen["pwrite"] == 2:
            return "die-after"  # the second batch is on the media and retired
        return None

    io = FaultyIO(rule)
    c = open_controller(cfg, io=io)
    program(c, 1)
    program(c, 2)
    c.map_range(0, span, 1)
    c.map_range(span, span, 2)
    c.view.data[:span] = b"SRC-DATA" * (span // 8)
    c.view.data[span:2 * span] = b"DST-OLD!" * (span // 8)
    c.flush()
    armed["on"] = True
    with pytest.raises(Died):
        c.relocate(0, span, span, RelocateMode.KEYED)
    assert io.fired is not None
    c.abandon()
    again = open_controller(cfg)
    program(again, 1)
    program(again, 2)
    keyids = again.page_keyid[2048:4096].tolist()
    for i in range(2048):
        page = bytes(again.view.data[span + i * 4096:span + (i + 1) * 4096])
        expected = b"SRC-DATA" if keyids[i] == 1 else b"DST-OLD!"
        assert page == expected * 512, (i, keyids[i], page[:8])
    moved = keyids.count(1)
    assert moved == (1024 if when == "before-second-record" else 2048)
    assert [r.keyid for r in again.inspect(span, 4)] == [1] * 4
    again.close()
