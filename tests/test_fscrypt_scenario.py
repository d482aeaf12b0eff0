"""The fscrypt-offload scenario without a VM: its host verdicts and the guest's ioctl layouts."""

from __future__ import annotations

import argparse
import uuid
from typing import Any

import pytest
from mktme_emu.scenarios import SCENARIOS
from mktme_emu.scenarios.fscrypt import BLOCK, dun, key_identifier, xts_blocks
from mktme_emu.scenarios.fscrypt_offload import (
    NEVER,
    PASS_PER_MAPPING,
    Secrets,
    conclusion_rows,
    offload_rows,
    software_rows,
)
from mktme_emu.scenarios.session import guest_pattern
from mktme_guest import phase_fscrypt as g

SECRETS = Secrets(bytes(range(64)), uuid.UUID("12345678-9abc-def0-1234-56789abcdef0"))
INO, PAGES, SEED = 13, 3, 50


def _ioc(direction: int, nr: int, size: int) -> int:
    """The kernel's _IOC() for type 'f' (include/uapi/asm-generic/ioctl.h)."""
    return (direction << 30) | (size << 16) | (ord("f") << 8) | nr


def test_guest_ioctl_numbers_and_struct_sizes_follow_the_uapi_header():
    assert g.POLICY_V2.size == 24  # struct fscrypt_policy_v2
    assert g.ADD_KEY_ARG.size == 80  # struct fscrypt_add_key_arg without raw[]
    assert _ioc(2, 19, 12) == g.FS_IOC_SET_ENCRYPTION_POLICY  # _IOR, sizeof(fscrypt_policy_v1)
    assert _ioc(3, 23, g.ADD_KEY_ARG.size) == g.FS_IOC_ADD_ENCRYPTION_KEY  # _IOWR
    assert g.dun(INO, 5) == dun(INO, 5)


def _media_and_result(offload_first_dun: int | None, moved: str) -> tuple[bytes, dict[str, Any]]:
    """A media image as the phase would leave it: fscrypt's blocks, an offload copy, a moved copy."""
    plain = guest_pattern(SEED, PAGES * BLOCK)
    key = SECRETS.derived_key
    media = bytearray(64 * BLOCK)
    media[4 * BLOCK:7 * BLOCK] = fscrypt = xts_blocks(key, plain, dun(INO, 0))
    copy = fscrypt if offload_first_dun is not None else xts_blocks(key, plain, 20 * BLOCK)
    media[20 * BLOCK:23 * BLOCK] = copy
    media[40 * BLOCK:43 * BLOCK] = copy

    def ext(page: int) -> list[dict[str, int]]:
        return [{"offset": page * BLOCK, "length": PAGES * BLOCK, "logical": 0}]

    files = [{"name": "file0", "ino": INO, "seed": SEED, "length": PAGES * BLOCK, "extents": ext(4),
              "offload_extents": ext(20), "moved_extents": ext(40), "readback": "intact",
              "offload_readback": "intact", "moved_readback": moved}]
    return bytes(media), {"files": files, "uuid": str(SECRETS.fs_uuid),
                          "key_identifier": key_identifier(SECRETS.master_key).hex()}


def test_rows_from_a_dun_and_a_spa_run_reach_the_conclusion():
    dun_media, dun_result = _media_and_result(dun(INO, 0), "intact")
    spa_media, spa_result = _media_and_result(None, "garbage")
    rows = software_rows(dun_result, dun_media, SECRETS)
    rows += offload_rows("dun", dun_result, dun_media, dun_media)
    rows += offload_rows("spa", spa_result, spa_media, spa_media)
    rows += conclusion_rows(rows)
    assert all(r.ok for r in rows), [r for r in rows if not r.ok]
    assert rows[-2].observed == PASS_PER_MAPPING and rows[-1].observed == NEVER


def test_the_conclusion_follows_the_measurements_not_the_model():
    """If the spa move had kept the data, nothing would forbid it: the row says so."""
    dun_media, dun_result = _media_and_result(dun(INO, 0), "intact")
    spa_media, spa_result = _media_and_result(None, "intact")
    rows = software_rows(dun_result, dun_media, SECRETS)
    rows += offload_rows("dun", dun_result, dun_media, dun_media)
    rows += offload_rows("spa", spa_result, spa_media, spa_media)
    never = conclusion_rows(rows)[1]
    assert never.observed == "nothing shown" and not never.ok


def test_a_wrong_key_on_the_media_is_reported():
    media, result = _media_and_result(dun(INO, 0), "intact")
    other = Secrets(bytes(range(1, 65)), SECRETS.fs_uuid)
    observed = {r.case: r.observed for r in software_rows(result, media, other)}
    assert observed["files' blocks = XTS(derived key, DUN (ino<<32)|lblk)"] == "differs"
    assert observed["key identifier: kernel = host HKDF-SHA512"] == "differ"


def test_scenario_is_registered():
    assert "fscrypt-offload" in SCENARIOS


@pytest.mark.parametrize("text", ["4,9,2", "1"])
def test_guest_phase_parses_page_lists(text):
    parser = argparse.ArgumentParser()
    g._arguments(parser)
    args = parser.parse_args(["--master-key", "00" * 64, "--uuid", str(SECRETS.fs_uuid),
                              "--user", "00:11", "--pages", text])
    assert args.pages == [int(p) for p in text.split(",")]


@pytest.mark.parametrize("options", [("--master-key", "zz" * 64), ("--master-key", "00" * 32),
                                     ("--pages", "4,x"), ("--pages", "0"), ("--uuid", "nope")])
def test_guest_phase_refuses_bad_options_in_one_line(options, capsys):
    parser = argparse.ArgumentParser()
    g._arguments(parser)
    argv = {"--master-key": "00" * 64, "--uuid": str(SECRETS.fs_uuid), "--user": "00:11"}
    argv[options[0]] = options[1]
    with pytest.raises(SystemExit):
        parser.parse_args([word for pair in argv.items() for word in pair])
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("usage:") or "error:" in err[-1]
    assert "Traceback" not in "\n".join(err)
