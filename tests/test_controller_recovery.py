"""The controller in-process: crashes and failures at awkward moments lose nothing.

A crash is simulated by an exception escaping at the chosen point and the
controller object being abandoned without close(), which leaves the files
as a SIGKILL there would.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from mktme_emu.controller import ControllerConfig, MemoryController
from mktme_emu.controller import controller as controller_module
from mktme_emu.protocol import KeyCommand, key_program

SIZE = 4 << 20
BASE = 0x1_0000_0000


class Crash(Exception):
    pass


def config(tmp_path: Path, view: str = "view") -> ControllerConfig:
    return ControllerConfig(state_dir=tmp_path / "state", size=SIZE, base=BASE,
                            view_path=tmp_path / view)


def media(tmp_path: Path) -> bytes:
    return (tmp_path / "state" / "media").read_bytes()


def test_crash_during_the_start_up_fill_of_a_new_view_loses_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = MemoryController(config(tmp_path))
    first.view.data[:] = b"\xab" * SIZE
    first.close()
    (tmp_path / "view").unlink()  # a host reboot emptied /dev/shm
    real_fill = MemoryController._fill

    def fill_then_die(self: MemoryController, start: int, end: int) -> None:
        real_fill(self, start, min(end, start + 100))
        raise Crash

    monkeypatch.setattr(MemoryController, "_fill", fill_then_die)
    with pytest.raises(Crash):
        MemoryController(config(tmp_path))
    monkeypatch.setattr(MemoryController, "_fill", real_fill)
    again = MemoryController(config(tmp_path))
    assert bytes(again.view.data) == b"\xab" * SIZE  # the interrupted fill was redone
    assert again.flush() == 0
    again.close()
    assert media(tmp_path) == b"\xab" * SIZE


def test_a_map_whose_state_cannot_be_persisted_changes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c = MemoryController(config(tmp_path))
    program = key_program(1, KeyCommand.SET_KEY_DIRECT, "aes-xts-128", "11" * 16, "22" * 16)
    c.program_key(program.pack())
    c.map_range(0, 4096, 1)
    c.view.data[:4096] = b"SECRET!!" * 512
    c.flush()

    def disk_full(*_: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(controller_module, "save_metadata", disk_full)
    with pytest.raises(OSError):
        c.map_range(0, 4096, 0)
    with pytest.raises(OSError):
        c.program_key(key_program(1, KeyCommand.CLEAR_KEY).pack())
    assert int(c.page_keyid[0]) == 1 and c.keys.cipher(1) is not None
    monkeypatch.undo()
    assert c.flush() == 0
    assert b"SECRET!!" not in media(tmp_path)
    c.close()


def test_a_stale_view_under_another_path_is_not_trusted(tmp_path: Path) -> None:
    old = MemoryController(config(tmp_path, "v1"))
    old.view.data[:8] = b"OLDDATA!"
    old.close()
    new = MemoryController(config(tmp_path, "v2"))  # v2 is new: filled from the media
    assert bytes(new.view.data[:8]) == b"OLDDATA!"
    new.view.data[:8] = b"NEWDATA!"
    new.close()
    back = MemoryController(config(tmp_path, "v1"))  # v1 still holds OLDDATA! from before
    assert bytes(back.view.data[:8]) == b"NEWDATA!"
    back.close()
    assert media(tmp_path)[:8] == b"NEWDATA!"


KEYS = {1: ("11" * 16, "22" * 16), 2: ("33" * 16, "44" * 16)}


def program(c: MemoryController, keyid: int) -> None:
    raw = key_program(keyid, KeyCommand.SET_KEY_DIRECT, "aes-xts-128", *KEYS[keyid]).pack()
    assert c.program_key(raw) == 0


@pytest.mark.parametrize("when", ["after-journal-record", "before-second-record"])
def test_crash_during_keyed_relocation_leaves_old_or_new_pages(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str) -> None:
    from mktme_emu.controller import RelocateMode
    from mktme_emu.controller.persist import Journal

    cfg = ControllerConfig(state_dir=tmp_path / "state", size=16 << 20, base=BASE,
                           view_path=tmp_path / "view")
    span = 2048 * 4096  # two journal batches of 1024 pages
    c = MemoryController(cfg)
    program(c, 1)
    program(c, 2)
    c.map_range(0, span, 1)
    c.map_range(span, span, 2)
    c.view.data[:span] = b"SRC-DATA" * (span // 8)
    c.view.data[span:2 * span] = b"DST-OLD!" * (span // 8)
    c.flush()
    real_record = Journal.record
    calls = []

    def record_then_crash(self: Journal, pages, states=None):  # type: ignore[no-untyped-def]
        calls.append(len(pages))
        if when == "before-second-record" and len(calls) == 2:
            raise Crash
        real_record(self, pages, states)
        if when == "after-journal-record" and len(calls) == 2:
            raise Crash  # the record is durable, the media not yet written

    monkeypatch.setattr(Journal, "record", record_then_crash)
    with pytest.raises(Crash):
        c.relocate(0, span, span, RelocateMode.KEYED)
    monkeypatch.undo()
    again = MemoryController(cfg)
    program(again, 1)
    program(again, 2)
    keyids = again.page_keyid[2048:4096].tolist()
    for i in range(2048):
        page = bytes(again.view.data[span + i * 4096:span + (i + 1) * 4096])
        expected = b"SRC-DATA" if keyids[i] == 1 else b"DST-OLD!"
        assert page == expected * 512, (i, keyids[i], page[:8])
    moved = keyids.count(1)
    assert moved == (2048 if when == "after-journal-record" else 1024)
    again.close()
