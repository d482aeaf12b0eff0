"""Option types shared by the commands and the phases: sizes with K/M/G, 0x addresses."""

from __future__ import annotations

import argparse
import re

_SIZE = re.compile(r"^(0x[0-9a-fA-F]+|\d+)([KMGT]?)(i?B)?$")
_SCALE = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def size(text: str) -> int:
    """'4096', '0x1000', '64K', '2M' -> bytes (also for addresses and offsets)."""
    match = _SIZE.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size or address: {text!r} (e.g. 4096, 0x1000, 64K)")
    return int(match.group(1), 0) * _SCALE[match.group(2)]


def integer(text: str) -> int:
    """Decimal or 0x hex."""
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
