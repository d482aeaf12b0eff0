"""Model-based test: the controller in-process against the reference model of SPEC 3.

Hypothesis drives :class:`~mktme_emu.controller.MemoryController` on tiny
devices through random sequences of key programming, maps, guest writes to
the view (through the test's own shared mapping of the view file, as QEMU
writes), flushes, raw and keyed relocations, power cycles, clean restarts
(close + reopen) and abandoned controllers (a crash: no write-back), and
checks the view and the decrypted media against ``reference_model`` after
every step (see ``model_machine``).

The default run is small and derandomized (repeatable in CI);
``MKTME_MODEL_EXAMPLES=500`` (and ``MKTME_MODEL_STEPS``, ``MKTME_MODEL_SEED``)
explores at random with a bigger budget.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
from mktme_emu.controller import ControllerConfig, MemoryController, RelocateMode, TweakMode, open_controller
from mktme_emu.errors import ControllerError, ErrorCode
from mktme_emu.keytable import TmePolicy
from mktme_emu.protocol import KeyCommand, key_program
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


def _open(config: ControllerConfig) -> MemoryController:
    """Open (create or recover) the controller of a state directory."""
    return open_controller(config)


def _flush(ctl: MemoryController, offset: int | None, length: int | None) -> None:
    """Flush all or a range; the result's form (int today) is not needed here."""
    if offset is None:
        ctl.flush()
    else:
        ctl.flush(offset, length)


def _program(ctl: MemoryController, raw: bytes) -> int:
    return int(ctl.program_key(raw))


def _inspect(ctl: MemoryController, offset: int, count: int) -> list[PageReport]:
    return [PageReport(info.keyid, info.logical_tweak, info.locked, info.consistent)
            for info in ctl.inspect(offset, count)]


def _abandon(ctl: MemoryController) -> None:
    """A crash: release the files without writing anything back (as SIGKILL would)."""
    ctl.abandon()


# -------------------------------------------------------------------------------------------------

_WHY = {ErrorCode.INVALID: Refusal.INVALID, ErrorCode.RANGE: Refusal.RANGE,
        ErrorCode.NO_KEY: Refusal.NO_KEY}


def key_struct(keyid: int, command: Command, secret: bytes) -> bytes:
    """The 192-byte MKTME_KEY_PROGRAM_STRUCT for a model command."""
    half = len(secret) // 2
    alg = "aes-xts-256" if half == 32 else "aes-xts-128"
    key_hex, tweak_hex = (secret[:half].hex(), secret[half:].hex()) if secret else (None, None)
    return key_program(keyid, KeyCommand(int(command)), alg, key_hex, tweak_hex).pack()


class InProcessDevice:
    """The controller object itself; restart = close() and open again."""

    def __init__(self, root: Path, shape: Shape) -> None:
        self.config = ControllerConfig(
            state_dir=root / "state", size=DEVICE_SIZE, base=BASE, unit=shape.unit,
            tweak=TweakMode(shape.tweak.value), keyid_bits=KEYID_BITS,
            tme=TmePolicy(shape.tme.value), view_path=root / "view")
        self.ctl: MemoryController | None = _open(self.config)

    @property
    def _ctl(self) -> MemoryController:
        assert self.ctl is not None
        return self.ctl

    def _call(self, fn, *args: object) -> None:  # type: ignore[no-untyped-def]
        try:
            fn(*args)
        except ControllerError as err:
            raise DeviceRefused(_WHY.get(err.code, Refusal.INVALID), str(err)) from None

    def program(self, keyid: int, command: Command, secret: bytes) -> int:
        return _program(self._ctl, key_struct(keyid, command, secret))

    def map(self, offset: int, length: int, keyid: int, logical_tweak: int | None) -> None:
        self._call(self._ctl.map_range, offset, length, keyid, logical_tweak)

    def flush(self, offset: int | None, length: int | None) -> None:
        self._call(_flush, self._ctl, offset, length)

    def relocate(self, src: int, dst: int, length: int, keyed: bool) -> None:
        mode = RelocateMode.KEYED if keyed else RelocateMode.RAW
        self._call(self._ctl.relocate, src, dst, length, mode)

    def power_cycle(self) -> None:
        self._ctl.power_cycle()

    def restart(self, base: int | None = None) -> None:
        self._ctl.close()
        self.ctl = None
        if base is not None:
            self.config = dataclasses.replace(self.config, base=base)
        self.ctl = _open(self.config)

    def crash_and_restart(self) -> None:
        _abandon(self._ctl)
        self.ctl = None
        self.ctl = _open(self.config)

    def view_fd(self) -> int:
        return os.open(self.config.view, os.O_RDWR)

    def inspect(self, offset: int, count: int) -> list[PageReport]:
        return _inspect(self._ctl, offset, count)

    def media(self) -> bytes:
        return (self.config.state_dir / "media").read_bytes()

    def platform_key(self) -> bytes | None:
        path = self.config.state_dir / "tme-platform-key"
        return path.read_bytes() if path.exists() else None

    def close(self) -> None:
        if self.ctl is not None:
            self.ctl.close()
            self.ctl = None


class ControllerMachine(ModelMachine):
    refuse_map_to_locked = REFUSES_MAP_TO_LOCKED_KEYID

    def open_device(self, root: Path) -> InProcessDevice:
        return InProcessDevice(root, self.shape)


SHAPES = {
    "spa-64-bypass": Shape(64, Tweak.SPA),  # the default device
    "logical-4096-bypass": Shape(4096, Tweak.LOGICAL),
    "logical-64-retained": Shape(64, Tweak.LOGICAL, Tme.RETAINED),
    "dpa-512-ephemeral": Shape(512, Tweak.DPA, Tme.EPHEMERAL),
}


@pytest.mark.parametrize("name", SHAPES)
def test_controller_follows_the_reference_model(name: str, tmp_path: Path) -> None:
    machine = type(f"ControllerMachine_{name.replace('-', '_')}", (ControllerMachine,),
                   {"shape": SHAPES[name]})
    with scratch_root(tmp_path) as root:
        run_machine(machine, root, budget(default_examples=25, default_steps=40))

