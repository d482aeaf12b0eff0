"""fscrypt's IV_INO_LBLK_64 key derivation and ciphertext, recomputed on the host.

Written from the kernel's fs/crypto (hkdf.c, keysetup.c, crypto.c) and
include/uapi/linux/fscrypt.h, and checked against a vector the kernel
computed (tests/test_fscrypt_keys.py):

- HKDF-SHA512 (RFC 5869) with the master key as input keying material and no
  salt (the kernel's ``default_salt`` is HashLen zero bytes, RFC 5869's
  default), and info ``"fscrypt\\0" || context byte || context info``.
- The key identifier: context 1 (HKDF_CONTEXT_KEY_IDENTIFIER), empty info,
  16 bytes.
- The IV_INO_LBLK_64 per-mode key: context 4 (HKDF_CONTEXT_IV_INO_LBLK_64_KEY),
  info = mode number (AES-256-XTS is 1) || the filesystem's 16-byte UUID,
  as long as the mode's key (64 bytes: AES-256 data key || tweak key).
- Contents: AES-256-XTS per filesystem block, the IV being the data unit
  number ``(inode number << 32) | logical block`` as a 128-bit little-endian
  integer (fscrypt_generate_iv).

The XTS here is ``cryptography``'s ``modes.XTS``, one call per block, so the
host's verdict shares nothing with the emulator's engine (mktme_emu.crypto).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

HKDF_PREFIX = b"fscrypt\0"
HKDF_CONTEXT_KEY_IDENTIFIER = 1
HKDF_CONTEXT_IV_INO_LBLK_64_KEY = 4
FSCRYPT_MODE_AES_256_XTS = 1
AES_256_XTS_KEY_SIZE = 64
KEY_IDENTIFIER_SIZE = 16
BLOCK = 4096  # the filesystem block, fscrypt's data unit here

Extent = Mapping[str, int]  # {"offset": data-area offset, "length": ..., "logical": file offset}


def _hkdf(master_key: bytes, context: int, info: bytes, length: int) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA512(), length=length, salt=None,
                info=HKDF_PREFIX + bytes([context]) + info)
    return hkdf.derive(master_key)


def key_identifier(master_key: bytes) -> bytes:
    """What FS_IOC_ADD_ENCRYPTION_KEY returns for a v2 master key."""
    return _hkdf(master_key, HKDF_CONTEXT_KEY_IDENTIFIER, b"", KEY_IDENTIFIER_SIZE)


def iv_ino_lblk_64_key(master_key: bytes, fs_uuid: uuid.UUID,
                       mode: int = FSCRYPT_MODE_AES_256_XTS) -> bytes:
    """The per-(mode, filesystem) key every file of an IV_INO_LBLK_64 policy shares."""
    return _hkdf(master_key, HKDF_CONTEXT_IV_INO_LBLK_64_KEY, bytes([mode]) + fs_uuid.bytes,
                 AES_256_XTS_KEY_SIZE)


def dun(ino: int, lblk: int) -> int:
    """The data unit number of block ``lblk`` of inode ``ino`` (both must fit 32 bits)."""
    if not (0 <= ino < 1 << 32 and 0 <= lblk < 1 << 32):
        raise ValueError(f"IV_INO_LBLK_64 needs 32-bit inode and block numbers, got {ino}, {lblk}")
    return (ino << 32) | lblk


def xts_blocks(key: bytes, data: bytes, first_dun: int, decrypt: bool = False) -> bytes:
    """AES-XTS of consecutive 4096-byte blocks, block k with tweak ``first_dun + k``.

    Lengths that are a multiple of 16 but not of 4096 are allowed for the
    last block (XTS without ciphertext stealing is blockwise in the unit),
    so a test vector may pin just the start of a block.
    """
    out = bytearray()
    for k, start in enumerate(range(0, len(data), BLOCK)):
        iv = (first_dun + k).to_bytes(16, "little")
        cipher = Cipher(algorithms.AES(key), modes.XTS(iv))
        ctx = cipher.decryptor() if decrypt else cipher.encryptor()
        out += ctx.update(data[start:start + BLOCK]) + ctx.finalize()
    return bytes(out)


def gather(media: bytes, extents: Iterable[Extent]) -> bytes:
    """The media bytes of a file's extents, in file order."""
    return b"".join(media[e["offset"]:e["offset"] + e["length"]] for e in extents)


def fscrypt_media_outcome(media: bytes, key: bytes, ino: int, extents: Iterable[Extent],
                          plaintext: bytes) -> str:
    """``exact`` when every block of the file on the media is XTS(key, DUN(ino, lblk)) of its plaintext."""
    covered = 0
    for e in extents:
        lblk, chunk = e["logical"] // BLOCK, plaintext[e["logical"]:e["logical"] + e["length"]]
        if media[e["offset"]:e["offset"] + e["length"]] != xts_blocks(key, chunk, dun(ino, lblk)):
            return "differs"
        covered += e["length"]
    return "exact" if covered == len(plaintext) else "differs"
