"""The names host and guest share: one parser per unit, one enum per mode, the KeyID rules."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
from mktme_emu import vocabulary as v
from mktme_emu.cli import args as host_args
from mktme_emu.controller import TweakMode as ControllerTweakMode
from mktme_emu.keytable import TmePolicy as KeytableTmePolicy
from mktme_guest import argtypes as guest_args


@pytest.mark.parametrize(("text", "value"), [
    ("4096", 4096), ("0x1000", 4096), ("64K", 64 << 10), ("2M", 2 << 20), ("1G", 1 << 30),
    ("2MiB", 2 << 20), ("0x10K", 16 << 10), (" 8M ", 8 << 20), ("1T", 1 << 40)])
def test_sizes(text: str, value: int) -> None:
    assert v.size(text) == value == v.address(text)


@pytest.mark.parametrize("text", ["", "4k", "1.5M", "-1", "0x", "M", "12Q", "ab" * 16])
def test_bad_sizes_are_refused_without_repeating_the_text(text: str) -> None:
    with pytest.raises(v.ParseError) as info:
        v.size(text)
    assert isinstance(info.value, ValueError) and isinstance(info.value, argparse.ArgumentTypeError)
    assert str(info.value) == "not a size (e.g. 4096, 0x1000, 64K, 256M, 1G)"  # the same for any text


def test_integers_and_hex() -> None:
    assert [v.integer(t) for t in ("12", "0xc", "-3", "0b11")] == [12, 12, -3, 3]
    with pytest.raises(v.ParseError):
        v.integer("twelve")
    assert v.hex_bytes("00ff") == b"\x00\xff"
    secret = "zz" + "ab" * 15
    with pytest.raises(v.ParseError) as info:
        v.hex_bytes(secret)
    assert secret not in str(info.value)


def test_host_and_guest_use_the_very_same_parsers() -> None:
    assert host_args.size is guest_args.size is v.size
    assert host_args.integer is guest_args.integer is v.integer
    assert host_args.address is guest_args.address is v.address


def test_an_argparse_option_gets_the_message_not_the_value() -> None:
    parser = argparse.ArgumentParser(prog="x", exit_on_error=False)
    parser.add_argument("--length", type=v.size)
    with pytest.raises(argparse.ArgumentError, match="not a size") as info:
        parser.parse_args(["--length", "deadbeefcafe"])
    assert "deadbeefcafe" not in str(info.value)


def test_wire_numbers_of_the_modes() -> None:
    """docs/protocol.md: tweak 0 spa, 1 dpa, 2 logical, 3 dun; tme 0 bypass, 1 ephemeral, 2 retained."""
    assert [(m.value, m.wire) for m in v.TweakMode] == [("spa", 0), ("dpa", 1), ("logical", 2), ("dun", 3)]
    assert [(m.value, m.wire) for m in v.TmePolicy] == [("bypass", 0), ("ephemeral", 1), ("retained", 2)]
    assert [(m.value, m.wire) for m in v.RelocateMode] == [("raw", 0), ("keyed", 1)]
    assert v.TweakMode.from_wire(3) is v.TweakMode.DUN
    with pytest.raises(ValueError):
        v.TmePolicy.from_wire(3)
    assert v.NAMESPACE_MODES == ("fsdax", "devdax", "raw")


def test_the_old_homes_of_the_enums_re_export_them() -> None:
    assert ControllerTweakMode is v.TweakMode and KeytableTmePolicy is v.TmePolicy


def test_keyid_rules() -> None:
    assert v.keyid_count(6) == 64
    assert v.keyid_problem(0, 6, programmable=True) == "KeyID 0 is the TME KeyID; 1..63 are programmable"
    assert v.keyid_problem(0, 6) is None and v.keyid_problem(63, 6, programmable=True) is None
    assert v.keyid_problem(64, 6) == "KeyID 64 is out of range: 0..63 with 6 KeyID bits"
    assert (v.keyid_problem(99999, 6, programmable=True)
            == "KeyID 99999 is out of range: 1..63 with 6 KeyID bits")
    with pytest.raises(ValueError):
        v.keyid_count(16)


def test_the_guest_path_imports_neither_numpy_nor_cryptography() -> None:
    probe = ("import sys, mktme_guest.cli, mktme_guest.channel, mktme_emu.protocol, mktme_emu.vocabulary\n"
             "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('numpy', 'cryptography'))\n"
             "print(heavy)")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"
