"""fscrypt's IV_INO_LBLK_64 key derivation, pinned by vectors the kernel computed.

The vectors were recorded once from a real guest (Debian 6.1 kernel, software
fscrypt, ext4 ``-O encrypt,stable_inodes`` on the emulated pmem): the master
key and UUID were given to FS_IOC_ADD_ENCRYPTION_KEY and ``mkfs.ext4 -U``; the
key identifier is what the ioctl returned; plaintext and ciphertext are the
first 32 bytes of blocks of files under a v2 AES-256-XTS + IV_INO_LBLK_64
policy, the ciphertext read from the media file at the blocks' physical
addresses (FIEMAP).  Nothing here was computed by the code under test, so a
wrong context byte, mode number, UUID byte order, salt or DUN layout fails.
"""

from __future__ import annotations

import uuid

import pytest
from mktme_emu.scenarios.fscrypt import (
    BLOCK,
    dun,
    fscrypt_media_outcome,
    gather,
    iv_ino_lblk_64_key,
    key_identifier,
    xts_blocks,
)

MASTER_KEY = bytes.fromhex(
    "404142434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f"
    "606162636465666768696a6b6c6d6e6f707172737475767778797a7b7c7d7e7f")
FS_UUID = uuid.UUID("6d6b746d-652d-656d-752d-667363727970")
KERNEL_KEY_IDENTIFIER = bytes.fromhex("db8e98d43245f645e5b16a209bb2752b")
# (inode, logical block, first 32 plaintext bytes, first 32 bytes on the media)
KERNEL_BLOCKS = [
    (13, 0, "7b0fa352bf23748f667ff54a9abcad1a718145f03ebc568cd261ee07fce9ec27",
     "bde4ad7010cc491759fab8a12cee9a5279680e21ba384efa7c6f76b5d78a07ea"),
    (14, 1, "2eff8291091934c75d916e39144cbe243b0dbeb9cb1a855aadaeb52ab5d40c0e",
     "eaa193e830322f923a6b4697c066a25a24c6a042cd69c9870f3cf5abe982ceef"),
    (14, 8, "fac92101a7344dd6943f53ad275f8b6b625a71080f647e95bd5d47ab6fe82ea3",
     "3943c68500c41c159b37790f74a7ac692e73bd27f12959dd438d7e8e4ab69b68"),
]


def test_key_identifier_is_the_kernels():
    assert key_identifier(MASTER_KEY) == KERNEL_KEY_IDENTIFIER


@pytest.mark.parametrize(("ino", "lblk", "plain", "cipher"), KERNEL_BLOCKS,
                         ids=[f"ino{i}-lblk{b}" for i, b, _, _ in KERNEL_BLOCKS])
def test_derived_key_and_dun_reproduce_the_kernels_ciphertext(ino, lblk, plain, cipher):
    key = iv_ino_lblk_64_key(MASTER_KEY, FS_UUID)
    assert xts_blocks(key, bytes.fromhex(plain), dun(ino, lblk)) == bytes.fromhex(cipher)
    assert xts_blocks(key, bytes.fromhex(cipher), dun(ino, lblk), decrypt=True) == bytes.fromhex(plain)


def test_a_different_uuid_or_inode_does_not_reproduce_it():
    ino, lblk, plain, cipher = KERNEL_BLOCKS[1]
    other = iv_ino_lblk_64_key(MASTER_KEY, uuid.UUID(int=FS_UUID.int ^ 1))
    assert xts_blocks(other, bytes.fromhex(plain), dun(ino, lblk)) != bytes.fromhex(cipher)
    key = iv_ino_lblk_64_key(MASTER_KEY, FS_UUID)
    assert xts_blocks(key, bytes.fromhex(plain), dun(ino + 1, lblk)) != bytes.fromhex(cipher)
    assert xts_blocks(key, bytes.fromhex(plain), (ino << 32 | lblk) * BLOCK) != bytes.fromhex(cipher)


def test_dun_refuses_numbers_wider_than_32_bits():
    assert dun(0xFFFF_FFFF, 0xFFFF_FFFF) == (1 << 64) - 1
    with pytest.raises(ValueError, match="32-bit"):
        dun(1 << 32, 0)


def test_media_outcome_checks_every_block_at_its_extent():
    key = iv_ino_lblk_64_key(MASTER_KEY, FS_UUID)
    plain = bytes(range(256)) * 48  # three blocks
    media = bytearray(64 * BLOCK)
    extents = [{"offset": 10 * BLOCK, "length": BLOCK, "logical": 0},
               {"offset": 30 * BLOCK, "length": 2 * BLOCK, "logical": BLOCK}]
    media[10 * BLOCK:11 * BLOCK] = xts_blocks(key, plain[:BLOCK], dun(20, 0))
    media[30 * BLOCK:32 * BLOCK] = xts_blocks(key, plain[BLOCK:], dun(20, 1))
    assert fscrypt_media_outcome(bytes(media), key, 20, extents, plain) == "exact"
    assert gather(bytes(media), extents) == xts_blocks(key, plain, dun(20, 0))
    assert fscrypt_media_outcome(bytes(media), key, 21, extents, plain) == "differs"
    media[31 * BLOCK + 5] ^= 1
    assert fscrypt_media_outcome(bytes(media), key, 20, extents, plain) == "differs"
