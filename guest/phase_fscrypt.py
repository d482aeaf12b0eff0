"""Scenario 5, fscrypt offload: the guest side (phase ``fscrypt-offload``).

The question it answers comes from the linux-mm thread this project
started from: can the MKTME engine be fscrypt's inline-encryption engine on
pmem?  In one boot, on one ext4 on the fsdax namespace:

1. **fscrypt in software.**  ``mkfs.ext4 -O encrypt,stable_inodes -U UUID``,
   mounted ``-o dax``; a directory gets a v2 policy (AES-256-XTS contents,
   AES-256-CTS names, IV_INO_LBLK_64) through the fscrypt ioctls, with the
   master key added by FS_IOC_ADD_ENCRYPTION_KEY.  Encrypted inodes never
   use DAX (the kernel keeps DAX and fscrypt apart), so the files go through
   the page cache and the kernel's software fscrypt, onto the pmem disk
   under KeyID 0.  Reported: inode numbers, physical extents (FIEMAP), the
   UUID read back from the superblock, the key identifier the kernel derived.
2. **The offload.**  For each file, an *unencrypted* file of the same size
   on the same filesystem is DAX: mmapped, its pages given the KeyID that
   holds the per-mode key the host derived, with page tweaks equal to the
   fscrypt file's data unit numbers ``(ino << 32) | lblk`` (on a device in
   ``dun`` tweak mode; on any other device, its own tweaks), the plaintext
   written through the mapping and flushed.  The host then compares media.
3. **A raw move.**  Each offload copy is moved by the backend's raw mover to
   a third file's pages mapped with the same KeyID and DUNs, and read back.

The host derives the key and checks every byte on the media; the guest only
reports where things are and what it read back.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import struct
import uuid
from pathlib import Path

from mktme_emu.protocol import Client

from . import dax, physaddr, system
from .argtypes import integer
from .errors import PhaseError
from .phaselib import Phase, Result, classify, extents_json, key_file, pattern, pattern_spec, program_user
from .physaddr import PAGE_SIZE

DEFAULT_MOUNT = Path("/mnt/fscrypt")
VAULT = "vault"  # the encrypted directory

# include/uapi/linux/fscrypt.h
FS_IOC_SET_ENCRYPTION_POLICY = 0x800C6613  # _IOR('f', 19, struct fscrypt_policy_v1)
FS_IOC_ADD_ENCRYPTION_KEY = 0xC0506617  # _IOWR('f', 23, struct fscrypt_add_key_arg)
FSCRYPT_POLICY_V2 = 2
FSCRYPT_MODE_AES_256_XTS = 1
FSCRYPT_MODE_AES_256_CTS = 4
FSCRYPT_POLICY_FLAG_IV_INO_LBLK_64 = 0x08
FSCRYPT_KEY_SPEC_TYPE_IDENTIFIER = 2
# struct fscrypt_policy_v2: version, contents mode, filenames mode, flags, 4 reserved, identifier[16]
POLICY_V2 = struct.Struct("<BBBB4x16s")
# struct fscrypt_add_key_arg: key_spec {type, reserved, u[32]}, raw_size, key_id, reserved[8], raw[]
ADD_KEY_ARG = struct.Struct("<II32sII32x")
IDENTIFIER_AT, IDENTIFIER_SIZE = 8, 16
# struct ext4_super_block sits 1024 bytes into the device; s_uuid at 0x68.
EXT4_SUPERBLOCK, EXT4_S_UUID = 1024, 0x68


def dun(ino: int, lblk: int) -> int:
    """fscrypt's IV_INO_LBLK_64 data unit number of block ``lblk`` of inode ``ino``."""
    return (ino << 32) | lblk


# -- the fscrypt ioctls -----------------------------------------------------------------------

def add_key(mountpoint: Path, master_key: bytes) -> bytes:
    """FS_IOC_ADD_ENCRYPTION_KEY on the filesystem; returns the kernel's key identifier."""
    arg = bytearray(ADD_KEY_ARG.pack(FSCRYPT_KEY_SPEC_TYPE_IDENTIFIER, 0, b"", len(master_key), 0)
                    + master_key)
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, FS_IOC_ADD_ENCRYPTION_KEY, arg, True)
    except OSError as exc:
        raise PhaseError(f"FS_IOC_ADD_ENCRYPTION_KEY failed: {exc.strerror}") from None
    finally:
        os.close(fd)
        arg[ADD_KEY_ARG.size:] = bytes(len(master_key))  # our copy of the key, zeroed
    return bytes(arg[IDENTIFIER_AT:IDENTIFIER_AT + IDENTIFIER_SIZE])


def set_policy(directory: Path, identifier: bytes) -> bytes:
    """FS_IOC_SET_ENCRYPTION_POLICY: v2, AES-256-XTS/AES-256-CTS, IV_INO_LBLK_64."""
    policy = POLICY_V2.pack(FSCRYPT_POLICY_V2, FSCRYPT_MODE_AES_256_XTS, FSCRYPT_MODE_AES_256_CTS,
                            FSCRYPT_POLICY_FLAG_IV_INO_LBLK_64, identifier)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, FS_IOC_SET_ENCRYPTION_POLICY, policy)
    except OSError as exc:
        raise PhaseError(f"FS_IOC_SET_ENCRYPTION_POLICY failed: {exc.strerror}") from None
    finally:
        os.close(fd)
    return policy


def superblock_uuid(device: str) -> str:
    """The ext4 UUID as the kernel sees it (``sb->s_uuid``), read from the superblock."""
    with open(device, "rb") as f:
        f.seek(EXT4_SUPERBLOCK + EXT4_S_UUID)
        return str(uuid.UUID(bytes=f.read(16)))


# -- steps ------------------------------------------------------------------------------------

def _write_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _fscrypt_files(args: argparse.Namespace, base: int) -> tuple[bytes, list[Result]]:
    """Key, policy, files written and synced; (key identifier, per-file facts)."""
    identifier = add_key(args.mountpoint, bytes.fromhex(args.master_key))
    vault = args.mountpoint / VAULT
    vault.mkdir()
    set_policy(vault, identifier)
    files = []
    for i, pages in enumerate(args.pages):
        path, data = vault / f"file{i}", pattern(args.seed + i, pages * PAGE_SIZE)
        _write_file(path, data)
        files.append((path, data))
    os.sync()
    facts = []
    for i, (path, data) in enumerate(files):
        extents = dax.page_extents(physaddr.file_extents(path), hint=dax.FILE_HINT)
        facts.append({"name": path.name, "ino": os.stat(path).st_ino, "seed": args.seed + i,
                      "length": len(data), "extents": extents_json(extents, base),
                      "readback": classify(path.read_bytes(), data)})
    return identifier, facts


def _dax_copy(client: Client, path: Path, length: int, keyid: int, first: int | None,
              data: bytes | None) -> tuple[dax.DaxMap, list[physaddr.Extent]]:
    """A DAX file of ``length`` bytes, its pages mapped with (keyid, DUNs from ``first``),
    ``data`` written through the mapping and flushed; the open mapping and its extents."""
    _write_file(path, bytes(length))
    m = dax.mmap_dax(path, length)
    try:
        extents = dax.encrypt_mprotect(m.at(0), length, keyid, logical_tweak=first, client=client)
        if data is not None:
            m.write(0, data)
            dax.flush_range(m.mm, length, client=client)
    except BaseException:
        m.close()
        raise
    return m, extents


def _relocate(client: Client, area: dax.DataArea, src: list[physaddr.Extent],
              dst: list[physaddr.Extent]) -> None:
    """The backend's raw mover, page by page from src's pages to dst's (file order)."""
    def pages(extents: list[physaddr.Extent]) -> list[int]:
        return [area.offset(e) + k for e in extents for k in range(0, e.length, PAGE_SIZE)]
    for s, d in zip(pages(src), pages(dst), strict=True):
        client.relocate(s, d, PAGE_SIZE, "raw")


def _offload(client: Client, args: argparse.Namespace, files: list[Result], use_dun: bool) -> None:
    """Per file: the plaintext through DAX under (key, DUNs), then a raw move; adds to ``files``."""
    program_user(client, args.keyid, args.user, "aes-xts-256")
    area = dax.DataArea.of(client)
    for f in files:
        data, first = pattern(f["seed"], f["length"]), dun(f["ino"], 0) if use_dun else None
        src, src_ext = _dax_copy(client, args.mountpoint / f"offload-{f['name']}", f["length"],
                                 args.keyid, first, data)
        with src:
            f["offload_readback"] = classify(src.read(0, f["length"]), data)
            dst, dst_ext = _dax_copy(client, args.mountpoint / f"moved-{f['name']}", f["length"],
                                     args.keyid, first, None)
            with dst:
                _relocate(client, area, src_ext, dst_ext)
                f["moved_readback"] = classify(dst.read(0, f["length"]), data)
        f["offload_extents"] = extents_json(src_ext, area.base)
        f["moved_extents"] = extents_json(dst_ext, area.base)
        f["first_dun"] = first


def master_key(text: str) -> str:
    """A v2 master key for AES-256-XTS: 64 bytes in hex (the mode's key size at least)."""
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise argparse.ArgumentTypeError("the master key must be hex") from None
    if len(raw) != 64:
        raise argparse.ArgumentTypeError(f"the master key must be 64 bytes, got {len(raw)}")
    return text


def page_counts(text: str) -> list[int]:
    """'4,9,2' -> [4, 9, 2]: pages per file, each at least one."""
    try:
        counts = [int(p) for p in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of page counts: {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("every file needs at least one page")
    return counts


def _arguments(parser: argparse.ArgumentParser) -> None:
    master = parser.add_mutually_exclusive_group(required=True)
    master.add_argument("--master-key", metavar="HEX", type=master_key,
                        help="fscrypt master key, 64 bytes in hex (a test key: the host checks with it)")
    master.add_argument("--master-key-file", dest="master_key", metavar="FILE",
                        type=lambda path: master_key(key_file(path)),
                        help="the same, read from FILE (what the host passes: keys stay off argv)")
    parser.add_argument("--uuid", required=True, type=uuid.UUID, help="filesystem UUID for mkfs.ext4 -U")
    user = parser.add_mutually_exclusive_group(required=True)
    user.add_argument("--user", metavar="KEYHEX:TWEAKHEX",
                      help="the per-mode key the host derived (AES-256-XTS data key : tweak key)")
    user.add_argument("--user-file", dest="user", metavar="FILE", type=key_file,
                      help="the same, read from FILE")
    parser.add_argument("--keyid", type=integer, default=9, help="KeyID for the offload (default 9)")
    parser.add_argument("--pages", type=page_counts, default=[4, 9, 2],
                        help="pages per file, comma-separated (default 4,9,2)")
    parser.add_argument("--seed", type=int, default=50, help="pattern seed of file 0 (default 50)")
    parser.add_argument("--mountpoint", type=Path, default=DEFAULT_MOUNT)


def run_fscrypt_offload(args: argparse.Namespace, client: Client) -> Result:
    """ext4 + fscrypt IV_INO_LBLK_64 in software, then the same blocks through a dun KeyID."""
    cfg = client.config()
    device = system.ensure_namespace("fsdax")
    if system.is_mounted(args.mountpoint):
        system.umount(args.mountpoint)
    system.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-O", "encrypt,stable_inodes",
                "-U", str(args.uuid), device])
    system.mount(device, args.mountpoint, "ext4")
    try:
        identifier, files = _fscrypt_files(args, cfg.base)
        fs_uuid = superblock_uuid(device)
        _offload(client, args, files, use_dun=cfg.tweak.value == "dun")
    finally:
        system.umount(args.mountpoint)
    client.flush()
    ok = all(f["readback"] == f["offload_readback"] == "intact" for f in files)
    return {"phase": "fscrypt-offload", "tweak_mode": cfg.tweak.value, "unit": cfg.unit,
            "base": cfg.base, "uuid": fs_uuid, "key_identifier": identifier.hex(),
            "keyid": args.keyid, "pattern": pattern_spec(args.seed) + " (seed + file index)",
            "files": files, "ok": ok}


PHASES = [
    Phase("fscrypt-offload", "ext4 + fscrypt (v2, IV_INO_LBLK_64) in software, then the same "
          "blocks written through DAX under a KeyID with DUN tweaks, and moved raw",
          _arguments, run_fscrypt_offload),
]
