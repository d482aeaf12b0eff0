"""The KeyID table: what each KeyID encrypts with, and the TME policy of KeyID 0.

Hardware-shaped on purpose: :meth:`KeyTable.program` takes the 192-byte
MKTME_KEY_PROGRAM_STRUCT (see :mod:`mktme_emu.pconfig`) exactly as software
hands it to PCONFIG and answers with its status code.  The controller asks
:meth:`KeyTable.cipher` which key a KeyID encrypts with (``None`` = the data
passes unencrypted).

Key material exists only inside :class:`~mktme_emu.crypto.XtsKey` objects
and the short-lived bytes that build them; the one key ever written to disk
is the ``retained`` TME platform key (mode 0600), as the hardware's "save
key for standby" does.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .crypto import XtsKey
from .errors import ConfigError, CryptoError, KeyProgramError, MktmeError
from .fileio import atomic_write
from .pconfig import (
    KEY_FIELD_SIZE,
    STRUCT_SIZE,
    Algorithm,
    KeyCommand,
    KeyProgram,
    KeyStatus,
    build_program,
    parse_key_options,
)

__all__ = [
    "KEY_FIELD_SIZE", "STRUCT_SIZE", "Algorithm", "KeyCommand", "KeyLostError", "KeyProgram",
    "KeyStatus", "KeyTable", "PreparedKey", "SlotKind", "TmePolicy", "build_program",
    "parse_key_options",
]

MIN_KEYID_BITS, MAX_KEYID_BITS, DEFAULT_KEYID_BITS = 1, 15, 6
PLATFORM_KEY_FILE = "tme-platform-key"

RandomSource = Callable[[int], bytes]


class TmePolicy(enum.Enum):
    """What KeyID 0 (and every unprogrammed KeyID) does."""

    BYPASS = "bypass"  # no encryption, as BIOSes offer for persistent memory
    EPHEMERAL = "ephemeral"  # a fresh platform key at every power cycle
    RETAINED = "retained"  # a platform key kept in the state directory


class SlotKind(enum.IntEnum):
    """What a KeyID currently does; persisted per KeyID (never the key itself)."""

    TME = 0  # unprogrammed, cleared, or KeyID 0
    USER = 1  # SET_KEY_DIRECT
    RANDOM = 2  # SET_KEY_RANDOM
    NO_ENCRYPT = 3


class KeyLostError(MktmeError):
    """A KeyID's key died in a backend restart: nothing may be encrypted or decrypted with it."""


@dataclass
class _Slot:
    """One keyslot.  ``lost``: the slot had a key (``kind`` says which) that died with
    an earlier backend process; it stays LOST until programmed again or a power cycle."""

    kind: SlotKind = SlotKind.TME
    key: XtsKey | None = None
    lost: bool = False


@dataclass(frozen=True)
class PreparedKey:
    """A validated programming request, ready to be committed.

    Exists so the controller can write pages back under the old key between
    validation and the switch (SPEC 3: "written back under the old key, then
    filled under the new one").
    """

    keyid: int
    kind: SlotKind
    key: XtsKey | None = field(repr=False)


class KeyTable:
    """KeyIDs 0 .. 2^keyid_bits - 1 with their keys; KeyID 0 follows the TME policy.

    Not thread-safe: the controller serialises access.  ``random`` is the
    entropy source (a parameter so tests can make it fail or repeat).
    """

    def __init__(self, keyid_bits: int = DEFAULT_KEYID_BITS, tme: TmePolicy = TmePolicy.BYPASS,
                 state_dir: Path | None = None, random: RandomSource = os.urandom) -> None:
        if not MIN_KEYID_BITS <= keyid_bits <= MAX_KEYID_BITS:
            raise ConfigError(f"keyid bits must be {MIN_KEYID_BITS}..{MAX_KEYID_BITS}, got {keyid_bits}")
        if tme is TmePolicy.RETAINED and state_dir is None:
            raise ConfigError("the retained TME policy needs a state directory for its key")
        self.keyid_bits = keyid_bits
        self.tme = tme
        self._state_dir = state_dir
        self._random = random
        self._slots = [_Slot() for _ in range(1 << keyid_bits)]
        self._platform_key = self._make_platform_key()

    @property
    def keyid_count(self) -> int:
        return len(self._slots)

    def _make_platform_key(self) -> XtsKey | None:
        if self.tme is TmePolicy.BYPASS:
            return None
        if self.tme is TmePolicy.EPHEMERAL:
            return _random_xts_key(self._random, 32)
        assert self._state_dir is not None
        return _load_or_create_retained_key(self._state_dir / PLATFORM_KEY_FILE, self._random)

    # -- the PCONFIG leaf -------------------------------------------------

    def prepare(self, raw: bytes) -> PreparedKey | KeyStatus:
        """Validate a struct; return what to commit, or the failure status.

        Changes nothing.  SET_KEY_RANDOM draws its randomness here, so an
        entropy failure is ENTROPY_ERROR before anything changed.
        """
        if len(raw) != STRUCT_SIZE:
            return KeyStatus.INVALID_PROG_CMD
        prog = KeyProgram.unpack(raw)
        if not 0 < prog.keyid < self.keyid_count:
            return KeyStatus.INVALID_KEYID
        if prog.reserved_ctrl or prog.command not in KeyCommand._value2member_map_:
            return KeyStatus.INVALID_PROG_CMD
        if prog.algorithm not in Algorithm._value2member_map_:
            return KeyStatus.INVALID_ENC_ALG
        return self._prepare_command(prog, KeyCommand(prog.command), Algorithm(prog.algorithm))

    def _prepare_command(self, prog: KeyProgram, command: KeyCommand,
                         alg: Algorithm) -> PreparedKey | KeyStatus:
        if command is KeyCommand.CLEAR_KEY:
            return PreparedKey(prog.keyid, SlotKind.TME, None)
        if command is KeyCommand.NO_ENCRYPT:
            return PreparedKey(prog.keyid, SlotKind.NO_ENCRYPT, None)
        n = alg.key_bytes
        data_key, tweak_key = prog.key_field_1[:n], prog.key_field_2[:n]
        kind = SlotKind.USER
        if command is KeyCommand.SET_KEY_RANDOM:
            try:
                fresh = self._random(2 * n)
            except OSError:
                return KeyStatus.ENTROPY_ERROR
            if len(fresh) != 2 * n:
                return KeyStatus.ENTROPY_ERROR
            data_key = _xor(data_key, fresh[:n])
            tweak_key = _xor(tweak_key, fresh[n:])
            kind = SlotKind.RANDOM
        try:
            key = XtsKey(data_key + tweak_key)
        except CryptoError:  # equal data and tweak keys: XTS forbids them
            return KeyStatus.ENTROPY_ERROR if kind is SlotKind.RANDOM else KeyStatus.INVALID_PROG_CMD
        return PreparedKey(prog.keyid, kind, key)

    def commit(self, prepared: PreparedKey) -> None:
        """Switch the KeyID to the prepared key; the old key is wiped, a LOST state ends."""
        slot = self._slots[prepared.keyid]
        if slot.key is not None:
            slot.key.wipe()
        self._slots[prepared.keyid] = _Slot(prepared.kind, prepared.key)

    def program(self, raw: bytes) -> KeyStatus:
        """PCONFIG MKTME_KEY_PROGRAM: validate and commit in one step."""
        prepared = self.prepare(raw)
        if isinstance(prepared, KeyStatus):
            return prepared
        self.commit(prepared)
        return KeyStatus.PROG_SUCCESS

    # -- what the memory controller asks ----------------------------------

    def kind(self, keyid: int) -> SlotKind:
        """What the KeyID does now (TME for KeyID 0 and unprogrammed ones)."""
        return self._slots[self._check(keyid)].kind

    def cipher(self, keyid: int) -> XtsKey | None:
        """The key data under this KeyID is encrypted with; None = stored as is.

        Raises KeyLostError for a LOST KeyID: its data must never pass as plaintext.
        """
        slot = self._slots[self._check(keyid)]
        if slot.lost:
            raise KeyLostError(f"KeyID {keyid}: its key was lost in a backend restart")
        if slot.kind is SlotKind.TME:
            return self._platform_key
        return slot.key  # None for NO_ENCRYPT

    def is_lost(self, keyid: int) -> bool:
        """Did this KeyID's key die in a backend restart (and not come back since)?"""
        return self._slots[self._check(keyid)].lost

    def lost_keyids(self) -> list[int]:
        """The LOST KeyIDs, in order."""
        return [keyid for keyid, slot in enumerate(self._slots) if slot.lost]

    def slot_kinds(self) -> list[SlotKind]:
        """Every KeyID's kind, for persisting (a LOST slot keeps the kind of the key it lost)."""
        return [slot.kind for slot in self._slots]

    def restore(self, kinds: Sequence[int], in_use: Collection[int]) -> list[int]:
        """After a backend restart: rebuild the slots from the persisted kinds.

        ``in_use`` are the KeyIDs some page is mapped with.  NO_ENCRYPT comes
        back (it has no key to lose); a KeyID no page uses is reset to TME; a
        used KeyID that had a user or random key, or any used KeyID whose
        data is under the ephemeral platform key, becomes LOST (its kind kept,
        so a second restart still knows).  Returns the LOST KeyIDs.
        """
        for keyid, raw in enumerate(kinds):
            kind = SlotKind(raw)
            if kind is SlotKind.NO_ENCRYPT:
                self._slots[keyid] = _Slot(SlotKind.NO_ENCRYPT)
            elif keyid not in in_use:
                self._slots[keyid] = _Slot()
            elif kind is not SlotKind.TME or self.tme is TmePolicy.EPHEMERAL:
                self._slots[keyid] = _Slot(kind, None, lost=True)
        return self.lost_keyids()

    def power_cycle(self) -> None:
        """Forget every programmed key, every LOST state and, under ``ephemeral``, the platform key."""
        for keyid, slot in enumerate(self._slots):
            if slot.key is not None:
                slot.key.wipe()
            self._slots[keyid] = _Slot()
        if self.tme is TmePolicy.EPHEMERAL:
            if self._platform_key is not None:
                self._platform_key.wipe()
            self._platform_key = self._make_platform_key()

    def wipe(self) -> None:
        """Zero every key this table holds, the platform key included (the device is closing)."""
        for slot in self._slots:
            if slot.key is not None:
                slot.key.wipe()
        if self._platform_key is not None:
            self._platform_key.wipe()

    def _check(self, keyid: int) -> int:
        if not 0 <= keyid < self.keyid_count:
            raise KeyProgramError(f"KeyID {keyid} out of range 0..{self.keyid_count - 1}")
        return keyid


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _random_xts_key(random: RandomSource, size: int) -> XtsKey:
    raw = bytearray(size)
    try:
        while raw[: size // 2] == raw[size // 2:]:
            raw[:] = random(size)
        return XtsKey(raw)
    finally:
        raw[:] = bytes(size)  # the XtsKey holds its own copy


def _load_or_create_retained_key(path: Path, random: RandomSource) -> XtsKey:
    """The "save key for standby" platform key: created once, atomically, mode 0600.

    A file of any other size (say, empty after a crash mid-creation under an
    older layout) or with equal halves is refused: silently making a new key
    would turn every retained page into garbage.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        fresh = _create_retained_key(path, random)
        try:
            return XtsKey(fresh)
        finally:
            fresh[:] = bytes(len(fresh))  # the XtsKey holds its own copy
    if len(raw) != 32 or raw[:16] == raw[16:]:
        raise ConfigError(f"{path}: damaged TME platform key file ({len(raw)} bytes); "
                          "move it away to start with a new key (retained data is then lost)")
    return XtsKey(raw)


def _create_retained_key(path: Path, random: RandomSource) -> bytearray:
    key_bytes = bytearray(32)
    while key_bytes[:16] == key_bytes[16:]:
        key_bytes[:] = random(32)
    atomic_write(path, key_bytes)
    return key_bytes
