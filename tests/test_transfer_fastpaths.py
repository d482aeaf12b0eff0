"""The fast paths of fill, write-back and page-state persistence stay exact.

Fill and write-back move data through the view's descriptor, skip holes of
the media, and skip chunks whose keyed digest is unchanged (see
docs/performance.md); the page state of small maps goes to an append-only
log.  Each test here checks a way those shortcuts could lose a write or
state, at sizes that run in a second.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from fault_io import Call, Died, FaultyIO
from mktme_emu.controller import ControllerConfig, MemoryController, open_controller
from mktme_emu.controller.config import DEFAULT_REWRITE_AT
from mktme_emu.controller.digest import CHUNK_BYTES
from mktme_emu.controller.media import REWRITE_FILE
from mktme_emu.controller.persist import load_metadata
from mktme_emu.controller.progress import Activity
from mktme_emu.controller.results import RelocateMode
from mktme_emu.controller.statelog import GENERATION, LOG_FILE, encode_record
from mktme_emu.errors import StateError
from mktme_emu.protocol import KeyCommand, key_program

SIZE = 4 << 20
PAGE = 4096
BASE = 0x100000000


def config(tmp_path: Path, size: int = SIZE, view: str = "view",
           rewrite_at: float | None = DEFAULT_REWRITE_AT) -> ControllerConfig:
    return ControllerConfig(state_dir=tmp_path / "state", size=size, base=BASE,
                            view_path=tmp_path / view, rewrite_at=rewrite_at)


def media(tmp_path: Path) -> bytes:
    return (tmp_path / "state" / "media").read_bytes()


def program(c: MemoryController, keyid: int = 1) -> None:
    c.program_key(key_program(keyid, KeyCommand.SET_KEY_DIRECT, "aes-xts-128",
                              f"{keyid:02x}" * 16, f"{keyid + 8:02x}" * 16).pack())


def all_consistent(c: MemoryController, pages: int) -> bool:
    """media == write-back(view) for every page: nothing the guest wrote is pending."""
    return all(info.consistent for start in range(0, pages, 64)
               for info in c.inspect(start * PAGE, min(64, pages - start)))


def is_media_sparse(tmp_path: Path) -> bool:
    fd = os.open(tmp_path / "state" / "media", os.O_RDONLY)
    try:
        os.lseek(fd, 0, os.SEEK_DATA)
    except OSError as exc:
        return exc.errno == errno.ENXIO
    finally:
        os.close(fd)
    return False


# -- fill: holes and new views -------------------------------------------------------------------


def test_a_new_device_needs_no_fill_and_its_first_flush_writes_nothing(tmp_path: Path) -> None:
    c = open_controller(config(tmp_path))
    assert bytes(c.view.data) == bytes(SIZE)
    assert c.flush().written == 0
    c.close()
    assert is_media_sparse(tmp_path)  # no page of zeros was ever written


def test_holes_of_the_media_are_zeroed_in_a_view_that_is_not_trusted(tmp_path: Path) -> None:
    c = open_controller(config(tmp_path))
    c.view.data[CHUNK_BYTES:CHUNK_BYTES + 5] = b"HELLO"
    c.close()
    stale = tmp_path / "stale"
    stale.write_bytes(b"\xee" * SIZE)  # a view of the right size, but not this device's
    d = open_controller(config(tmp_path, view="stale"))
    assert bytes(d.view.data[:CHUNK_BYTES]) == bytes(CHUNK_BYTES)  # a hole: zeroed
    assert bytes(d.view.data[CHUNK_BYTES:CHUNK_BYTES + 6]) == b"HELLO\0"
    assert bytes(d.view.data[2 * CHUNK_BYTES:]) == bytes(SIZE - 2 * CHUNK_BYTES)
    d.close()


def test_a_keyed_fill_of_holes_decrypts_zeros(tmp_path: Path) -> None:
    c = open_controller(config(tmp_path))
    program(c)
    c.map_range(0, SIZE, 1)
    assert bytes(c.view.data[:PAGE]) != bytes(PAGE)  # decrypt(key 1, zeros) is not zero
    assert c.flush().written == 0
    assert all_consistent(c, SIZE // PAGE)
    c.close()


# -- write-back: the digests must never hide a write ------------------------------------------


def test_one_byte_per_chunk_is_written_back_under_a_user_keyid(tmp_path: Path) -> None:
    c = open_controller(config(tmp_path))
    program(c)
    c.map_range(0, SIZE, 1)
    c.view.data[:] = os.urandom(SIZE)
    assert c.flush().written == SIZE // PAGE
    assert c.flush().written == 0  # digests now vouch for every chunk
    chunks = SIZE // CHUNK_BYTES
    for chunk in range(chunks):  # one byte per chunk, each in another page of its chunk
        at = chunk * CHUNK_BYTES + (chunk % 16) * PAGE + 100
        c.view.data[at] ^= 0x01
    assert c.flush().written == chunks  # exactly the changed pages, none missed
    assert all_consistent(c, SIZE // PAGE)
    c.close()


def test_a_write_that_restores_the_old_bytes_writes_nothing(tmp_path: Path) -> None:
    c = open_controller(config(tmp_path))
    c.view.data[:4] = b"ABCD"
    assert c.flush().written == 1
    c.view.data[:4] = b"WXYZ"
    c.view.data[:4] = b"ABCD"
    assert c.flush().written == 0
    c.close()


def test_a_restart_reattaching_the_view_compares_everything_once(tmp_path: Path) -> None:
    c = open_controller(config(tmp_path))
    program(c)
    c.map_range(0, SIZE, 1)
    c.flush()
    c.view.data[7 * PAGE:7 * PAGE + 4] = b"LATE"  # never flushed before the backend dies
    c.abandon()
    again = open_controller(config(tmp_path))  # the view is re-attached, digests unknown
    assert bytes(again.view.data[7 * PAGE:7 * PAGE + 4]) == b"LATE"
    assert again.keys.is_lost(1)  # a user key does not survive; its pages are locked
    assert again.flush().written == 0
    program(again)  # programming it again writes back nothing and refills the view
    again.close()


def test_a_restart_without_lost_keys_writes_back_what_the_guest_left(tmp_path: Path) -> None:
    c = open_controller(config(tmp_path))
    c.view.data[:] = os.urandom(SIZE)
    c.flush()
    c.view.data[9 * PAGE + 1] ^= 0xFF
    c.abandon()
    again = open_controller(config(tmp_path))
    assert again.flush().written == 1
    again.close()
    assert media(tmp_path)[9 * PAGE + 1] == again_view_byte(tmp_path, 9 * PAGE + 1)


def again_view_byte(tmp_path: Path, offset: int) -> int:
    return (tmp_path / "view").read_bytes()[offset]


def test_a_relocation_invalidates_the_destination_digests(tmp_path: Path) -> None:
    c = open_controller(config(tmp_path))
    c.view.data[:CHUNK_BYTES] = b"\x11" * CHUNK_BYTES
    c.view.data[CHUNK_BYTES:2 * CHUNK_BYTES] = b"\x22" * CHUNK_BYTES
    c.flush()
    c.relocate(0, CHUNK_BYTES, CHUNK_BYTES, RelocateMode.RAW)
    assert bytes(c.view.data[CHUNK_BYTES:2 * CHUNK_BYTES]) == b"\x11" * CHUNK_BYTES
    c.view.data[CHUNK_BYTES] = 0x33
    assert c.flush().written == 1
    assert media(tmp_path)[CHUNK_BYTES] == 0x33
    c.close()


def test_digests_are_recorded_only_for_batches_that_reached_the_media(tmp_path: Path) -> None:
    size = 24 << 20  # more than one journal batch: the write-back pipeline is used
    rule: dict[str, int | None] = {"fail_at": None}
    records: list[Call] = []

    def fail_second_journal_record(call: Call) -> str | None:
        """The second batch never reaches the journal, so never the media."""
        if call.name == "pwritev" and call.path is not None and call.path.name == "journal":
            records.append(call)
            if rule["fail_at"] is not None and len(records) == rule["fail_at"]:
                return "eio"
        return None

    c = open_controller(config(tmp_path, size, rewrite_at=None), io=FaultyIO(fail_second_journal_record))
    c.view.data[:] = b"\x5a" * size
    records.clear()
    rule["fail_at"] = 2
    with pytest.raises(OSError):
        c.flush()
    rule["fail_at"] = None
    c.flush()  # whatever the failed flush wrote or not, the retry leaves nothing out
    assert media(tmp_path) == b"\x5a" * size
    assert c.flush().written == 0
    c.close()


def test_a_rewrite_that_fails_is_redone_through_the_journal(tmp_path: Path) -> None:
    """A new media file that cannot be written (a full disk) changes nothing: the same
    write-back goes through the journal, the flush is answered, the file is gone."""
    size = 24 << 20
    fails = {"on": True}

    def full_disk_for_new_files(call: Call) -> str | None:
        new_file = call.path is not None and call.path.name == REWRITE_FILE
        return "enospc" if fails["on"] and new_file and call.name == "pwritev" else None

    io = FaultyIO(full_disk_for_new_files)
    c = open_controller(config(tmp_path, size, rewrite_at=0.0), io=io)
    c.view.data[:] = b"\x5a" * size
    assert c.flush().written == size // PAGE  # answered: through the journal
    assert io.fired is not None and io.fired.path is not None and io.fired.path.name == REWRITE_FILE
    assert media(tmp_path) == b"\x5a" * size
    assert not (tmp_path / "state" / REWRITE_FILE).exists()
    journaled = [call for call in io.calls if call.path is not None and call.path.name == "journal"]
    assert journaled, "the retry did not go through the journal"
    fails["on"] = False
    c.view.data[:PAGE] = b"\xa5" * PAGE
    assert c.flush().written == 1
    assert media(tmp_path)[:PAGE] == b"\xa5" * PAGE
    c.close()


# -- the page-state log --------------------------------------------------------------------------


def log_write(call: Call) -> bool:
    return call.name == "pwrite" and call.path is not None and call.path.name == LOG_FILE


@pytest.mark.parametrize("when", ["die", "die-after"])
def test_a_map_dying_at_its_log_record_keeps_the_old_or_the_new_state(tmp_path: Path,
                                                                       when: str) -> None:
    first = open_controller(config(tmp_path))
    first.view.data[:4] = b"KEEP"
    first.close()
    armed = {"on": False}
    io = FaultyIO(lambda call: when if armed["on"] and log_write(call) else None)
    c = open_controller(config(tmp_path), io=io)
    program(c, 2)  # a random-free user key: lost after the restart either way
    armed["on"] = True
    with pytest.raises(Died):
        c.map_range(PAGE, 2 * PAGE, 2)
    c.abandon()
    again = open_controller(config(tmp_path))
    expected = 2 if when == "die-after" else 0  # the record made it, or nothing did
    assert int(again.page_keyid[1]) == expected and int(again.page_keyid[3]) == 0
    assert bytes(again.view.data[:4]) == b"KEEP"
    again.close()


def test_maps_go_to_the_log_and_survive_a_restart(tmp_path: Path) -> None:
    c = open_controller(config(tmp_path))
    metadata = (tmp_path / "state" / "metadata").read_bytes()
    for i in range(8):
        c.map_range(i * PAGE, PAGE, 0, None)
    assert (tmp_path / "state" / "metadata").read_bytes() == metadata  # no rewrite
    assert (tmp_path / "state" / LOG_FILE).stat().st_size > 0
    program(c, 3)
    c.map_range(5 * PAGE, 3 * PAGE, 3)
    c.abandon()
    again = open_controller(config(tmp_path))
    assert [int(k) for k in again.page_keyid[4:9]] == [0, 3, 3, 3, 0]
    again.close()


def test_a_torn_or_stale_log_tail_is_ignored(tmp_path: Path) -> None:
    c = open_controller(config(tmp_path))
    program(c, 3)
    c.map_range(0, PAGE, 3)
    c.abandon()
    log = tmp_path / "state" / LOG_FILE
    good = log.read_bytes()
    log.write_bytes(good + good[:len(good) // 2])  # a record torn by a crash mid-append
    again = open_controller(config(tmp_path))  # the first save checkpoints (new generation)
    assert int(again.page_keyid[0]) == 3
    again.map_range(0, PAGE, 0)
    again.abandon()
    log.write_bytes(log.read_bytes() + good)  # records of the old generation: stale
    last = open_controller(config(tmp_path))
    assert int(last.page_keyid[0]) == 0
    last.close()


def test_a_damaged_log_record_is_one_clear_error(tmp_path: Path) -> None:
    open_controller(config(tmp_path)).close()
    generation = load_metadata(tmp_path / "state").config[GENERATION]
    pages = SIZE // PAGE
    bad = encode_record(generation, {}, [0], [], [(pages - 1, pages + 5)],  # type: ignore[arg-type]
                        np.zeros(pages + 5, np.uint16), np.zeros(pages + 5, np.uint64))
    (tmp_path / "state" / LOG_FILE).write_bytes(bad)
    with pytest.raises(StateError, match="state log"):
        open_controller(config(tmp_path))


# -- progress ---------------------------------------------------------------------------------------


def test_progress_is_logged_at_most_once_a_second(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    activity = Activity(clock=lambda: now[0])
    caplog.set_level(logging.INFO, "mktme_emu.controller.progress")
    activity.begin("fill", 100 << 20)
    for _ in range(10):
        now[0] += 0.25
        activity.advance(10 << 20)
        assert activity.busy.startswith("fill ")
    activity.end()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("fill 40% of 100 MiB") and lines[1].startswith("fill 80%")
    assert lines[-1].startswith("fill done: 100 MiB in 2.5 s") and len(lines) == 3
    assert activity.busy == ""


def test_media_sync_is_skipped_only_when_every_media_write_was_synced(tmp_path: Path) -> None:
    rule: dict[str, str | None] = {"action": None}

    def media_sync(call: Call) -> bool:
        return call.name == "fdatasync" and call.path is not None and call.path.name == "media"

    io = FaultyIO(lambda call: rule["action"] if media_sync(call) else None)
    c = open_controller(config(tmp_path, rewrite_at=None), io=io)  # the journal's media syncs
    c.media.sync()
    before = sum(media_sync(call) for call in io.calls)
    c.media.sync()  # nothing written since: no barrier
    assert sum(media_sync(call) for call in io.calls) == before
    c.view.data[:4] = b"SYNC"
    rule["action"] = "eio"
    with pytest.raises(OSError):
        c.flush()  # the pages reached the media, their fdatasync failed
    rule["action"] = None
    c.media.sync()  # so this one must really sync
    assert sum(media_sync(call) for call in io.calls) == before + 2
    c.close()


def test_a_log_that_cannot_be_emptied_after_a_checkpoint_refuses_nothing(tmp_path: Path) -> None:
    c = open_controller(config(tmp_path))
    program(c, 3)
    c.map_range(0, PAGE, 3)  # an old-generation record stays in the log below
    c.abandon()

    def truncate_of_log(call: Call) -> str | None:
        is_log = call.path is not None and call.path.name == LOG_FILE
        return "eio" if call.name == "ftruncate" and is_log else None

    again = open_controller(config(tmp_path), io=FaultyIO(truncate_of_log))  # checkpoints
    again.map_range(PAGE, PAGE, 0)  # must not append after the stale record: checkpoints again
    again.abandon()
    last = open_controller(config(tmp_path))
    assert int(last.page_keyid[0]) == 3 and int(last.page_keyid[1]) == 0
    last.close()
