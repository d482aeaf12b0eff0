"""Scenario 1, one key per namespace: the guest side, in three phases.

``namespace-setup`` (boot 1): program a user key, map everything the fsdax
namespace exposes with it (Dan Williams' "one key per namespace"), then
mkfs, mount, write files, record their SHA-256, unmount and flush.
``namespace-check-without-key`` (boot 2, after a power cycle): every page is
back at KeyID 0, so the filesystem must not mount (or its files must not
match).  ``namespace-check-with-key`` (same or a later boot): the same key
programmed and mapped again, the filesystem mounts and every file matches.

File i holds ``pattern(seed + i, file_size)``, so the checks need no state
from the setup boot: the same options regenerate what must be there.  The
block device's page cache is dropped after every KeyID change, or a mount
would read a superblock cached through the previous KeyID.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from mktme_emu.protocol import Client

from . import dax, system
from .argtypes import size
from .errors import CommandFailed
from .phaselib import Phase, Result, add_key_arguments, classify, extents_json, pattern, program_user, sha256
from .physaddr import Extent

DEFAULT_MOUNT = Path("/mnt/mktme-ns")


def _arguments(parser: argparse.ArgumentParser) -> None:
    add_key_arguments(parser, keyid=1)
    parser.add_argument("--files", type=int, default=4, help="how many files (default 4)")
    parser.add_argument("--file-size", type=size, default=256 << 10,
                        help="bytes per file (default 256K)")
    parser.add_argument("--seed", type=int, default=10, help="seed of file 0 (file i: seed + i)")
    parser.add_argument("--fs", choices=system.FILESYSTEMS, default="ext4")
    parser.add_argument("--mountpoint", type=Path, default=DEFAULT_MOUNT)
    parser.add_argument("--no-dax", dest="dax", action="store_false", help="mount without -o dax")


def file_name(i: int) -> str:
    return f"file{i}.bin"


def _key_namespace(client: Client, args: argparse.Namespace, device: str) -> list[Extent]:
    """Program the key, map the whole namespace with it, forget cached blocks."""
    program_user(client, args.keyid, args.user, args.alg)
    extents = dax.map_namespace(device, args.keyid, client=client)
    system.drop_caches(device)
    return extents


def _unmount_if_mounted(mountpoint: Path) -> None:
    if system.is_mounted(mountpoint):
        system.umount(mountpoint)


def run_setup(args: argparse.Namespace, client: Client) -> Result:
    """Boot 1: key the namespace, mkfs, mount, write the files, unmount, flush everything."""
    device = system.ensure_namespace("fsdax")
    _unmount_if_mounted(args.mountpoint)
    extents = _key_namespace(client, args, device)
    system.mkfs(args.fs, device)
    system.mount(device, args.mountpoint, args.fs, args.dax)
    sums = {}
    try:
        for i in range(args.files):
            data = pattern(args.seed + i, args.file_size)
            path = args.mountpoint / file_name(i)
            path.write_bytes(data)
            fd = os.open(path, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
            sums[file_name(i)] = sha256(path.read_bytes())
    finally:
        system.umount(args.mountpoint)
    system.drop_caches(device)
    written = client.flush().written
    expected = {file_name(i): sha256(pattern(args.seed + i, args.file_size)) for i in range(args.files)}
    return {"phase": "namespace-setup", "device": device, "fs": args.fs, "keyid": args.keyid,
            "extents": extents_json(extents, dax.DataArea.of(client).base), "seed": args.seed,
            "file_size": args.file_size, "sha256": sums, "pages_flushed": written,
            "ok": sums == expected}


def check_files(args: argparse.Namespace) -> tuple[dict[str, str], dict[str, str]]:
    """(file name -> intact/garbage/partial/missing/unreadable, file name -> SHA-256 read)."""
    outcomes, sums = {}, {}
    for i in range(args.files):
        name = file_name(i)
        try:
            data = (args.mountpoint / name).read_bytes()
        except FileNotFoundError:
            outcomes[name] = "missing"
            continue
        except OSError:
            outcomes[name] = "unreadable"
            continue
        sums[name] = sha256(data)
        expected = pattern(args.seed + i, args.file_size)
        outcomes[name] = classify(data, expected) if len(data) == len(expected) else "garbage"
    return outcomes, sums


def _mount_and_check(args: argparse.Namespace, device: str) -> Result:
    """Try to mount; when it works, check the files and unmount again."""
    _unmount_if_mounted(args.mountpoint)
    try:
        system.mount(device, args.mountpoint, args.fs, args.dax)
    except CommandFailed as exc:
        system.drop_caches(device)
        return {"mount": "failed", "mount_error": str(exc), "files": {}, "sha256": {}}
    try:
        files, sums = check_files(args)
    finally:
        system.umount(args.mountpoint)
        system.drop_caches(device)
    return {"mount": "ok", "files": files, "sha256": sums}


def run_check_without_key(args: argparse.Namespace, client: Client) -> Result:
    """After a power cycle, no key: mounting must fail (or no file may match)."""
    device = system.ensure_namespace("fsdax", reconfigure=False)
    first = dax.namespace_extents(device)[0]
    keyid_seen = client.inspect(dax.DataArea.of(client).offset(Extent(first.pa, 4096)))[0].keyid
    system.drop_caches(device)
    seen = _mount_and_check(args, device)
    intact = [name for name, outcome in seen["files"].items() if outcome == "intact"]
    return {"phase": "namespace-check-without-key", "device": device, "keyid_seen": keyid_seen,
            **seen, "ok": seen["mount"] == "failed" or not intact}


def run_check_with_key(args: argparse.Namespace, client: Client) -> Result:
    """The same key programmed and mapped again: mount, every file intact."""
    device = system.ensure_namespace("fsdax", reconfigure=False)
    _unmount_if_mounted(args.mountpoint)
    _key_namespace(client, args, device)
    seen = _mount_and_check(args, device)
    files = seen["files"]
    return {"phase": "namespace-check-with-key", "device": device, "keyid": args.keyid, **seen,
            "ok": seen["mount"] == "ok" and len(files) == args.files
            and all(v == "intact" for v in files.values())}


PHASES = [
    Phase("namespace-setup", "namespace under one user key: mkfs, mount, files, checksums, flush",
          _arguments, run_setup),
    Phase("namespace-check-without-key", "after a power cycle: the filesystem must not mount",
          _arguments, run_check_without_key),
    Phase("namespace-check-with-key", "the key programmed again: mount, every checksum matches",
          _arguments, run_check_with_key),
]
