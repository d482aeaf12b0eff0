"""Argument types shared by the commands: sizes with K/M/G, 0x addresses, hex keys."""

from __future__ import annotations

import argparse
import re

_SIZE = re.compile(r"^(0x[0-9a-fA-F]+|\d+)([KMGT]?)(i?B)?$")
_SCALE = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def size(text: str) -> int:
    """'256M', '128K', '4096', '0x1000' -> bytes."""
    match = _SIZE.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4096, 0x1000, 128K, 256M, 1G)")
    number, suffix = match.group(1), match.group(2)
    return int(number, 0) * _SCALE[suffix]


def address(text: str) -> int:
    """A physical address or offset: decimal, 0x hex, or a size with a suffix."""
    return size(text)


def integer(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def hex_bytes(text: str) -> bytes:
    """A hex string (key material: never echoed back in errors)."""
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not a hexadecimal string") from None
