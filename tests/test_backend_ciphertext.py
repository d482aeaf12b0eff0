"""The media file holds exactly the AES-XTS ciphertext SPEC section 3 defines.

Expected ciphertext is computed here, independently of ``mktme_emu.crypto``:
``cryptography``'s ``Cipher(AES(data key || tweak key), XTS(tweak))``, one
call per data unit, with the tweak written out from the SPEC formulas.
"""

from __future__ import annotations

import os
import subprocess

import pytest
from backend_helpers import (
    DEFAULT_BASE,
    PAGE,
    Backends,
    mktme_emu_command,
    program_user,
    xts_fast,
    xts_reference,
)


@pytest.fixture
def backends(tmp_path):
    with Backends(tmp_path) as pool:
        yield pool


def unit_tweaks(mode: str, base: int, offset: int, length: int, unit: int,
                map_offset: int = 0, logical: int = 0) -> list[int]:
    """SPEC 3, unit by unit: spa = base + offset, dpa = offset, logical = (T + k) * 4096 + b."""
    tweaks = []
    for unit_offset in range(offset, offset + length, unit):
        if mode == "spa":
            tweaks.append(base + unit_offset)
        elif mode == "dpa":
            tweaks.append(unit_offset)
        else:
            k, b = divmod(unit_offset - map_offset, PAGE)
            tweaks.append((logical + k) * PAGE + b)
    return tweaks


CASES = [
    ("spa", 16, 64),
    ("dpa", 16, 64),
    ("logical", 16, 64),
    ("spa", 32, 64),
    ("dpa", 32, 512),
    ("spa", 16, 512),
    ("logical", 32, 512),
    ("logical", 16, 4096),
]


@pytest.mark.parametrize(("tweak", "key_bytes", "unit"), CASES,
                         ids=[f"{t}-xts{k * 8}-unit{u}" for t, k, u in CASES])
def test_media_holds_exactly_the_expected_xts_ciphertext(backends, tweak, key_bytes, unit):
    b = backends(tweak=tweak, unit=unit)
    c = b.client()
    config = c.config()
    assert (config.tweak.value, config.unit, config.base) == (tweak, unit, DEFAULT_BASE)
    data_key, tweak_key = os.urandom(key_bytes), os.urandom(key_bytes)
    program_user(c, 2, data_key, tweak_key)
    # Two mapped ranges, the second with a logical tweak beyond 64 bits' worth of bytes.
    ranges = [(3 * PAGE, 5 * PAGE, 0x0000_0007_0000_0001), (700 * PAGE, 3 * PAGE, 0xFFFF_FFFF_0000_0000)]
    plains = []
    for offset, length, logical in ranges:
        c.map(offset, length, 2, logical if tweak == "logical" else None)
        plain = os.urandom(length)
        plain = plain[:PAGE] + bytes(PAGE) + plain[2 * PAGE:]  # a zero page too
        b.write(offset, plain)
        plains.append(plain)
    c.flush()
    for (offset, length, logical), plain in zip(ranges, plains, strict=True):
        tweaks = unit_tweaks(tweak, DEFAULT_BASE, offset, length, unit, offset, logical)
        expected = xts_reference(data_key + tweak_key, plain, tweaks, unit)
        media = b.media(offset, length)
        assert media == expected
        assert xts_reference(data_key + tweak_key, media, tweaks, unit, decrypt=True) == plain
        for u in range(0, length, unit):  # never the plaintext, not even one unit
            assert media[u:u + unit] != plain[u:u + unit]
        assert plain[:PAGE] not in b.media() and plain[2 * PAGE:3 * PAGE] not in b.media()
    # A page under KeyID 0 (bypass) is stored as it is.
    raw = os.urandom(PAGE)
    b.write(100 * PAGE, raw)
    c.flush(100 * PAGE, PAGE)
    assert b.media(100 * PAGE, PAGE) == raw


def test_media_ciphertext_follows_the_base_under_spa(backends):
    base = 0x2_4000_0000
    b = backends(base=base)
    c = b.client()
    data_key, tweak_key = os.urandom(16), os.urandom(16)
    program_user(c, 1, data_key, tweak_key)
    c.map(PAGE, PAGE, 1)
    plain = os.urandom(PAGE)
    b.write(PAGE, plain)
    c.flush()
    tweaks = unit_tweaks("spa", base, PAGE, PAGE, 64)
    assert b.media(PAGE, PAGE) == xts_reference(data_key + tweak_key, plain, tweaks, 64)


@pytest.mark.parametrize("unit", [16, 64, 512, 4096])
@pytest.mark.parametrize("tweak_base", [0, DEFAULT_BASE + 12 * PAGE, (1 << 64) - 2 * PAGE, 1 << 90])
@pytest.mark.parametrize("key_bytes", [16, 32])
def test_fast_helper_xts_matches_the_reference(unit, tweak_base, key_bytes):
    """The numpy XTS of the crash test is the same function as modes.XTS."""
    key = os.urandom(2 * key_bytes)
    data = os.urandom(4 * PAGE)
    tweaks = [tweak_base + i * unit for i in range(len(data) // unit)]
    expected = xts_reference(key, data, tweaks, unit)
    assert xts_fast(key, data, tweak_base, unit) == expected
    assert xts_fast(key, expected, tweak_base, unit, decrypt=True) == data


def test_xts_command_agrees_with_the_independent_computation():
    key = os.urandom(64)
    data = os.urandom(2 * PAGE)
    base = DEFAULT_BASE + 5 * PAGE
    expected = xts_reference(key, data, [base + i * 64 for i in range(len(data) // 64)], 64)
    out = subprocess.run([*mktme_emu_command(), "xts", "--encrypt", "--key", key.hex(),
                          "--tweak-base", hex(base)], input=data, capture_output=True, check=True,
                         timeout=60)
    assert out.stdout == expected
    back = subprocess.run([*mktme_emu_command(), "xts", "--decrypt", "--key", key.hex(),
                           "--tweak-base", str(base)], input=expected, capture_output=True, check=True,
                          timeout=60)
    assert back.stdout == data
