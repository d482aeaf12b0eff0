"""Scenarios 3 and 4, relocation and lost keys: the guest side.

Both work on small regions of the devdax namespace (a DAX mapping has no
page cache, so what the guest reads is exactly what the controller filled),
and report a table of cases, each with its ``outcome`` (``intact`` or
``garbage``, see :func:`mktme_guest.phaselib.classify`) and the outcome the
SPEC section 3 model predicts (``expected``).

``relocation`` (one boot): data under a user KeyID moved by
  - ``raw``: the backend's KeyID-unaware mover (dst mapped with the same KeyID),
  - ``copy-keyid0``: the guest reads the ciphertext through KeyID 0 and
    writes it at dst through KeyID 0, then maps dst with the KeyID,
  - ``keyed``: the backend's KeyID-aware mover (carries KeyID and tweak).
  In ``logical`` tweak mode every mapping of the data carries the same
  logical tweak (the file's page index does not change when a block moves),
  so the raw movers keep the data too.

``lost-keys-before`` / ``lost-keys-after`` (two boots with a power cycle in
between, same options): data under a user KeyID and under a random KeyID,
read through wrong KeyIDs; after the power cycle the random-key data stays
garbage whatever is programmed, the user-key data comes back once the same
user key is programmed again.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mktme_emu.protocol import Client, KeyCommand

from . import dax, physaddr, system
from .argtypes import integer, size
from .errors import PhaseError
from .phaselib import (
    OTHER_KEY,
    Phase,
    Result,
    add_key_arguments,
    classify,
    outcome_rows,
    pattern,
    pattern_spec,
    program,
    program_user,
)
from .physaddr import PAGE_SIZE

DEFAULT_LOGICAL_TWEAK = 7 << 32  # "inode 7, page 0" in IV_INO_LBLK_64 style


@dataclass
class Region:
    """Pages of the devdax device: where they are on the media and in our mapping."""

    m: dax.DaxMap
    dev_offset: int  # byte offset in /dev/daxX.Y
    offset: int  # data-area offset (what MAP/FLUSH/RELOCATE take)
    length: int

    def map(self, client: Client, keyid: int, tweak: int | None = None) -> None:
        client.map(self.offset, self.length, keyid, tweak)

    def read(self) -> bytes:
        return self.m.read(self.dev_offset, self.length)

    def write(self, data: bytes) -> None:
        self.m.write(self.dev_offset, data)

    def flush(self, client: Client) -> None:
        dax.msync(self.m.mm)
        client.flush(self.offset, self.length)


def regions(client: Client, m: dax.DaxMap, first: int, length: int, count: int) -> list[Region]:
    """``count`` consecutive regions of ``length`` bytes from device offset ``first``."""
    area = dax.DataArea.of(client)
    found = []
    for i in range(count):
        dev_offset = first + i * length
        extents = physaddr.dax_extents(m.path, dev_offset, length)
        if len(extents) != 1:
            raise PhaseError(f"device range {dev_offset:#x}+{length:#x} is not physically contiguous")
        found.append(Region(m, dev_offset, area.offset(extents[0]), length))
    return found


def _region_arguments(parser: argparse.ArgumentParser, offset: int, seed: int) -> None:
    parser.add_argument("--offset", type=size, default=offset,
                        help=f"first byte offset in the devdax device (default {offset:#x})")
    parser.add_argument("--pages", type=int, default=4, help="pages per region (default 4)")
    parser.add_argument("--seed", type=int, default=seed, help=f"pattern seed (default {seed})")


def _row(case: str, data: bytes, expected_data: bytes, expected: str | None, **extra: Any) -> Result:
    return {"case": case, "outcome": classify(data, expected_data), "expected": expected, **extra}


def _open_regions(client: Client, args: argparse.Namespace, count: int,
                  reconfigure: bool = True) -> tuple[dax.DaxMap, list[Region]]:
    device = system.ensure_namespace("devdax", reconfigure=reconfigure)
    length = args.pages * PAGE_SIZE
    m = dax.mmap_device(device, args.offset, count * length)
    try:
        return m, regions(client, m, args.offset, length, count)
    except BaseException:
        m.close()
        raise


# -- relocation -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Ctx:
    """What every relocation case needs."""

    client: Client
    keyid: int
    tweak: int | None  # logical tweak of the data (logical mode), else None
    data: bytes

    def prepare(self, src: Region) -> None:
        """Put the data at src under the KeyID and make it durable."""
        src.map(self.client, self.keyid, self.tweak)
        src.write(self.data)
        src.flush(self.client)


def case_raw(ctx: Ctx, src: Region, dst: Region) -> bytes:
    """The backend copies the media as it is; dst already mapped with the data's KeyID."""
    ctx.prepare(src)
    dst.map(ctx.client, ctx.keyid, ctx.tweak)
    ctx.client.relocate(src.offset, dst.offset, src.length, "raw")
    return dst.read()


def case_copy_keyid0(ctx: Ctx, src: Region, dst: Region) -> bytes:
    """A KeyID-unaware guest copy: read src through KeyID 0, write dst through KeyID 0."""
    ctx.prepare(src)
    src.map(ctx.client, 0)
    ciphertext = src.read()
    dst.map(ctx.client, 0)
    dst.write(ciphertext)
    dst.flush(ctx.client)
    dst.map(ctx.client, ctx.keyid, ctx.tweak)
    return dst.read()


def case_keyed(ctx: Ctx, src: Region, dst: Region) -> bytes:
    """The backend decrypts at src, encrypts at dst, carrying KeyID and tweak."""
    ctx.prepare(src)
    dst.map(ctx.client, 0)
    ctx.client.relocate(src.offset, dst.offset, src.length, "keyed")
    return dst.read()


Case = Callable[[Ctx, Region, Region], bytes]
RELOCATION_CASES: list[tuple[str, Case]] = [
    ("raw", case_raw), ("copy-keyid0", case_copy_keyid0), ("keyed", case_keyed)]


def expected_relocation(case: str, tweak_mode: str, tme: str) -> str:
    """The SPEC section 3 model: only a move that keeps (key, tweak) keeps the data."""
    if case == "keyed":
        return "intact"
    if tweak_mode != "logical":
        return "garbage"
    # A copy through KeyID 0 is a raw copy only when KeyID 0 does not encrypt.
    return "intact" if case == "raw" or tme == "bypass" else "garbage"


def _relocation_arguments(parser: argparse.ArgumentParser) -> None:
    add_key_arguments(parser, keyid=4)
    _region_arguments(parser, offset=16 << 20, seed=4)
    parser.add_argument("--logical-tweak", type=integer, default=DEFAULT_LOGICAL_TWEAK,
                        help="page tweak of the data in logical tweak mode (default 7<<32)")


def run_relocation(args: argparse.Namespace, client: Client) -> Result:
    """Every relocation case on its own pair of regions; the outcome table."""
    cfg = client.config()
    logical = cfg.tweak.value == "logical"
    program_user(client, args.keyid, args.user, args.alg)
    m, regs = _open_regions(client, args, 2 * len(RELOCATION_CASES))
    data = pattern(args.seed, args.pages * PAGE_SIZE)
    ctx = Ctx(client, args.keyid, args.logical_tweak if logical else None, data)
    rows = []
    with m:
        for i, (name, case) in enumerate(RELOCATION_CASES):
            src, dst = regs[2 * i], regs[2 * i + 1]
            got = case(ctx, src, dst)
            dst_keyid = client.inspect(dst.offset)[0].keyid
            rows.append(_row(name, got, data, expected_relocation(name, cfg.tweak.value, cfg.tme.value),
                             src=src.offset, dst=dst.offset, dst_keyid=dst_keyid))
    return {"phase": "relocation", "tweak_mode": cfg.tweak.value, "tme": cfg.tme.value,
            "keyid": args.keyid, "seed": args.seed, "pattern": pattern_spec(args.seed),
            "logical_tweak": ctx.tweak, "cases": rows, "ok": outcome_rows(rows)}


# -- lost keys ----------------------------------------------------------------------------------

def _lost_keys_arguments(parser: argparse.ArgumentParser) -> None:
    add_key_arguments(parser, keyid=5)
    parser.add_argument("--random-keyid", type=integer, default=6)
    parser.add_argument("--wrong-keyid", type=integer, default=7,
                        help="KeyID programmed with another user key (default 7)")
    parser.add_argument("--unprogrammed-keyid", type=integer, default=8,
                        help="KeyID cleared to TME behaviour (default 8)")
    _region_arguments(parser, offset=32 << 20, seed=5)


def _wrong_reads(client: Client, args: argparse.Namespace, user: Region, data: bytes) -> list[Result]:
    """Read the user-key data through other KeyIDs, then through its own again."""
    program_user(client, args.wrong_keyid, OTHER_KEY, args.alg)
    program(client, args.unprogrammed_keyid, KeyCommand.CLEAR_KEY, args.alg)
    rows = []
    for case, keyid in (("wrong-keyid-other-key", args.wrong_keyid),
                        ("wrong-keyid-unprogrammed", args.unprogrammed_keyid)):
        user.map(client, keyid)
        rows.append(_row(case, user.read(), data, "garbage", keyid=keyid))
        user.map(client, args.keyid)
    rows.append(_row("user-key-after-wrong-reads", user.read(), data, "intact", keyid=args.keyid))
    return rows


def run_lost_keys_before(args: argparse.Namespace, client: Client) -> Result:
    """Boot 1: data under a user key and under a random key; wrong-KeyID reads."""
    program_user(client, args.keyid, args.user, args.alg)
    program(client, args.random_keyid, KeyCommand.SET_KEY_RANDOM, args.alg)
    m, (user, rand) = _open_regions(client, args, 2)
    user_data, rand_data = pattern(args.seed, user.length), pattern(args.seed + 1, rand.length)
    with m:
        for region, keyid, data in ((user, args.keyid, user_data), (rand, args.random_keyid, rand_data)):
            region.map(client, keyid)
            region.write(data)
            region.flush(client)
        rows = [_row("user-key-readback", user.read(), user_data, "intact", keyid=args.keyid),
                _row("random-key-readback", rand.read(), rand_data, "intact", keyid=args.random_keyid)]
        rows += _wrong_reads(client, args, user, user_data)
        client.flush(user.offset, user.length)
        client.flush(rand.offset, rand.length)
    return _lost_keys_result("lost-keys-before", args, user, rand, rows)


def run_lost_keys_after(args: argparse.Namespace, client: Client) -> Result:
    """Boot 2 (after a power cycle): random-key data gone, user-key data back with its key."""
    m, (user, rand) = _open_regions(client, args, 2, reconfigure=False)
    user_data, rand_data = pattern(args.seed, user.length), pattern(args.seed + 1, rand.length)
    with m:
        keyids_after_boot = [client.inspect(r.offset)[0].keyid for r in (user, rand)]
        user.map(client, args.keyid)
        rows = [_row("user-key-before-reprogram", user.read(), user_data, "garbage", keyid=args.keyid)]
        program(client, args.random_keyid, KeyCommand.SET_KEY_RANDOM, args.alg)
        rand.map(client, args.random_keyid)
        rows.append(_row("random-key-after-power-cycle", rand.read(), rand_data, "garbage",
                         keyid=args.random_keyid))
        program_user(client, args.keyid, args.user, args.alg)
        rows.append(_row("user-key-reprogrammed", user.read(), user_data, "intact", keyid=args.keyid))
    result = _lost_keys_result("lost-keys-after", args, user, rand, rows)
    result["keyids_after_boot"] = keyids_after_boot
    return result


def _lost_keys_result(name: str, args: argparse.Namespace, user: Region, rand: Region,
                      rows: list[Result]) -> Result:
    return {"phase": name, "keyid": args.keyid, "random_keyid": args.random_keyid,
            "seed": args.seed, "pattern": pattern_spec(args.seed),
            "regions": {"user": user.offset, "random": rand.offset, "length": user.length},
            "cases": rows, "ok": outcome_rows(rows)}


PHASES = [
    Phase("relocation", "raw mover, copy through KeyID 0, keyed mover: the outcome table",
          _relocation_arguments, run_relocation),
    Phase("lost-keys-before", "user-key and random-key data, wrong-KeyID reads (then power-cycle)",
          _lost_keys_arguments, run_lost_keys_before),
    Phase("lost-keys-after", "after a power cycle: random-key data gone, user key recovers its data",
          _lost_keys_arguments, run_lost_keys_after),
]
