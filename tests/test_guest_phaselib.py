"""Phase building blocks and system-tool parsing, on the host (no backend, no VM)."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from pathlib import Path

import pytest
from mktme_emu.vocabulary import PHASE_RESULT_PREFIX
from mktme_guest import phase_keys, phaselib, system
from mktme_guest.errors import CommandFailed, DeviceError


def test_pattern_is_what_the_result_tells_the_host() -> None:
    data = phaselib.pattern(42, 10000)
    assert data == hashlib.shake_256(b"mktme-emu pattern 42").digest(10000)
    assert phaselib.pattern_spec(42) == "shake_256(b'mktme-emu pattern 42').digest(length)"
    assert phaselib.pattern(43, 16) != data[:16]


def test_classify() -> None:
    good = phaselib.pattern(1, 3 * 4096)
    bad = phaselib.pattern(2, 3 * 4096)
    assert phaselib.classify(good, good) == "intact"
    assert phaselib.classify(bad, good) == "garbage"
    assert phaselib.classify(good[:4096] + bad[4096:], good) == "partial"
    with pytest.raises(ValueError):
        phaselib.classify(good[:10], good)


def test_emit_and_parse_both_forms() -> None:
    result = {"phase": "x", "ok": False, "cases": [
        {"case": "raw", "outcome": "garbage", "expected": "garbage"},
        {"case": "keyed", "outcome": "garbage", "expected": "intact"}]}
    text = io.StringIO()
    phaselib.emit(result, as_json=False, out=text)
    lines = text.getvalue().splitlines()
    assert lines[0] == "phase x: UNEXPECTED"
    assert "(expected intact)" in lines[2]
    assert lines[-1].startswith(PHASE_RESULT_PREFIX)
    noisy = "[   1.0] kernel says hi\n" + text.getvalue() + "\n"
    assert phaselib.parse_result(noisy) == result
    text = io.StringIO()
    phaselib.emit(result, as_json=True, out=text)
    assert json.loads(text.getvalue()) == result == phaselib.parse_result(text.getvalue())


def test_outcome_rows() -> None:
    assert phaselib.outcome_rows([{"outcome": "intact", "expected": "intact"},
                                  {"outcome": "garbage", "expected": None}])
    assert not phaselib.outcome_rows([{"outcome": "intact", "expected": "garbage"}])


@pytest.mark.parametrize(("case", "tweak", "tme", "expected"), [
    ("raw", "spa", "bypass", "garbage"), ("raw", "dpa", "bypass", "garbage"),
    ("raw", "logical", "ephemeral", "intact"), ("copy-keyid0", "spa", "bypass", "garbage"),
    ("copy-keyid0", "logical", "bypass", "intact"), ("copy-keyid0", "logical", "retained", "garbage"),
    ("keyed", "spa", "ephemeral", "intact"), ("keyed", "logical", "bypass", "intact")])
def test_relocation_model(case: str, tweak: str, tme: str, expected: str) -> None:
    assert phase_keys.expected_relocation(case, tweak, tme) == expected


def test_key_arguments() -> None:
    parser = argparse.ArgumentParser()
    phaselib.add_key_arguments(parser, keyid=9)
    args = parser.parse_args(["--keyid", "0x3"])
    assert (args.keyid, args.user, args.alg) == (3, phaselib.TEST_KEY, "aes-xts-128")


# -- system tools --------------------------------------------------------------------------------

def test_namespace_device_from_ndctl_json() -> None:
    fsdax = system._ndctl_json('{"dev":"namespace0.0","mode":"fsdax","blockdev":"pmem0"}')
    assert system.namespace_device(fsdax) == "/dev/pmem0"
    listed = system._ndctl_json('[{"dev":"namespace0.0","mode":"devdax","chardev":"dax0.0"}]')
    assert system.namespace_device(listed) == "/dev/dax0.0"
    nested = {"mode": "devdax", "daxregion": {"devices": [{"chardev": "dax0.1"}]}}
    assert system.namespace_device(nested) == "/dev/dax0.1"
    with pytest.raises(DeviceError, match="has no device"):
        system.namespace_device({"dev": "namespace0.0", "mode": "raw"})
    with pytest.raises(DeviceError, match="not JSON"):
        system._ndctl_json("error: no such namespace")


def test_mount_options(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/pmem0 {tmp_path} ext4 rw,relatime,dax=always 0 0\n"
                      "tmpfs /tmp tmpfs rw 0 0\n")
    assert system.is_mounted(tmp_path, mounts) and system.mount_is_dax(tmp_path, mounts)
    assert not system.is_mounted(tmp_path / "other", mounts)
    mounts.write_text(f"/dev/pmem0 {tmp_path} xfs rw,attr2 0 0\n")
    assert not system.mount_is_dax(tmp_path, mounts)


def test_nvdimm_devices(tmp_path: Path) -> None:
    (tmp_path / "block" / "pmem0").mkdir(parents=True)
    (tmp_path / "block" / "vda").mkdir()
    assert system.default_device(tmp_path) == "/dev/pmem0"
    (tmp_path / "bus" / "dax" / "devices" / "dax1.0").mkdir(parents=True)
    assert system.nvdimm_devices(tmp_path) == ["/dev/pmem0", "/dev/dax1.0"]
    with pytest.raises(DeviceError, match="pass --device"):
        system.default_device(tmp_path)


def test_run_reports_the_tool_and_its_words() -> None:
    with pytest.raises(CommandFailed, match="exited with status 3: first second") as failed:
        system.run([sys.executable, "-c", "import sys; sys.stderr.write('first\\n  second\\n'); sys.exit(3)"])
    assert failed.value.status == 3
    with pytest.raises(CommandFailed, match="status -1"):
        system.run(["/nonexistent/tool"])
    echo = [sys.executable, "-c", "import os; print(os.environ['X'])"]
    assert system.run(echo, env={"X": "y"}).stdout == "y\n"


def test_bad_modes_are_refused() -> None:
    with pytest.raises(DeviceError, match="namespace mode"):
        system.ensure_namespace("sector")
    with pytest.raises(DeviceError, match="filesystem must be"):
        system.mkfs("btrfs", "/dev/null")
