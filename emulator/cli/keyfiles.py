"""Keys from files (or stdin) instead of argv, and the ``xts`` key forms.

A key on the command line is readable by every user in /proc/PID/cmdline;
``--user-file``, ``--options-file`` and ``--key-file`` hold the same text as
the inline options.  No message here ever quotes what a file holds.
"""

from __future__ import annotations

import sys

from ..crypto import XtsKey
from ..errors import ConfigError, CryptoError

MAX_KEY_TEXT = 4096  # far more than any key form; a wrong file is refused, not slurped


def read_secret(path: str, option: str) -> str:
    """The text of a key file (``-`` = stdin), surrounding whitespace removed.

    Raises ConfigError naming the option and the path (never the content) if
    the file cannot be read, is not text, or is far longer than a key.
    """
    try:
        if path == "-":
            raw = sys.stdin.buffer.read(MAX_KEY_TEXT + 1)
        else:
            with open(path, "rb") as f:
                raw = f.read(MAX_KEY_TEXT + 1)
    except OSError as exc:
        raise ConfigError(f"{option}: cannot read the file: {exc.strerror or exc}") from None
    where = "stdin" if path == "-" else "the file"  # never its name: a key typed there by mistake
    if len(raw) > MAX_KEY_TEXT:
        raise ConfigError(f"{option}: {where} is longer than {MAX_KEY_TEXT} bytes: not a key file")
    try:
        return raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"{option}: {where} is not text") from None


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
