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
