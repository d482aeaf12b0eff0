"""Model-based test: a real ``mktme-emu serve`` process against the reference model.

The same state machine as ``test_model_controller.py`` (``model_machine``),
driving a backend process over its admin socket: keys, maps, flushes and
relocations are protocol requests, the guest writes through the view
descriptor that GET_VIEW_FD hands out (mapped shared, as QEMU maps it), and
restarts are real: SIGTERM and start again, or SIGKILL and start again, after
which only what was written back before may be on the media, and pages of
KeyIDs whose keys died with the process are locked.

Slower than the in-process machine (every example starts a process, every
restart another), so the default budget is smaller; ``MKTME_MODEL_EXAMPLES``
raises it (see ``model_machine.budget``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from backend_helpers import Backend
from mktme_emu import protocol as p
from mktme_emu.errors import ErrorCode, RemoteError
from model_machine import (
    BASE,
    DEVICE_SIZE,
    KEYID_BITS,
    DeviceRefused,
    ModelMachine,
    PageReport,
    Shape,
    budget,
    run_machine,
    scratch_root,
)
from reference_model import Command, Refusal, Tme
from reference_model import TweakMode as Tweak

# -- adapters: every call whose form other branches change goes through here -------------------

# A MAP onto a KeyID whose key was lost in a restart is refused with NO_KEY
# (issue 8): the model expects that refusal.
REFUSES_MAP_TO_LOCKED_KEYID = True


def _program(client: p.Client, program: p.KeyProgram) -> int:
    return int(client.program_key(program))


def _flush(client: p.Client, offset: int | None, length: int | None) -> None:
    """Flush all (length 0 on the wire) or a range; the reply's form is not needed here."""
    if offset is None:
        client.flush()
    else:
        client.flush(offset, length or 0)


def _view_fd(client: p.Client) -> int:
    """The view descriptor GET_VIEW_FD passes (the caller closes it)."""
    fd, _size = client.view_fd()
    return fd


def _inspect(client: p.Client, offset: int, count: int) -> list[PageReport]:
    return [PageReport(r.keyid, r.logical_tweak, r.locked, r.consistent)
            for r in client.inspect(offset, count)]


# -------------------------------------------------------------------------------------------------

_WHY = {ErrorCode.INVALID: Refusal.INVALID, ErrorCode.RANGE: Refusal.RANGE,
        ErrorCode.NO_KEY: Refusal.NO_KEY}


def key_program(keyid: int, command: Command, secret: bytes) -> p.KeyProgram:
    half = len(secret) // 2
    alg = "aes-xts-256" if half == 32 else "aes-xts-128"
    key_hex, tweak_hex = (secret[:half].hex(), secret[half:].hex()) if secret else (None, None)
    return p.key_program(keyid, p.KeyCommand(int(command)), alg, key_hex, tweak_hex)


class ServeDevice:
    """One ``serve`` process on a state directory, talked to over the admin socket."""

    def __init__(self, root: Path, shape: Shape) -> None:
        self.backend = Backend(root, size=DEVICE_SIZE, base=BASE, tweak=shape.tweak.value,
                               tme=shape.tme.value, unit=shape.unit, keyid_bits=KEYID_BITS,
                               verbose=False)
        self.backend.start()
        self.client = self.backend.client()
        self.view_identity = self._view_identity()

    def _call(self, fn, *args: object) -> None:  # type: ignore[no-untyped-def]
        try:
            fn(*args)
        except RemoteError as err:
            raise DeviceRefused(_WHY.get(ErrorCode(err.code), Refusal.INVALID), str(err)) from None

    def _view_identity(self) -> tuple[int, int]:
        fd = _view_fd(self.client)
        try:
            info = os.fstat(fd)
        finally:
            os.close(fd)
        return info.st_dev, info.st_ino

    def _started_again(self, base: int | None = None) -> None:
        if base is None:
            self.backend.start()
        else:
            self.backend.start(base=base)
        self.client = self.backend.client()
        # The guest keeps its mapping across a backend restart: the backend must
        # re-attach to the very same view file, not hand out a new one.
        assert self._view_identity() == self.view_identity, "the restarted backend serves another view"

    def program(self, keyid: int, command: Command, secret: bytes) -> int:
        return _program(self.client, key_program(keyid, command, secret))

    def map(self, offset: int, length: int, keyid: int, logical_tweak: int | None) -> None:
        self._call(self.client.map, offset, length, keyid, logical_tweak)

    def flush(self, offset: int | None, length: int | None) -> None:
        self._call(_flush, self.client, offset, length)

    def relocate(self, src: int, dst: int, length: int, keyed: bool) -> None:
        self._call(self.client.relocate, src, dst, length, "keyed" if keyed else "raw")

    def power_cycle(self) -> None:
        self.client.power_cycle()

    def restart(self, base: int | None = None) -> None:
        self.backend.stop()  # SIGTERM: exit status 0 asserted
        self._started_again(base)

    def crash_and_restart(self) -> None:
        self.backend.kill()
        self._started_again()

    def view_fd(self) -> int:
        return _view_fd(self.client)

    def inspect(self, offset: int, count: int) -> list[PageReport]:
        return _inspect(self.client, offset, count)

    def media(self) -> bytes:
        return self.backend.media()

    def platform_key(self) -> bytes | None:
        path = self.backend.state_dir / "tme-platform-key"
        return path.read_bytes() if path.exists() else None

    def close(self) -> None:
        self.backend.close()  # asserts a clean exit and no traceback in the log


class ServeMachine(ModelMachine):
    refuse_map_to_locked = REFUSES_MAP_TO_LOCKED_KEYID

    def open_device(self, root: Path) -> ServeDevice:
        return ServeDevice(root, self.shape)


SHAPES = {
    "spa-64-bypass": Shape(64, Tweak.SPA),
    "logical-4096-retained": Shape(4096, Tweak.LOGICAL, Tme.RETAINED),
}


@pytest.mark.parametrize("name", SHAPES)
def test_serve_follows_the_reference_model(name: str, tmp_path: Path) -> None:
    machine = type(f"ServeMachine_{name.replace('-', '_')}", (ServeMachine,), {"shape": SHAPES[name]})
    with scratch_root(tmp_path) as root:
        run_machine(machine, root, budget(default_examples=6, default_steps=20))
