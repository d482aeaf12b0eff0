"""The ``dun`` tweak mode: one 4096-byte data unit per page, page k of a mapping at T uses T + k.

That is exactly what fscrypt's IV_INO_LBLK_64 policies hand an inline
encryption engine (blk-crypto): AES-256-XTS per filesystem block, the IV
being the data unit number ``(inode << 32) | logical block`` as a 128-bit
little-endian integer.  Expected ciphertext is computed here with
``cryptography``'s ``modes.XTS``, one call per unit (``xts_reference``),
with the DUNs written out by hand: nothing is shared with the engine.
"""

from __future__ import annotations

import os

import pytest
from backend_helpers import PAGE, Backends, program_user, xts_reference
from mktme_emu.controller import ControllerConfig, TweakMode
from mktme_emu.errors import ConfigError


@pytest.fixture
def backends(tmp_path):
    with Backends(tmp_path) as pool:
        yield pool


def dun(ino: int, lblk: int) -> int:
    """fscrypt's IV_INO_LBLK_64 data unit number."""
    return (ino << 32) | lblk


def test_dun_media_is_the_xts_ciphertext_with_one_dun_per_page(backends):
    b = backends(tweak="dun", unit=4096)
    c = b.client()
    assert (c.config()["tweak"], c.config()["unit"]) == ("dun", 4096)
    data_key, tweak_key = os.urandom(32), os.urandom(32)
    program_user(c, 3, data_key, tweak_key)
    # Two files' blocks side by side, the second starting at lblk 5, and one
    # near the top of the 64-bit DUN space; the pages touch, their DUNs jump.
    ranges = [(10 * PAGE, 3, dun(12, 0)), (13 * PAGE, 2, dun(13, 5)),
              (40 * PAGE, 2, (1 << 64) - 2)]
    plains = []
    for offset, pages, first in ranges:
        c.map(offset, pages * PAGE, 3, first)
        plain = os.urandom(pages * PAGE)
        b.write(offset, plain)
        plains.append(plain)
    c.flush()
    for (offset, pages, first), plain in zip(ranges, plains, strict=True):
        duns = [first + k for k in range(pages)]
        media = b.media(offset, pages * PAGE)
        assert media == xts_reference(data_key + tweak_key, plain, duns, PAGE)
        assert b.read(offset, pages * PAGE) == plain
    # The same bytes under byte-address tweaks ((T + k) * 4096, logical mode) differ.
    first = ranges[0][2]
    logical = xts_reference(data_key + tweak_key, plains[0], [(first + k) * PAGE for k in range(3)], PAGE)
    assert b.media(10 * PAGE, 3 * PAGE) != logical


def test_dun_known_answer_for_one_block():
    """One block by hand: AES-256-XTS, key bytes 0..63, DUN (12 << 32) | 1, zero plaintext.

    Pins the DUN's byte order (little endian, low 64 bits first) against an
    independent one-call computation, so a swap in the reference would show.
    """
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    key = bytes(range(64))
    iv = bytes.fromhex("01000000" "0c000000" "00000000" "00000000")
    enc = Cipher(algorithms.AES(key), modes.XTS(iv)).encryptor()
    assert xts_reference(key, bytes(PAGE), [dun(12, 1)], PAGE) == enc.update(bytes(PAGE)) + enc.finalize()


def test_dun_raw_relocation_keeps_the_data(backends):
    """The DUN travels with the mapping, not the address: a raw move keeps the plaintext."""
    b = backends(tweak="dun", unit=4096)
    c = b.client()
    key = os.urandom(32), os.urandom(32)
    program_user(c, 2, *key)
    src, dst, n, first = 8 * PAGE, 100 * PAGE, 4 * PAGE, dun(14, 0)
    c.map(src, n, 2, first)
    plain = os.urandom(n)
    b.write(src, plain)
    c.flush()
    c.map(dst, n, 2, first)
    c.relocate(src, dst, n, "raw")
    assert b.read(dst, n) == plain
    assert b.media(dst, n) == b.media(src, n) == xts_reference(b"".join(key), plain,
                                                             [first + k for k in range(4)], PAGE)


def test_dun_pages_after_a_keyid0_page_are_their_own_units(backends):
    """A keyed page right after an unencrypted one starts its own run (regression guard)."""
    b = backends(tweak="dun", unit=4096)
    c = b.client()
    key = os.urandom(32), os.urandom(32)
    program_user(c, 1, *key)
    c.map(5 * PAGE, 2 * PAGE, 1, 77)
    plain, clear = os.urandom(2 * PAGE), os.urandom(PAGE)
    b.write(4 * PAGE, clear + plain)
    c.flush()
    assert b.media(4 * PAGE, PAGE) == clear
    assert b.media(5 * PAGE, 2 * PAGE) == xts_reference(b"".join(key), plain, [77, 78], PAGE)


@pytest.mark.parametrize("unit", [64, 512])
def test_dun_needs_4096_byte_units(tmp_path, unit):
    with pytest.raises(ConfigError, match="unit 4096"):
        ControllerConfig(state_dir=tmp_path, tweak=TweakMode.DUN, unit=unit)


def test_serve_refuses_dun_with_small_units_in_one_line(backends):
    b = backends(tweak="dun", unit=64, start=False)
    import subprocess
    out = subprocess.run(b.command(), capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "unit 4096" in out.stderr and "Traceback" not in out.stderr


def test_dun_keyed_move_carries_the_dun_and_a_restart_keeps_the_mode(backends):
    """The keyed mover re-encrypts under the carried DUN (same bytes); a restarted
    backend reloads dun mode and the per-page DUNs from its state directory."""
    b = backends(tweak="dun", unit=4096)
    c = b.client()
    key = os.urandom(32), os.urandom(32)
    program_user(c, 4, *key)
    src, dst, n, first = 16 * PAGE, 200 * PAGE, 3 * PAGE, dun(40, 7)
    c.map(src, n, 4, first)
    plain = os.urandom(n)
    b.write(src, plain)
    c.flush()
    c.relocate(src, dst, n, "keyed")
    expected = xts_reference(b"".join(key), plain, [first + k for k in range(3)], PAGE)
    assert b.read(dst, n) == plain and b.media(dst, n) == expected
    b.restart()
    c = b.client()
    assert c.config()["tweak"] == "dun"
    program_user(c, 4, *key)
    assert b.read(dst, n) == plain
