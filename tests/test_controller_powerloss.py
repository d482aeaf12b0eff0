"""Power loss at every durable call of a request, as CrashMonkey and ALICE test filesystems.

SIGKILL cannot tear a write that already reached the page cache, so the
SIGKILL crash test would pass without the double-write journal.  Here the
I/O seam records every write and rename not yet made durable; at the chosen
call the process "dies", and the files are rewound to what a power loss may
leave: the durable state plus a subset of the pending writes, whole or torn
at 512-byte sectors, in any order.  The view (in /dev/shm) is lost too.  The
restarted controller must then find every page old or new, decrypting under
the key it was written with (checked with the tests' independent XTS), and
everything acknowledged intact.

Every crash point is tried with torn writes and with one of drop or reorder
(alternating); ``MKTME_POWERLOSS_ALL=1`` tries all three everywhere, and
``MKTME_POWERLOSS_STRIDE`` (default 1: every call) thins the crash points.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from backend_helpers import xts_fast
from fault_io import Died, NoSyncIO, PowerLossIO
from mktme_emu.controller import ControllerConfig, MemoryController, RelocateMode, open_controller
from mktme_emu.controller.media import REWRITE_FILE
from mktme_emu.protocol import KeyCommand, key_program

SIZE = 2 << 20
PAGE = 4096
PAGES = SIZE // PAGE
HALF = PAGES // 2  # pages [0, HALF) under KeyID 1 (key A)
DST = HALF  # pages [DST, DST + MOVED) under KeyID 2 (key B); the rest KeyID 0 (bypass)
MOVED = 64
BASE = 0x1_0000_0000
KEYS = {1: ("11" * 16, "22" * 16), 2: ("33" * 16, "44" * 16)}
KEY_C = ("55" * 16, "66" * 16)
MODES = ("drop", "reorder", "tear")
STRIDE = int(os.environ.get("MKTME_POWERLOSS_STRIDE", "1"))
ALL_MODES = os.environ.get("MKTME_POWERLOSS_ALL") == "1"


# How write-backs reach the media: always through the journal, or as soon as
# anything changed by rewriting the media file (see emulator/controller/media.py).
WRITE_PATHS = {"journal": None, "rewrite": 0.0}


def config(root: Path, path: str = "journal") -> ControllerConfig:
    return ControllerConfig(state_dir=root / "state", size=SIZE, base=BASE, view_path=root / "view",
                            rewrite_at=WRITE_PATHS[path])


def program(c: MemoryController, keyid: int, key: tuple[str, str]) -> None:
    raw = key_program(keyid, KeyCommand.SET_KEY_DIRECT, "aes-xts-128", *key).pack()
    assert c.program_key(raw) == 0


def raw_key(key: tuple[str, str]) -> bytes:
    return bytes.fromhex(key[0]) + bytes.fromhex(key[1])


OLD = np.random.default_rng(1).bytes(SIZE)
NEW = np.random.default_rng(2).bytes(SIZE)


@dataclass(frozen=True)
class Operation:
    run: Callable[[MemoryController], object]
    keyids_after: frozenset[int]  # what pages [0, HALF) may be mapped with after a crash
    writes_back: tuple[range, ...]  # the pages an answer guarantees on the media
    relocates: bool = False


OPERATIONS = {
    "flush": Operation(lambda c: c.flush(), frozenset({1}), (range(PAGES),)),
    "map": Operation(lambda c: c.map_range(0, HALF * PAGE, 2), frozenset({1, 2}), (range(HALF),)),
    "program": Operation(lambda c: program(c, 1, KEY_C), frozenset({1}), (range(HALF),)),
    "power-cycle": Operation(lambda c: c.power_cycle(), frozenset({0, 1}), (range(PAGES),)),
    "relocate-keyed": Operation(
        lambda c: c.relocate(0, DST * PAGE, MOVED * PAGE, RelocateMode.KEYED), frozenset({1}),
        (range(MOVED),), True),
}


def prepare(root: Path, io: PowerLossIO, path: str) -> MemoryController:
    """OLD acknowledged by a flush; NEW written by the guest, not yet flushed."""
    c = open_controller(config(root, path), io=io)
    program(c, 1, KEYS[1])
    program(c, 2, KEYS[2])
    c.map_range(0, HALF * PAGE, 1)
    c.map_range(DST * PAGE, MOVED * PAGE, 2)
    c.view.data[:SIZE] = OLD
    c.flush()
    c.view.data[:SIZE] = NEW
    return c


def crash_points(root: Path, op: Operation, path: str) -> range:
    io = PowerLossIO()
    c = prepare(root, io, path)
    first = len(io.calls)
    op.run(c)
    last = len(io.calls)
    c.close()
    return range(first + 1, last + 1)


def page(data: bytes, index: int) -> bytes:
    return data[index * PAGE:(index + 1) * PAGE]


def decrypt(key: tuple[str, str], data: bytes, first_page: int) -> bytes:
    return xts_fast(raw_key(key), data, BASE + first_page * PAGE, 64, decrypt=True)


def media_plaintext(media: bytes, keyids: np.ndarray, op: Operation) -> list[bytes]:
    """Each page's media decrypted with the key it was last written with."""
    under_a = decrypt(KEYS[1], media[:(DST + MOVED) * PAGE], 0)
    under_b = decrypt(KEYS[2], media[DST * PAGE:(DST + MOVED) * PAGE], DST)
    plain = [page(under_a, i) for i in range(HALF)]
    for i in range(DST, DST + MOVED):
        moved_here = op.relocates and keyids[i] == 1
        plain.append(page(under_a, i) if moved_here else page(under_b, i - DST))
    plain += [page(media, i) for i in range(DST + MOVED, PAGES)]  # KeyID 0: bypass
    return plain


def allowed(index: int, keyid_now: int, op: Operation) -> set[bytes]:
    if op.relocates and DST <= index < DST + MOVED and keyid_now == 1:
        index -= DST  # the page moved here from the source
    return {page(OLD, index), page(NEW, index)}


def check_restart(root: Path, op: Operation, acknowledged: bool, where: str) -> None:
    c = open_controller(config(root), io=NoSyncIO())  # the real files, no faults
    assert not (root / "state" / REWRITE_FILE).exists(), f"{where}: an interrupted rewrite was left"
    keyids = c.page_keyid.copy()
    assert set(keyids[:HALF].tolist()) <= op.keyids_after, where
    assert len(set(keyids[:HALF].tolist())) == 1, f"{where}: KeyIDs of one request mixed"
    program(c, 1, KEYS[1])
    program(c, 2, KEYS[2])
    media = (root / "state" / "media").read_bytes()
    plain = media_plaintext(media, keyids, op)
    for i in range(PAGES):
        assert plain[i] in allowed(i, int(keyids[i]), op), \
            f"{where}: page {i} (KeyID {int(keyids[i])}) is neither old nor new"
        if acknowledged and any(i in pages for pages in op.writes_back):
            assert plain[i] == page(NEW, i), f"{where}: page {i} lost an acknowledged write"
    if acknowledged and op.relocates:
        assert set(keyids[DST:DST + MOVED].tolist()) == {1}, where
        assert [plain[DST + i] for i in range(MOVED)] == [page(NEW, i) for i in range(MOVED)], \
            f"{where}: acknowledged relocation lost"
    view = bytes(c.view.data[:SIZE])
    if set(keyids[:HALF].tolist()) == {1}:  # the lost view was filled again from the media
        assert view[:HALF * PAGE] == b"".join(plain[:HALF]), f"{where}: view not refilled"
    assert view[(DST + MOVED) * PAGE:] == media[(DST + MOVED) * PAGE:], where
    c.close()


@pytest.mark.parametrize("path", list(WRITE_PATHS))
@pytest.mark.parametrize("name", list(OPERATIONS))
def test_power_loss_at_any_call_leaves_every_page_old_or_new(tmp_path: Path, name: str, path: str) -> None:
    op = OPERATIONS[name]
    points = crash_points(tmp_path / "count", op, path)
    assert len(points) >= 5
    torn = 0
    for n, index in enumerate([*points[::STRIDE], None]):  # None: lost right after the answer
        for mode in MODES if ALL_MODES else ("tear", MODES[n % 2]):
            root = tmp_path / f"{index}-{mode}"
            rng = random.Random(f"{name}/{index}/{mode}")  # repeatable
            io = PowerLossIO(None if index is None else
                             (lambda call, index=index: "die" if call.index == index else None))
            c = prepare(root, io, path)
            acknowledged = False
            try:
                op.run(c)
                acknowledged = True
            except Died:
                pass
            assert acknowledged == (index is None), (index, io.fired)
            c.abandon()
            torn += io.power_loss(rng, mode) > 0
            (root / "view").unlink()  # a power loss empties /dev/shm
            check_restart(root, op, acknowledged, f"{name} call {index} {mode}")
    assert torn > len(points) // 2, "the crash points had nothing pending: the test tests nothing"


class _KeepNothing(random.Random):
    """A power loss that keeps none of the writes still pending (every choice says drop)."""

    def random(self) -> float:
        return 0.99


def test_a_journal_record_left_unretired_never_replays_over_a_later_rewrite(tmp_path: Path) -> None:
    """A retire is not synced (a lost one only replays the same batch again): true while
    every media write goes through the journal.  A rewrite of the media file bypasses it,
    so a stale record replayed after a power loss would put older data over the rewrite."""
    root = tmp_path / "device"
    io = PowerLossIO()
    c = open_controller(config(root, "rewrite"), io=io)
    program(c, 1, KEYS[1])
    c.map_range(0, HALF * PAGE, 1)
    c.view.data[:SIZE] = OLD
    c.flush()
    c.relocate(0, DST * PAGE, MOVED * PAGE, RelocateMode.KEYED)  # through the journal
    c.view.data[:SIZE] = NEW
    assert c.flush().written > 0  # a rewrite: acknowledged, durable
    c.abandon()
    io.power_loss(_KeepNothing(), "drop")
    (root / "view").unlink()
    after = open_controller(config(root), io=NoSyncIO())
    program(after, 1, KEYS[1])
    assert bytes(after.view.data[:SIZE]) == NEW, "an acknowledged flush was undone by a stale replay"
    after.close()
