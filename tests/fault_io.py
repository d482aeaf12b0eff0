"""Fakes of the controller's I/O seam (``mktme_emu.fileio.FileIO``) for fault injection.

- :class:`FaultyIO` numbers every durable call (open, pwrite, pwritev, fdatasync,
  fsync, ftruncate, rename, unlink) and, at the call a rule picks, fails it
  (EIO, ENOSPC), writes short, or "dies" (before or right after the call):
  from then on every durable call raises :class:`Died`, as if the process
  were gone, and the test abandons the controller.
- :class:`PowerLossIO` also records every write and rename not yet made
  durable (fdatasync/fsync of the file, fsync of the directory for a
  rename) and, after a death, rewinds the files to what a power loss could
  have left: the durable state plus any subset of the pending writes, cut at
  512-byte sectors and applied in any order (CrashMonkey / ALICE style).
"""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mktme_emu.fileio import Buffer, FileIO

SECTOR = 512


class Died(BaseException):  # a death, not an error: no handler may catch it
    """The simulated process death: no code under test may catch it."""


@dataclass(frozen=True)
class Call:
    """One durable call through the seam."""

    index: int  # 1-based, in call order
    name: str
    path: Path | None
    offset: int = 0
    size: int = 0


# What a rule answers for a call: None (go on), "eio", "enospc", "short", "die" (before
# the call) or "die-after" (the call completes, then the process dies).
Rule = Callable[[Call], str | None]


class FaultyIO(FileIO):
    """The real OS, with a fault where ``rule`` says.  ``calls`` logs every durable call.

    ``sync`` False skips the real fsyncs (tests that never lose power, only faster).
    """

    def __init__(self, rule: Rule | None = None, sync: bool = True) -> None:
        self.rule = rule
        self.sync = sync
        self.calls: list[Call] = []
        self.dead = False
        self.fired: Call | None = None
        self._paths: dict[int, Path] = {}

    # -- the rule machinery --------------------------------------------------

    def _enter(self, name: str, path: Path | None, offset: int = 0, size: int = 0) -> str | None:
        if self.dead:
            raise Died(f"{name} after death")
        call = Call(len(self.calls) + 1, name, path, offset, size)
        self.calls.append(call)
        action = self.rule(call) if self.rule else None
        if action is not None:
            self.fired = call
        if action == "die":
            self.dead = True
            raise Died(f"died at {call}")
        if action in ("eio", "enospc"):
            code = errno.EIO if action == "eio" else errno.ENOSPC
            raise OSError(code, os.strerror(code), str(path))
        return action

    def _leave(self, action: str | None) -> None:
        if action == "die-after":
            self.dead = True
            raise Died("died right after the call")

    def path_of(self, fd: int) -> Path | None:
        return self._paths.get(fd)

    # -- the seam --------------------------------------------------------------

    def open(self, path: Path, flags: int, mode: int = 0o600) -> int:
        action = self._enter("open", Path(path))
        fd = super().open(path, flags, mode)
        self._paths[fd] = Path(path)
        self._leave(action)
        return fd

    def close(self, fd: int) -> None:  # not durable: a dead process's files close too
        self._paths.pop(fd, None)
        super().close(fd)

    def pwrite(self, fd: int, data: Buffer, offset: int) -> int:
        view = memoryview(data).cast("B")
        action = self._enter("pwrite", self.path_of(fd), offset, len(view))
        if action == "short":
            view = view[:max(0, len(view) // 2 - 1)]
        done = self._do_write(fd, bytes(view), offset)
        self._leave(action)
        return done

    def pwritev(self, fd: int, buffers: Sequence[Buffer], offset: int) -> int:
        data = b"".join(bytes(b) for b in buffers)
        action = self._enter("pwritev", self.path_of(fd), offset, len(data))
        if action == "short":
            data = data[:max(0, len(data) // 2 - 1)]
        done = self._do_write(fd, data, offset)
        self._leave(action)
        return done

    def _do_write(self, fd: int, data: bytes, offset: int) -> int:
        return os.pwrite(fd, data, offset) if data else 0

    def fdatasync(self, fd: int) -> None:
        action = self._enter("fdatasync", self.path_of(fd))
        self._synced(fd)
        self._leave(action)

    def fsync(self, fd: int) -> None:
        action = self._enter("fsync", self.path_of(fd))
        self._synced(fd)
        self._leave(action)

    def _synced(self, fd: int) -> None:
        if self.sync:
            os.fsync(fd)

    def ftruncate(self, fd: int, size: int) -> None:
        action = self._enter("ftruncate", self.path_of(fd), size=size)
        super().ftruncate(fd, size)
        self._leave(action)

    def rename(self, src: Path, dst: Path) -> None:
        action = self._enter("rename", Path(dst))
        self._do_rename(Path(src), Path(dst))
        self._leave(action)

    def _do_rename(self, src: Path, dst: Path) -> None:
        os.replace(src, dst)

    def unlink(self, path: Path) -> None:
        action = self._enter("unlink", Path(path))
        super().unlink(path)
        self._leave(action)


def at_call(index: int, action: str) -> Rule:
    """A rule: ``action`` at call number ``index``."""
    return lambda call: action if call.index == index else None


@dataclass
class _Pending:
    """A write or rename the power may still take away."""

    kind: str  # "write" or "rename"
    path: Path
    offset: int = 0
    old: bytes = b""  # what the bytes were before (write), or the old target (rename)
    new: bytes = b""
    old_size: int = 0  # the file's size before the write (it may have grown)
    existed: bool = True  # did the rename's target exist before


class NoSyncIO(FileIO):
    """The real OS without fsync/fdatasync: for tests that simulate durability themselves
    (real syncs would only make them slow)."""

    def fdatasync(self, fd: int) -> None:
        pass

    def fsync(self, fd: int) -> None:
        pass


class PowerLossIO(FaultyIO):
    """FaultyIO that can rewind the files to a state a power loss at the death could leave.

    It never really syncs: durability is what it tracks itself.
    """

    def __init__(self, rule: Rule | None = None) -> None:
        super().__init__(rule)
        self.pending: list[_Pending] = []

    def _do_write(self, fd: int, data: bytes, offset: int) -> int:
        path = self.path_of(fd)
        assert path is not None
        size = os.fstat(fd).st_size
        with open(path, "rb") as f:  # fd may be write-only
            f.seek(offset)
            old = f.read(len(data))
        self.pending.append(_Pending("write", path, offset, old, data, size))
        return super()._do_write(fd, data, offset)

    def _synced(self, fd: int) -> None:
        path = self.path_of(fd)
        if path is not None and path.is_dir():  # the directory's renames are durable now
            self.pending = [p for p in self.pending if not (p.kind == "rename" and p.path.parent == path)]
        else:
            self.pending = [p for p in self.pending if not (p.kind == "write" and p.path == path)]

    def _do_rename(self, src: Path, dst: Path) -> None:
        existed = dst.exists()
        old = dst.read_bytes() if existed else b""
        self.pending.append(_Pending("rename", dst, old=old, new=src.read_bytes(), existed=existed))
        super()._do_rename(src, dst)

    def power_loss(self, rng: random.Random, mode: str) -> int:
        """Rewind every pending change, then replay a subset as a power loss may have kept it.

        ``mode``: "drop" keeps a random subset of whole writes in order;
        "reorder" keeps a random subset of whole writes in random order;
        "tear" keeps a random subset of 512-byte sectors in random order.
        Renames of one file survive as a prefix of their order.  Returns the
        number of pending changes there were.
        """
        changes = list(self.pending)
        for change in reversed(changes):
            _undo(change)
        writes = [c for c in changes if c.kind == "write"]
        renames = [c for c in changes if c.kind == "rename"]
        kept_renames = renames[:rng.randint(0, len(renames))]
        pieces = _pieces(writes, rng, mode)
        for piece in pieces:
            _apply_write(piece)
        for change in kept_renames:
            change.path.write_bytes(change.new)
        self.pending = []
        return len(changes)


def _pieces(writes: list[_Pending], rng: random.Random, mode: str) -> list[_Pending]:
    if mode == "drop":
        return [w for w in writes if rng.random() < 0.5]
    if mode == "reorder":
        kept = [w for w in writes if rng.random() < 0.7]
        rng.shuffle(kept)
        return kept
    assert mode == "tear", mode
    sectors = []
    for w in writes:
        first = w.offset - w.offset % SECTOR
        for start in range(first, w.offset + len(w.new), SECTOR):
            lo, hi = max(start, w.offset), min(start + SECTOR, w.offset + len(w.new))
            sectors.append(_Pending("write", w.path, lo, new=w.new[lo - w.offset:hi - w.offset]))
    kept = [s for s in sectors if rng.random() < 0.5]
    rng.shuffle(kept)
    return kept


def _undo(change: _Pending) -> None:
    if change.kind == "rename":
        if change.existed:
            change.path.write_bytes(change.old)
        else:
            change.path.unlink(missing_ok=True)
        return
    with open(change.path, "r+b") as f:
        f.seek(change.offset)
        f.write(change.old)
        if change.old_size < change.offset + len(change.new):  # the write had grown the file
            f.truncate(change.old_size)


def _apply_write(change: _Pending) -> None:
    with open(change.path, "r+b") as f:
        f.seek(change.offset)
        f.write(change.new)
