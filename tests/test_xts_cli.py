"""Tests for ``mktme-emu xts`` (SPEC section 5): stdin to stdout, run as a real subprocess.

It must reproduce the IEEE 1619 vectors from the command line and agree with
the independent per-unit reference; a bad key or input exits non-zero with one
line on stderr, nothing on stdout, and never the key.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from test_crypto import IEEE1619_VECTORS, MASK64, Vector, carry_base, random_key, reference_xts


def _command() -> list[str]:
    script = Path(sys.executable).with_name("mktme-emu")
    if script.exists():
        return [str(script)]
    found = shutil.which("mktme-emu")
    assert found, "the mktme-emu console script is not installed (make venv)"
    return [found]


MKTME_EMU = _command()


def xts(*args: str, data: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*MKTME_EMU, "xts", *args], input=data, capture_output=True,
                          timeout=120, check=False)


def assert_ok(result: subprocess.CompletedProcess[bytes]) -> bytes:
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout


# Every command line this module runs, by name.  Each run pays the interpreter's
# start-up, so they all start together, once, in the fixture below.
RUNS: dict[str, tuple[list[str], bytes]] = {}

for _vec in IEEE1619_VECTORS:
    _common = ["--key", _vec.key, "--tweak-base", hex(_vec.sequence), "--unit", str(_vec.unit)]
    RUNS[f"encrypt {_vec.name}"] = (["--encrypt", *_common], bytes.fromhex(_vec.pt))
    RUNS[f"decrypt {_vec.name}"] = (["--decrypt", *_common], bytes.fromhex(_vec.ct))

_rng = random.Random("cli")
DEFAULT_KEY = random_key(_rng, 32)
DEFAULT_BASE = carry_base(_rng, 64, 5, _rng.getrandbits(64))
DEFAULT_PT = _rng.randbytes(64 * 11)
RUNS["default unit"] = (["--encrypt", "--key", DEFAULT_KEY.hex(), "--tweak-base", str(DEFAULT_BASE)],
                        DEFAULT_PT)
RUNS["empty"] = (["--encrypt", "--key", DEFAULT_KEY.hex(), "--tweak-base", "0"], b"")

# Over 4 MiB, so the range is split across the pool's workers; the 2^128 wrap falls inside.
LARGE_UNIT = 4096
LARGE_KEY = random_key(_rng, 64)
LARGE_LEN = 4 * 1024 * 1024 + 3 * LARGE_UNIT
LARGE_BASE = carry_base(_rng, LARGE_UNIT, LARGE_LEN // LARGE_UNIT // 2, MASK64)
LARGE_PT = _rng.randbytes(LARGE_LEN)
LARGE_CT = reference_xts(LARGE_KEY, LARGE_PT, LARGE_BASE, LARGE_UNIT)
_large = ["--key", LARGE_KEY.hex(), "--tweak-base", hex(LARGE_BASE), "--unit", "4K"]
RUNS["large encrypt"] = (["--encrypt", *_large], LARGE_PT)
RUNS["large decrypt"] = (["--decrypt", *_large], LARGE_CT)

SECRET_HEX = "a1b2c3d4e5f60718293a4b5c6d7e8f900f1e2d3c4b5a69788796a5b4c3d2e1f0"
REFUSALS = {
    "odd-hex": (["--key", SECRET_HEX[:-1]], bytes(64)),
    "not-hex": (["--key", "zz" + SECRET_HEX[2:]], bytes(64)),
    "16-bytes": (["--key", SECRET_HEX[:32]], bytes(64)),
    "48-bytes": (["--key", SECRET_HEX + SECRET_HEX[:32]], bytes(64)),
    "33-bytes": (["--key", SECRET_HEX + "00"], bytes(64)),
    "equal-halves": (["--key", SECRET_HEX[:32] * 2], bytes(64)),
    "partial-unit": (["--key", SECRET_HEX], bytes(60)),
    "unit-48": (["--key", SECRET_HEX, "--unit", "48"], bytes(96)),
    "unit-8192": (["--key", SECRET_HEX, "--unit", "8192"], bytes(8192)),
}
for _name, (_args, _data) in REFUSALS.items():
    RUNS[f"refuse encrypt {_name}"] = (["--encrypt", "--tweak-base", "0", *_args], _data)
for _name in ("odd-hex", "48-bytes", "partial-unit"):
    _args, _data = REFUSALS[_name]
    RUNS[f"refuse decrypt {_name}"] = (["--decrypt", "--tweak-base", "0", *_args], _data)


@pytest.fixture(scope="module")
def runs() -> dict[str, subprocess.CompletedProcess[bytes]]:
    with ThreadPoolExecutor(max_workers=2 * (os.cpu_count() or 1)) as pool:
        futures = {name: pool.submit(xts, *args, data=data) for name, (args, data) in RUNS.items()}
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("vec", IEEE1619_VECTORS, ids=lambda v: v.name)
def test_vector_encrypt_decrypt(runs: dict[str, subprocess.CompletedProcess[bytes]], vec: Vector) -> None:
    assert assert_ok(runs[f"encrypt {vec.name}"]) == bytes.fromhex(vec.ct)
    assert assert_ok(runs[f"decrypt {vec.name}"]) == bytes.fromhex(vec.pt)


def test_decimal_tweak_base_and_default_unit(runs: dict[str, subprocess.CompletedProcess[bytes]]) -> None:
    assert assert_ok(runs["default unit"]) == reference_xts(DEFAULT_KEY, DEFAULT_PT, DEFAULT_BASE, 64)


def test_empty_input(runs: dict[str, subprocess.CompletedProcess[bytes]]) -> None:
    assert assert_ok(runs["empty"]) == b""


def test_large_input_matches_reference(runs: dict[str, subprocess.CompletedProcess[bytes]]) -> None:
    assert assert_ok(runs["large encrypt"]) == LARGE_CT
    assert assert_ok(runs["large decrypt"]) == LARGE_PT


@pytest.mark.parametrize("name", [name for name in RUNS if name.startswith("refuse ")])
def test_refusal_is_one_line(runs: dict[str, subprocess.CompletedProcess[bytes]], name: str) -> None:
    result = runs[name]
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode != 0
    assert result.stdout == b""
    assert len(stderr.strip().splitlines()) == 1, stderr
    lowered = stderr.lower()
    for start in range(0, len(SECRET_HEX) - 12 + 1, 2):
        assert SECRET_HEX[start:start + 12] not in lowered, stderr
