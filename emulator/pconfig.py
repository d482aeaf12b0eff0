"""The PCONFIG leaf MKTME_KEY_PROGRAM as software sees it: struct, commands, status codes.

Pure Python on purpose: the guest helpers import this (through the protocol)
and must not pay for numpy or OpenSSL to build a 192-byte struct.

Layout of MKTME_KEY_PROGRAM_STRUCT (little-endian, 192 bytes):

    0   u16  KEYID
    2   u32  KEYID_CTRL  bits 7:0 command, 23:8 algorithm, 31:24 reserved (0)
    6   58   reserved
    64  64   KEY_FIELD_1 (data key, or entropy for SET_KEY_RANDOM)
    128 64   KEY_FIELD_2 (tweak key, or entropy)
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from .errors import KeyProgramError

STRUCT_SIZE = 192
KEY_FIELD_SIZE = 64
_HEADER = struct.Struct("<HI")


KEYID_FIELD_MAX = 0xFFFF  # KEYID is a u16 in the struct


class KeyStatus(enum.IntEnum):
    """PCONFIG MKTME_KEY_PROGRAM return codes, each with why it is returned."""

    PROG_SUCCESS = 0
    INVALID_PROG_CMD = 1
    ENTROPY_ERROR = 2
    INVALID_KEYID = 3
    INVALID_ENC_ALG = 4
    DEVICE_BUSY = 5

    def explain(self, program: KeyProgram | None = None, keyid_count: int | None = None) -> str:
        """Why PCONFIG answered this, in words, as ``NAME: reason`` (one line, no key material).

        ``program`` is the struct that was sent and ``keyid_count`` the
        device's 2^keyid_bits, both optional: with them the reason names the
        KeyID and the programmable range.
        """
        programmable = f"1..{keyid_count - 1} are programmable" if keyid_count else ""
        if self is KeyStatus.INVALID_KEYID and program is not None:
            if program.keyid == 0:
                reason = "KeyID 0 is the TME KeyID"
            else:
                reason = f"KeyID {program.keyid} is out of range"
            reason = f"{reason}; {programmable}" if programmable else reason
        elif (self is KeyStatus.INVALID_PROG_CMD and program is not None
              and program.command == KeyCommand.SET_KEY_DIRECT
              and program.key_field_1 == program.key_field_2):
            reason = "the data key equals the tweak key, which XTS forbids"
        else:
            reason = _STATUS_REASONS[self]
        return f"{self.name}: {reason}"


_STATUS_REASONS = {
    KeyStatus.PROG_SUCCESS: "the KeyID is programmed",
    KeyStatus.INVALID_PROG_CMD: "unknown command, reserved KEYID_CTRL bits set, or the data key "
                                "equals the tweak key",
    KeyStatus.ENTROPY_ERROR: "the platform could not draw fresh randomness for the key; try again",
    KeyStatus.INVALID_KEYID: "the KeyID is 0 (the TME KeyID) or beyond the device's KeyID bits",
    KeyStatus.INVALID_ENC_ALG: "the algorithm field must have exactly one supported bit: "
                               "AES-XTS-128 (bit 0) or AES-XTS-256 (bit 2)",
    KeyStatus.DEVICE_BUSY: "another key program is in progress; try again",
}


class KeyCommand(enum.IntEnum):
    """KEYID_CTRL bits 7:0."""

    SET_KEY_DIRECT = 0
    SET_KEY_RANDOM = 1
    CLEAR_KEY = 2
    NO_ENCRYPT = 3


class Algorithm(enum.IntEnum):
    """KEYID_CTRL bits 23:8: exactly one bit set. Value = bit in the 16-bit field."""

    AES_XTS_128 = 1 << 0
    AES_XTS_256 = 1 << 2

    @property
    def key_bytes(self) -> int:
        """Bytes of each key field used: 16 for XTS-128, 32 for XTS-256."""
        return 16 if self is Algorithm.AES_XTS_128 else 32

    @classmethod
    def from_name(cls, name: str) -> Algorithm:
        """Parse ``aes-xts-128`` / ``aes-xts-256``."""
        try:
            return {"aes-xts-128": cls.AES_XTS_128, "aes-xts-256": cls.AES_XTS_256}[name]
        except KeyError:
            raise KeyProgramError(f"unknown algorithm {name!r} (aes-xts-128 or aes-xts-256)") from None


@dataclass(frozen=True)
class KeyProgram:
    """A decoded MKTME_KEY_PROGRAM_STRUCT. Its repr never shows the key fields."""

    keyid: int
    command: int
    algorithm: int
    key_field_1: bytes = field(default=bytes(KEY_FIELD_SIZE), repr=False)
    key_field_2: bytes = field(default=bytes(KEY_FIELD_SIZE), repr=False)
    reserved_ctrl: int = 0
    reserved_bytes: bytes = field(default=bytes(58), repr=False)

    def pack(self) -> bytes:
        """The 192-byte struct software hands to PCONFIG."""
        ctrl = (self.command & 0xFF) | ((self.algorithm & 0xFFFF) << 8) | (self.reserved_ctrl << 24)
        return (_HEADER.pack(self.keyid, ctrl) + self.reserved_bytes
                + self.key_field_1.ljust(KEY_FIELD_SIZE, b"\0")
                + self.key_field_2.ljust(KEY_FIELD_SIZE, b"\0"))

    @classmethod
    def unpack(cls, raw: bytes) -> KeyProgram:
        """Decode a struct of exactly 192 bytes (validation is the table's job)."""
        if len(raw) != STRUCT_SIZE:
            raise KeyProgramError(f"MKTME_KEY_PROGRAM_STRUCT is {STRUCT_SIZE} bytes, got {len(raw)}")
        keyid, ctrl = _HEADER.unpack_from(raw)
        return cls(keyid=keyid, command=ctrl & 0xFF, algorithm=(ctrl >> 8) & 0xFFFF,
                   reserved_ctrl=ctrl >> 24, reserved_bytes=bytes(raw[6:64]),
                   key_field_1=bytes(raw[64:128]), key_field_2=bytes(raw[128:192]))


_OPTION_COMMANDS = {
    "user": KeyCommand.SET_KEY_DIRECT,
    "cpu": KeyCommand.SET_KEY_RANDOM,
    "clear": KeyCommand.CLEAR_KEY,
    "no-encrypt": KeyCommand.NO_ENCRYPT,
}


def parse_key_options(keyid: int, options: str) -> KeyProgram:
    """Parse the Linux MKTME key-service option string into a struct.

    ``type=user|cpu|clear|no-encrypt algorithm=aes-xts-128|aes-xts-256
    key=HEX tweak=HEX`` (key and tweak are required for ``user``, optional
    entropy for ``cpu``, refused for the others).  Raises KeyProgramError
    naming the bad field; the message never repeats key material.
    """
    fields: dict[str, str] = {}
    for token in options.split():
        name, sep, value = token.partition("=")
        if not sep or not value:
            where = repr(name) if sep else f"#{len(fields) + 1}"  # no '=': the token may be a key
            raise KeyProgramError(f"key option {where} is not of the form name=value")
        if name not in ("type", "algorithm", "key", "tweak"):
            raise KeyProgramError(f"unknown key option {name!r} (type, algorithm, key, tweak)")
        if name in fields:
            raise KeyProgramError(f"key option {name!r} given twice")
        fields[name] = value
    if "type" not in fields:
        raise KeyProgramError("key options need type=user|cpu|clear|no-encrypt")
    command = _OPTION_COMMANDS.get(fields["type"])
    if command is None:
        raise KeyProgramError(f"unknown key type {fields['type']!r} (user, cpu, clear, no-encrypt)")
    alg = Algorithm.from_name(fields.get("algorithm", "aes-xts-128"))
    return build_program(keyid, command, alg, fields.get("key"), fields.get("tweak"))


def build_program(keyid: int, command: KeyCommand, alg: Algorithm,
                  key_hex: str | None = None, tweak_hex: str | None = None) -> KeyProgram:
    """A struct for one command; refuses what cannot be encoded or sent.

    Checks that the KeyID fits its u16 field and the key fields' presence and
    sizes; whether the device has that KeyID is PCONFIG's answer, not ours.
    """
    if not 0 <= keyid <= KEYID_FIELD_MAX:
        raise KeyProgramError(f"KeyID {keyid} is out of range: the KEYID field holds 0..65535, "
                              "and a device programs 1..2^keyid_bits-1")
    needs_keys = command is KeyCommand.SET_KEY_DIRECT
    takes_keys = command in (KeyCommand.SET_KEY_DIRECT, KeyCommand.SET_KEY_RANDOM)
    if needs_keys and (key_hex is None or tweak_hex is None):
        raise KeyProgramError("a user key needs both key= and tweak=")
    if not takes_keys and (key_hex is not None or tweak_hex is not None):
        raise KeyProgramError(f"{command.name} takes no key or tweak")
    field_1 = _key_field("key", key_hex, alg)
    field_2 = _key_field("tweak", tweak_hex, alg)
    return KeyProgram(keyid=keyid, command=int(command), algorithm=int(alg),
                      key_field_1=field_1, key_field_2=field_2)


def _key_field(name: str, value: str | None, alg: Algorithm) -> bytes:
    if value is None:
        return bytes(KEY_FIELD_SIZE)
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise KeyProgramError(f"{name}= is not hexadecimal") from None
    if len(raw) != alg.key_bytes:
        raise KeyProgramError(f"{name}= must be {alg.key_bytes} bytes for {alg.name}, got {len(raw)}")
    return raw.ljust(KEY_FIELD_SIZE, b"\0")
