"""The ``xts`` key forms.

Key files themselves (``--user-file``, ``--options-file``, ``--key-file``:
a key on the command line is readable by every user in /proc/PID/cmdline)
are read by :func:`mktme_emu.usage.read_secret`, shared with the guest.
"""

from __future__ import annotations

from ..crypto import XtsKey
from ..errors import CryptoError


def xts_key(text: str) -> XtsKey:
    """An XTS key from ``DATAKEY:TWEAKKEY`` (as ``key --user``) or both halves concatenated.

    Raises CryptoError saying what is wrong in words (never the key):
    not hexadecimal, a wrong length, halves of different lengths, equal halves.
    """
    data_hex, sep, tweak_hex = text.strip().partition(":")
    halves = [data_hex, tweak_hex] if sep else [data_hex]
    try:
        raw = [bytes.fromhex(h) for h in halves]
    except ValueError:
        raise CryptoError("the XTS key is not hexadecimal (DATAKEY:TWEAKKEY)") from None
    if sep:
        if len(raw[0]) != len(raw[1]):
            raise CryptoError(f"the data key has {len(raw[0])} bytes and the tweak key "
                              f"{len(raw[1])}: both must be 16 (AES-XTS-128) or 32 (AES-XTS-256)")
        if len(raw[0]) not in (16, 32):
            raise CryptoError(f"each XTS key half must be 16 bytes (AES-XTS-128) or 32 "
                              f"(AES-XTS-256), got {len(raw[0])}")
    key = b"".join(raw)
    if len(key) in (32, 64) and key[:len(key) // 2] == key[len(key) // 2:]:
        raise CryptoError("the data key equals the tweak key: XTS (IEEE 1619) requires "
                          "two different keys")
    return XtsKey(key)
