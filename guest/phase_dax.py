"""Scenario 2, key at mmap time on DAX: the guest side (phases ``dax-file`` and ``devdax``).

Each phase maps a DAX range with a user KeyID (the emulated
encrypt_mprotect), writes a known pattern through the mapping, flushes, and
reports where the data lives (PA and data-area offset per extent), the KeyID,
the pattern seed and the tweak mode: all the host needs to compute the
expected XTS ciphertext and compare it with the media.  Both phases also
resolve the physical addresses two independent ways (pagemap of the mmap,
and FIEMAP or the devdax sysfs ranges) and report whether they agree.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from mktme_emu.protocol import Client

from . import dax, physaddr, system
from .argtypes import integer, size
from .errors import DeviceError
from .phaselib import (
    Phase,
    Result,
    add_key_arguments,
    classify,
    extents_json,
    pattern,
    pattern_spec,
    program_user,
)
from .physaddr import PAGE_SIZE

DEFAULT_MOUNT = Path("/mnt/mktme")
DAX_FILE_NAME = "mktme-dax.bin"


def _common_arguments(parser: argparse.ArgumentParser, keyid: int, seed: int) -> None:
    add_key_arguments(parser, keyid)
    parser.add_argument("--pages", type=int, default=16, help="4 KiB pages to write (default 16)")
    parser.add_argument("--seed", type=int, default=seed, help=f"pattern seed (default {seed})")
    parser.add_argument("--logical-tweak", type=integer,
                        help="page tweak of the first page (devices in logical tweak mode)")
    parser.add_argument("--no-map-sync", dest="map_sync", action="store_false",
                        help="plain MAP_SHARED instead of MAP_SHARED_VALIDATE|MAP_SYNC")


def _device_facts(client: Client) -> Result:
    cfg = client.config()
    return {"base": cfg.base, "tweak_mode": cfg.tweak.value, "unit": cfg.unit, "tme": cfg.tme.value}


def _write_under_key(m: dax.DaxMap, offset: int, length: int, args: argparse.Namespace,
                     client: Client) -> tuple[list[physaddr.Extent], str]:
    """encrypt_mprotect, write the pattern, flush, read back: (extents, read-back outcome)."""
    address = m.at(offset)
    extents = dax.encrypt_mprotect(address, length, args.keyid, logical_tweak=args.logical_tweak,
                                   client=client)
    data = pattern(args.seed, length)
    m.write(offset, data)
    dax.msync(m.mm)
    dax.flush_range(address, length, client=client)
    return extents, classify(m.read(offset, length), data)


def _result(name: str, args: argparse.Namespace, facts: Result, extents: list[physaddr.Extent],
            readback: str, agree: bool, map_sync: bool) -> Result:
    return {"phase": name, **facts, "keyid": args.keyid, "alg": args.alg, "seed": args.seed,
            "pattern": pattern_spec(args.seed), "length": args.pages * PAGE_SIZE,
            "logical_tweak": args.logical_tweak, "map_sync": map_sync,
            "extents": extents_json(extents, facts["base"]), "addresses_agree": agree,
            "readback": readback, "ok": readback == "intact" and agree}


# -- dax-file -------------------------------------------------------------------------------

def _dax_file_arguments(parser: argparse.ArgumentParser) -> None:
    _common_arguments(parser, keyid=2, seed=2)
    parser.add_argument("--fs", choices=system.FILESYSTEMS, default="ext4")
    parser.add_argument("--mountpoint", type=Path, default=DEFAULT_MOUNT)


def _allocate(path: Path, length: int) -> None:
    """Write the file out with zeros and fsync: every block allocated and written."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, bytes(length))
        os.fsync(fd)
    finally:
        os.close(fd)


def run_dax_file(args: argparse.Namespace, client: Client) -> Result:
    """A fresh ext4/xfs on the fsdax namespace, mounted -o dax; a file mmapped and mapped."""
    device = system.ensure_namespace("fsdax")
    program_user(client, args.keyid, args.user, args.alg)
    if system.is_mounted(args.mountpoint):
        system.umount(args.mountpoint)
    system.mkfs(args.fs, device)
    system.mount(device, args.mountpoint, args.fs)
    try:
        if not system.mount_is_dax(args.mountpoint):
            raise DeviceError(f"{args.fs} on {device} did not mount with DAX")
        path = args.mountpoint / DAX_FILE_NAME
        length = args.pages * PAGE_SIZE
        _allocate(path, length)
        with dax.mmap_dax(path, length, sync=args.map_sync) as m:
            by_fiemap = dax.page_extents(physaddr.file_extents(path), round_tail=True)
            extents, readback = _write_under_key(m, 0, length, args, client)
            map_sync = m.map_sync
    finally:
        system.umount(args.mountpoint)
    result = _result("dax-file", args, _device_facts(client), extents, readback,
                     extents == by_fiemap, map_sync)
    return {**result, "fs": args.fs, "device": device, "file": DAX_FILE_NAME}


# -- devdax -----------------------------------------------------------------------------------

def _devdax_arguments(parser: argparse.ArgumentParser) -> None:
    _common_arguments(parser, keyid=3, seed=3)
    parser.add_argument("--offset", type=size, default=4 << 20,
                        help="byte offset in the devdax device (default 4M)")


def run_devdax(args: argparse.Namespace, client: Client) -> Result:
    """The devdax namespace mmapped; a range of it mapped, written, flushed."""
    device = system.ensure_namespace("devdax")
    program_user(client, args.keyid, args.user, args.alg)
    length = args.pages * PAGE_SIZE
    by_sysfs = physaddr.dax_extents(device, args.offset, length)
    with dax.mmap_device(device, args.offset, length, sync=args.map_sync) as m:
        extents, readback = _write_under_key(m, args.offset, length, args, client)
        map_sync = m.map_sync
    result = _result("devdax", args, _device_facts(client), extents, readback,
                     extents == by_sysfs, map_sync)
    return {**result, "device": device, "device_offset": args.offset}


PHASES = [
    Phase("dax-file", "ext4/xfs -o dax: a file mmapped (MAP_SYNC), mapped with a KeyID, written",
          _dax_file_arguments, run_dax_file),
    Phase("devdax", "a devdax range mmapped, mapped with a KeyID, written, flushed",
          _devdax_arguments, run_devdax),
]
