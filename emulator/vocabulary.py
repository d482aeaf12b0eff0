"""The names host and guest share: units and sizes, tweak and TME modes, KeyID rules.

Both sides of the control channel speak of the same things (a ``64K``
length, the ``logical`` tweak mode, KeyID 0 being the TME KeyID), so they
parse and name them here, once.  This module imports nothing from the
project and nothing heavier than the standard library: the guest helpers
import it at every command, and must not pay for numpy or OpenSSL.

Parsers raise :class:`ParseError`, which is both a ``ValueError`` (for
library callers) and an ``argparse.ArgumentTypeError`` (so a command-line
option gets the message as it is).  Messages never repeat the rejected text:
a key typed into the wrong option must not be echoed to a terminal or log.
"""

from __future__ import annotations

import argparse
import enum
import re

TYPE_CHECKING = False  # not typing's: importing typing costs the guest's CLI ~0.1 s under TCG
if TYPE_CHECKING:
    from typing import Self

__all__ = [
    "DEFAULT_KEYID_BITS", "MAX_KEYID_BITS", "MIN_KEYID_BITS", "NAMESPACE_MODES", "PAGE_SIZE",
    "TME_KEYID", "NamespaceMode", "ParseError", "RelocateMode", "TmePolicy", "TweakMode",
    "address", "hex_bytes", "integer", "keyid_count", "keyid_problem", "size",
]

PAGE_SIZE = 4096  # the unit of MAP, RELOCATE and INSPECT, and the DUN data unit
MIN_KEYID_BITS, MAX_KEYID_BITS, DEFAULT_KEYID_BITS = 1, 15, 6
TME_KEYID = 0  # follows the TME policy; can never be programmed


class ParseError(argparse.ArgumentTypeError, ValueError):
    """A value that is not a size, integer, address or hex string."""


# -- units and numbers ----------------------------------------------------------------

_SIZE = re.compile(r"^(0x[0-9a-fA-F]+|\d+)([KMGT]?)(i?B)?$")
_SCALE = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def size(text: str) -> int:
    """'4096', '0x1000', '64K', '256M', '1G', '2MiB' -> bytes (binary suffixes)."""
    match = _SIZE.match(text.strip())
    if not match:
        raise ParseError("not a size (e.g. 4096, 0x1000, 64K, 256M, 1G)")
    return int(match.group(1), 0) * _SCALE[match.group(2)]


def address(text: str) -> int:
    """A physical address or an offset: decimal, 0x hex, or a size with a suffix."""
    return size(text)


def integer(text: str) -> int:
    """Decimal or 0x hex (also 0o, 0b), with an optional sign."""
    try:
        return int(text.strip(), 0)
    except ValueError:
        raise ParseError("not an integer (e.g. 12 or 0xc)") from None


def hex_bytes(text: str) -> bytes:
    """A hex string (key material: never echoed back in errors)."""
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise ParseError("not a hexadecimal string") from None


# -- modes ----------------------------------------------------------------------------

class _WireEnum(enum.Enum):
    """A named mode with a fixed small number on the wire (docs/protocol.md)."""

    @property
    def wire(self) -> int:
        """The number that stands for this mode in a protocol message."""
        return list(type(self)).index(self)

    @classmethod
    def from_wire(cls, number: int) -> Self:
        members = list(cls)
        if not 0 <= number < len(members):
            raise ValueError(f"unknown {cls.__name__} {number}")
        return members[number]

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The command-line spellings, in wire order."""
        return tuple(str(m.value) for m in cls)


class TweakMode(_WireEnum):
    """Where a data unit's XTS tweak comes from. Wire numbers: definition order."""

    SPA = "spa"  # 0: system physical address, base + offset
    DPA = "dpa"  # 1: offset inside the DIMM
    LOGICAL = "logical"  # 2: given by the guest per mapped page (page k: T + k, x 4096 + byte)
    # 3: data unit number, as fscrypt/blk-crypto number them: page k of a mapping with
    # page tweak T uses tweak T + k, one data unit per 4096-byte page.
    DUN = "dun"


class TmePolicy(_WireEnum):
    """What KeyID 0 (and every unprogrammed KeyID) does. Wire numbers: definition order."""

    BYPASS = "bypass"  # 0: no encryption, as BIOSes offer for persistent memory
    EPHEMERAL = "ephemeral"  # 1: a fresh platform key at every power cycle
    RETAINED = "retained"  # 2: a platform key kept in the state directory


class RelocateMode(_WireEnum):
    """How RELOCATE moves pages. Wire numbers: definition order."""

    RAW = "raw"  # 0: copy media as it is (a KeyID-unaware mover)
    KEYED = "keyed"  # 1: decrypt at src, encrypt at dst; carries KeyID and tweak


class NamespaceMode(enum.Enum):
    """The ndctl namespace modes the guest phases put the NVDIMM in."""

    FSDAX = "fsdax"
    DEVDAX = "devdax"
    RAW = "raw"


NAMESPACE_MODES = tuple(m.value for m in NamespaceMode)


# -- KeyIDs ---------------------------------------------------------------------------

def keyid_count(keyid_bits: int = DEFAULT_KEYID_BITS) -> int:
    """How many KeyIDs a device with ``keyid_bits`` has (KeyID 0 included)."""
    if not MIN_KEYID_BITS <= keyid_bits <= MAX_KEYID_BITS:
        raise ValueError(f"keyid bits must be {MIN_KEYID_BITS}..{MAX_KEYID_BITS}")
    return 1 << keyid_bits


def keyid_problem(keyid: int, keyid_bits: int = DEFAULT_KEYID_BITS, *,
                  programmable: bool = False) -> str | None:
    """Why ``keyid`` is not acceptable, or None when it is.

    Any KeyID below ``2 ** keyid_bits`` may be mapped; only 1 .. 2**bits - 1
    may be programmed (KeyID 0 is the TME KeyID).  The sentence is the one
    the CLIs print next to an INVALID_KEYID status.
    """
    last = keyid_count(keyid_bits) - 1
    if programmable and keyid == TME_KEYID:
        return f"KeyID 0 is the TME KeyID; 1..{last} are programmable"
    if not 0 <= keyid <= last:
        first = 1 if programmable else 0
        return f"KeyID {keyid} is out of range: {first}..{last} with {keyid_bits} KeyID bits"
    return None


# -- scenario phase results: the one line a guest phase prints for the host ------------------

PHASE_RESULT_PREFIX = "MKTME-RESULT "
# json is imported by the two functions below, not at the top: every guest command
# imports this module, and json costs `mktme-guest status` ~40 ms under TCG.


def phase_result_line(result: dict[str, object]) -> str:
    """The line a guest phase prints: the prefix, then its result as compact JSON."""
    import json

    return PHASE_RESULT_PREFIX + json.dumps(result, sort_keys=True, separators=(",", ":"))


def phase_results(text: str) -> list[dict[str, object]]:
    """Every phase result in a console or stdout, in order (anything before the prefix on a
    line, such as kernel messages interleaved on a serial console, is ignored)."""
    import json

    results = []
    for line in text.replace("\r", "").splitlines():
        start = line.find(PHASE_RESULT_PREFIX)
        if start >= 0:
            results.append(dict(json.loads(line[start + len(PHASE_RESULT_PREFIX):])))
    return results
