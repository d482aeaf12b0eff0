"""Opening a device: lock, load, replay the journal, fill the view.

:func:`open_controller` is the only way to get a :class:`MemoryController`.
It takes the state directory's lock (and the view's) before it touches
anything, finishes what a crash interrupted, and on any failure releases
every descriptor, thread and lock it took before raising, so a failed start
leaves nothing behind and can simply be retried.
"""

from __future__ import annotations

import contextlib
import errno
import logging

from ..crypto import XtsPool
from ..errors import StateError
from ..fileio import OS_IO, FileIO
from ..keytable import KeyTable, SlotKind
from .config import PAGE_SIZE, ControllerConfig
from .controller import DeviceParts, MemoryController
from .lock import StateLock
from .media import Media
from .pagetable import PageTable, Range
from .persist import JournalRecord, Metadata
from .statelog import load_state
from .view import View

log = logging.getLogger(__name__)

_PERSISTED_CONFIG = ("size", "label_size", "unit", "tweak", "keyid_bits", "tme")


def open_controller(config: ControllerConfig, *, io: FileIO = OS_IO,
                    keytable: KeyTable | None = None,
                    pool: XtsPool | None = None) -> MemoryController:
    """Open (or create) the device of ``config`` and bring its view up to date.

    ``io`` is the seam every media, journal, metadata and label write goes
    through; ``keytable`` and ``pool`` default to new ones (a passed pool is
    closed with the controller).  Blocks on disk I/O and the fill of the
    view.  Raises StateError (another backend holds the state directory or
    the view, damaged or foreign state, a full disk: one line each) or
    ConfigError; nothing is left open when it raises.
    """
    with contextlib.ExitStack() as stack:
        try:
            controller = _open(config, io, keytable, pool, stack)
        except OSError as exc:
            raise StateError(_os_error_line(config, exc)) from exc
        stack.pop_all()
        return controller
    raise AssertionError("unreachable")  # pragma: no cover  (mypy: ExitStack may swallow)


def _open(config: ControllerConfig, io: FileIO, keytable: KeyTable | None,
          pool: XtsPool | None, stack: contextlib.ExitStack) -> MemoryController:
    config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock = StateLock(config.state_dir)
    stack.callback(lock.release)
    keys = keytable
    if keys is None:
        keys = KeyTable(config.keyid_bits, config.tme, config.state_dir)
        stack.callback(keys.wipe)
    stored = load_state(config.state_dir)
    if stored is not None:
        _check_same_device(config, stored, keys)
    media = Media(config.state_dir, config.size, config.label_size, io)
    stack.callback(media.close)
    replayed = media.replay(keys.keyid_count)
    view = View(config.view, config.size, config.label_size)
    stack.callback(view.close)
    pool = pool or XtsPool(config.unit)
    stack.callback(pool.close)
    if stored is None:
        pages = PageTable.fresh(config.state_dir, io, config.pages)
        base = config.base or 0
    else:
        pages = PageTable.from_metadata(config.state_dir, io, stored)
        base = int(stored.config.get("base", 0))  # type: ignore[call-overload]
    controller = MemoryController(DeviceParts(config, io, lock, keys, media, view, pages,
                                              pool, base))
    _recover(controller, stored, replayed)
    return controller


def _recover(c: MemoryController, stored: Metadata | None, replayed: JournalRecord | None) -> None:
    """Load or create the state; finish what a crash interrupted; fill the view.

    ``replayed`` is the journal batch a crash interrupted (already back on
    the media); the page states it carries are applied here, and it is
    retired once they are persisted.
    """
    everything: list[Range] = [(0, c.config.pages)]
    if stored is None:
        c.restore_label()
        c.refill(everything)
        c.media.journal.retire()
        return
    pending = list(stored.pending_fill) + c.pages.apply_record(replayed, PAGE_SIZE)
    _recover_keys(c, stored)
    if not _view_is_current(c, stored):
        c.restore_label()
        pending = everything
    # A fill a crash interrupted is marked pending in the metadata; so is
    # the whole view when it is new, so a crash mid-fill never leaves a
    # half-filled view that a later start would trust and write back.
    c.refill(pending)
    c.media.journal.retire()
    if c.config.base is not None and c.config.base != c.base:
        c.set_base(c.config.base)


def _recover_keys(c: MemoryController, stored: Metadata) -> None:
    """After a restart: which KeyIDs lost their key (SPEC 3, "what a crash may cost")."""
    lost = c.keys.restore(stored.keyid_kind.tolist(), c.pages.in_use())
    for keyid in lost:
        log.warning("KeyID %d: key lost in a backend restart; %d pages locked until it is "
                    "programmed again (they are never written back)", keyid, c.pages.count(keyid))


def _view_is_current(c: MemoryController, stored: Metadata) -> bool:
    """Is the view file the one this device last served (not new, not another's)?

    A view of the right size is only trusted when it is the very file
    recorded in the metadata (same device and inode): a stale view left
    under another path must not be written back over newer media.
    """
    return c.view.reattached and stored.config.get("view_inode") == c.view.identity


def _check_same_device(config: ControllerConfig, stored: Metadata, keys: KeyTable) -> None:
    """A state directory belongs to one device shape; refuse to reinterpret it."""
    current = {"size": config.size, "label_size": config.label_size, "unit": config.unit,
               "tweak": config.tweak.value, "keyid_bits": config.keyid_bits,
               "tme": config.tme.value}
    for name in _PERSISTED_CONFIG:
        if stored.config.get(name) != current[name]:
            raise StateError(f"{config.state_dir}: existing device has {name}="
                             f"{stored.config.get(name)}, not {current[name]} "
                             "(use another --state-dir)")
    base = stored.config.get("base", 0)
    if not isinstance(base, int) or base < 0 or base % PAGE_SIZE:
        raise StateError(f"{config.state_dir}: metadata holds an invalid base {base!r}")
    stored.check(config.pages, keys.keyid_count, len(SlotKind), config.state_dir / "metadata")


def _os_error_line(config: ControllerConfig, exc: OSError) -> str:
    """One line for a failed start: what failed, where, and the likely fix."""
    where = f" ({exc.filename})" if exc.filename else ""
    hint = ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        hint = (": the disk is full (or a file size limit was hit); free space there and "
                "start again (the state directory was left as it was)")
    return (f"cannot open the device in {config.state_dir}{where}: "
            f"{exc.strerror or exc}{hint}")


__all__ = ["open_controller"]
