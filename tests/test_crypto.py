"""Tests for the batched AES-XTS engine (``mktme_emu.crypto``).

Two kinds of evidence: the published IEEE 1619 vectors (tweak = data-unit
sequence number, unit = the whole vector), and equality with an independent
reference that makes one ``cryptography`` ``modes.XTS(tweak)`` call per data
unit, on seeded random keys, unit sizes, lengths and tweak bases, including
bases whose low 64 bits carry into the high 64 bits mid-buffer and bases near
2^128 that wrap.  Then the refusals, whose messages must never show the key.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
from pathlib import Path
from typing import ClassVar, NamedTuple

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from mktme_emu import crypto
from mktme_emu.crypto import XtsEngine, XtsKey, XtsPool, check_unit, xts_decrypt, xts_encrypt
from mktme_emu.errors import CryptoError

MASK64 = (1 << 64) - 1
MASK128 = (1 << 128) - 1
UNITS = [16 << i for i in range(9)]  # 16, 32, ... 4096
# The engine's two ways of masking the blocks: the compiled loops and numpy (their fallback).
LOOPS = [pytest.param(True, id="compiled"), pytest.param(False, id="numpy")]
SHARED_VECTORS = (Path(__file__).resolve().parents[2] / "shared" / "reference"
                  / "xts_vectors_ieee1619_subset.json")


class Vector(NamedTuple):
    name: str
    key: str
    pt: str
    ct: str
    sequence: int  # data-unit sequence number: the tweak base
    unit: int  # data_unit_bytes: the whole vector is one unit


# The published vectors, copied here so that a fresh clone without ../shared
# still checks them; test_embedded_vectors_match_shared_file guards the copy.
IEEE1619_VECTORS = (
    Vector(
        name="IEEE1619-2007 Vector 2 (XTS-AES-128)",
        key="1111111111111111111111111111111122222222222222222222222222222222",
        pt="4444444444444444444444444444444444444444444444444444444444444444",
        ct="c454185e6a16936e39334038acef838bfb186fff7480adc4289382ecd6d394f0",
        sequence=0x3333333333,
        unit=32,
    ),
    Vector(
        name="IEEE1619-2007 Vector 3 (XTS-AES-128)",
        key="fffefdfcfbfaf9f8f7f6f5f4f3f2f1f022222222222222222222222222222222",
        pt="4444444444444444444444444444444444444444444444444444444444444444",
        ct="af85336b597afc1a900b2eb21ec949d292df4c047e0b21532186a5971a227a89",
        sequence=0x3333333333,
        unit=32,
    ),
    Vector(
        name="IEEE1619-2007 Vector 4 (XTS-AES-128)",
        key="2718281828459045235360287471352631415926535897932384626433832795",
        pt=(
            "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f"
            "303132333435363738393a3b3c3d3e3f404142434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f"
            "606162636465666768696a6b6c6d6e6f707172737475767778797a7b7c7d7e7f808182838485868788898a8b8c8d8e8f"
            "909192939495969798999a9b9c9d9e9fa0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebf"
            "c0c1c2c3c4c5c6c7c8c9cacbcccdcecfd0d1d2d3d4d5d6d7d8d9dadbdcdddedfe0e1e2e3e4e5e6e7e8e9eaebecedeeef"
            "f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
            "202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f404142434445464748494a4b4c4d4e4f"
            "505152535455565758595a5b5c5d5e5f606162636465666768696a6b6c6d6e6f707172737475767778797a7b7c7d7e7f"
            "808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9fa0a1a2a3a4a5a6a7a8a9aaabacadaeaf"
            "b0b1b2b3b4b5b6b7b8b9babbbcbdbebfc0c1c2c3c4c5c6c7c8c9cacbcccdcecfd0d1d2d3d4d5d6d7d8d9dadbdcdddedf"
            "e0e1e2e3e4e5e6e7e8e9eaebecedeeeff0f1f2f3f4f5f6f7f8f9fafbfcfdfeff"
        ),
        ct=(
            "27a7479befa1d476489f308cd4cfa6e2a96e4bbe3208ff25287dd3819616e89cc78cf7f5e543445f8333d8fa7f560000"
            "05279fa5d8b5e4ad40e736ddb4d35412328063fd2aab53e5ea1e0a9f332500a5df9487d07a5c92cc512c8866c7e860ce"
            "93fdf166a24912b422976146ae20ce846bb7dc9ba94a767aaef20c0d61ad02655ea92dc4c4e41a8952c651d33174be51"
            "a10c421110e6d81588ede82103a252d8a750e8768defffed9122810aaeb99f9172af82b604dc4b8e51bcb08235a6f434"
            "1332e4ca60482a4ba1a03b3e65008fc5da76b70bf1690db4eae29c5f1badd03c5ccf2a55d705ddcd86d449511ceb7ec3"
            "0bf12b1fa35b913f9f747a8afd1b130e94bff94effd01a91735ca1726acd0b197c4e5b03393697e126826fb6bbde8ecc"
            "1e08298516e2c9ed03ff3c1b7860f6de76d4cecd94c8119855ef5297ca67e9f3e7ff72b1e99785ca0a7e7720c5b36dc6"
            "d72cac9574c8cbbc2f801e23e56fd344b07f22154beba0f08ce8891e643ed995c94d9a69c9f1b5f499027a78572aeebd"
            "74d20cc39881c213ee770b1010e4bea718846977ae119f7a023ab58cca0ad752afe656bb3c17256a9f6e9bf19fdd5a38"
            "fc82bbe872c5539edb609ef4f79c203ebb140f2e583cb2ad15b4aa5b655016a8449277dbd477ef2c8d6c017db738b18d"
            "eb4a427d1923ce3ff262735779a418f20a282df920147beabe421ee5319d0568"
        ),
        sequence=0x0,
        unit=512,
    ),
    Vector(
        name="IEEE1619-2007 Vector 10 (XTS-AES-256)",
        key=(
            "271828182845904523536028747135266249775724709369995957496696762731415926535897932384626433832795"
            "02884197169399375105820974944592"
        ),
        pt=(
            "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f"
            "303132333435363738393a3b3c3d3e3f404142434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f"
            "606162636465666768696a6b6c6d6e6f707172737475767778797a7b7c7d7e7f808182838485868788898a8b8c8d8e8f"
            "909192939495969798999a9b9c9d9e9fa0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebf"
            "c0c1c2c3c4c5c6c7c8c9cacbcccdcecfd0d1d2d3d4d5d6d7d8d9dadbdcdddedfe0e1e2e3e4e5e6e7e8e9eaebecedeeef"
            "f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
            "202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f404142434445464748494a4b4c4d4e4f"
            "505152535455565758595a5b5c5d5e5f606162636465666768696a6b6c6d6e6f707172737475767778797a7b7c7d7e7f"
            "808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9fa0a1a2a3a4a5a6a7a8a9aaabacadaeaf"
            "b0b1b2b3b4b5b6b7b8b9babbbcbdbebfc0c1c2c3c4c5c6c7c8c9cacbcccdcecfd0d1d2d3d4d5d6d7d8d9dadbdcdddedf"
            "e0e1e2e3e4e5e6e7e8e9eaebecedeeeff0f1f2f3f4f5f6f7f8f9fafbfcfdfeff"
        ),
        ct=(
            "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b5d31e276f8fe4a8d66b317f9ac683f44"
            "680a86ac35adfc3345befecb4bb188fd5776926c49a3095eb108fd1098baec70aaa66999a72a82f27d848b21d4a741b0"
            "c5cd4d5fff9dac89aeba122961d03a757123e9870f8acf1000020887891429ca2a3e7a7d7df7b10355165c8b9a6d0a7d"
            "e8b062c4500dc4cd120c0f7418dae3d0b5781c34803fa75421c790dfe1de1834f280d7667b327f6c8cd7557e12ac3a0f"
            "93ec05c52e0493ef31a12d3d9260f79a289d6a379bc70c50841473d1a8cc81ec583e9645e07b8d9670655ba5bbcfecc6"
            "dc3966380ad8fecb17b6ba02469a020a84e18e8f84252070c13e9f1f289be54fbc481457778f616015e1327a02b140f1"
            "505eb309326d68378f8374595c849d84f4c333ec4423885143cb47bd71c5edae9be69a2ffeceb1bec9de244fbe15992b"
            "11b77c040f12bd8f6a975a44a0f90c29a9abc3d4d893927284c58754cce294529f8614dcd2aba991925fedc4ae74ffac"
            "6e333b93eb4aff0479da9a410e4450e0dd7ae4c6e2910900575da401fc07059f645e8b7e9bfdef33943054ff84011493"
            "c27b3429eaedb4ed5376441a77ed43851ad77f16f541dfd269d50d6a5f14fb0aab1cbb4c1550be97f7ab4066193c4caa"
            "773dad38014bd2092fa755c824bb5e54c4f36ffda9fcea70b9c6e693e148c151"
        ),
        sequence=0xff,
        unit=512,
    ),
)


# -- the independent reference ------------------------------------------------------


def reference_xts(key: bytes, data: bytes, tweak_base: int, unit: int, *, encrypt: bool = True) -> bytes:
    """One ``cryptography`` XTS call per unit; unit i has tweak base + i * unit mod 2^128."""
    out = bytearray()
    for index, start in enumerate(range(0, len(data), unit)):
        tweak = ((tweak_base + index * unit) & MASK128).to_bytes(16, "little")
        cipher = Cipher(algorithms.AES(key), modes.XTS(tweak))
        ctx = cipher.encryptor() if encrypt else cipher.decryptor()
        out += ctx.update(data[start:start + unit]) + ctx.finalize()
    return bytes(out)


def random_key(rng: random.Random, size: int) -> bytes:
    while True:
        key = rng.randbytes(size)
        if key[:size // 2] != key[size // 2:]:
            return key


def carry_base(rng: random.Random, unit: int, at_unit: int, high: int) -> int:
    """A tweak base whose low 64 bits carry into the high word at unit ``at_unit``.

    Not unit-aligned on purpose: the base is any 128-bit value.
    """
    low = (1 << 64) - at_unit * unit + rng.randrange(unit)
    return ((high << 64) | low) & MASK128


def tweak_cases(rng: random.Random, unit: int, max_units: int) -> list[tuple[str, int, int]]:
    """(label, tweak base, number of units) covering the interesting tweak arithmetic."""
    many = rng.randint(2, max(2, max_units))
    mid = rng.randint(1, many - 1)
    return [
        ("random", rng.getrandbits(128), rng.randint(1, max_units)),
        ("small", rng.randrange(1 << 20), rng.randint(1, max_units)),
        ("carry-64", carry_base(rng, unit, mid, rng.getrandbits(63)), many),
        ("wrap-128", carry_base(rng, unit, mid, MASK64), many),
        ("top", MASK128 - rng.randrange(unit), many),
    ]


def assert_crossed(base: int, unit: int, units: int, bit: int) -> None:
    """Guard the test itself: the tweaks of the range really cross 2^bit."""
    first, last = base, base + (units - 1) * unit
    assert first >> bit != last >> bit, "test case does not cross the word boundary"


# -- IEEE 1619 known answers ------------------------------------------------------


@pytest.mark.skipif(not SHARED_VECTORS.exists(), reason="../shared/reference not present")
def test_embedded_vectors_match_shared_file() -> None:
    published = json.loads(SHARED_VECTORS.read_text())
    assert len(published) == len(IEEE1619_VECTORS)
    for entry, vec in zip(published, IEEE1619_VECTORS, strict=True):
        assert entry["name"] == vec.name
        assert (entry["key"], entry["pt"], entry["ct"]) == (vec.key, vec.pt, vec.ct)
        assert int(entry["data_unit_sequence_number"], 16) == vec.sequence
        assert entry["data_unit_bytes"] == vec.unit
        assert bytes.fromhex(entry["tweak"]) == vec.sequence.to_bytes(16, "little")


@pytest.mark.parametrize("vec", IEEE1619_VECTORS, ids=lambda v: v.name)
def test_reference_reproduces_ieee1619(vec: Vector) -> None:
    """The reference itself is checked against the published vectors."""
    key, pt, ct = bytes.fromhex(vec.key), bytes.fromhex(vec.pt), bytes.fromhex(vec.ct)
    assert reference_xts(key, pt, vec.sequence, vec.unit) == ct


@pytest.mark.parametrize("vec", IEEE1619_VECTORS, ids=lambda v: v.name)
def test_ieee1619_encrypt(vec: Vector) -> None:
    key, pt, ct = bytes.fromhex(vec.key), bytes.fromhex(vec.pt), bytes.fromhex(vec.ct)
    assert len(pt) == vec.unit
    assert xts_encrypt(key, pt, vec.sequence, unit=vec.unit) == ct
    assert xts_encrypt(XtsKey(key), pt, vec.sequence, unit=vec.unit) == ct


@pytest.mark.parametrize("vec", IEEE1619_VECTORS, ids=lambda v: v.name)
def test_ieee1619_decrypt(vec: Vector) -> None:
    key, pt, ct = bytes.fromhex(vec.key), bytes.fromhex(vec.pt), bytes.fromhex(vec.ct)
    assert xts_decrypt(key, ct, vec.sequence, unit=vec.unit) == pt
    assert xts_decrypt(XtsKey(key), ct, vec.sequence, unit=vec.unit) == pt


@pytest.mark.parametrize("vec", IEEE1619_VECTORS, ids=lambda v: v.name)
@pytest.mark.parametrize("compiled", LOOPS)
def test_ieee1619_engine_in_place(vec: Vector, compiled: bool) -> None:
    key, pt, ct = XtsKey(bytes.fromhex(vec.key)), bytes.fromhex(vec.pt), bytes.fromhex(vec.ct)
    engine = XtsEngine(vec.unit, compiled=compiled)
    buf = bytearray(pt)
    engine.encrypt_into(key, buf, buf, vec.sequence)
    assert bytes(buf) == ct
    engine.decrypt_into(key, buf, buf, vec.sequence)
    assert bytes(buf) == pt


# -- equality with the reference ---------------------------------------------------


@pytest.mark.parametrize("key_size", [32, 64], ids=["xts128", "xts256"])
@pytest.mark.parametrize("unit", UNITS)
def test_matches_reference(unit: int, key_size: int) -> None:
    rng = random.Random(f"matches-{unit}-{key_size}")
    max_units = max(4, (24 * 1024) // unit)
    for label, base, units in tweak_cases(rng, unit, max_units):
        key = random_key(rng, key_size)
        pt = rng.randbytes(units * unit)
        if label in ("carry-64", "wrap-128"):
            assert_crossed(base, unit, units, 64 if label == "carry-64" else 128)
        ct = xts_encrypt(key, pt, base, unit=unit)
        assert ct == reference_xts(key, pt, base, unit), label
        assert xts_decrypt(key, ct, base, unit=unit) == pt, label
        # Decryption on its own, of data that is not our ciphertext.
        junk = rng.randbytes(units * unit)
        assert xts_decrypt(key, junk, base, unit=unit) == reference_xts(
            key, junk, base, unit, encrypt=False), label


def test_matches_reference_random_mix() -> None:
    rng = random.Random("random-mix")
    for _ in range(40):
        unit = rng.choice(UNITS)
        key = random_key(rng, rng.choice([32, 64]))
        units = rng.randint(1, max(1, 16384 // unit))
        base = rng.choice([rng.getrandbits(128), rng.getrandbits(64),
                           carry_base(rng, unit, rng.randint(0, units), rng.getrandbits(64))])
        pt = rng.randbytes(units * unit)
        ct = xts_encrypt(key, pt, base, unit)
        assert ct == reference_xts(key, pt, base, unit), (unit, units, hex(base))
        assert xts_decrypt(key, ct, base, unit) == pt


def test_default_unit_is_64_bytes() -> None:
    rng = random.Random("default-unit")
    key, pt, base = random_key(rng, 32), rng.randbytes(64 * 9), rng.getrandbits(128)
    assert xts_encrypt(key, pt, base) == reference_xts(key, pt, base, 64)
    assert XtsEngine().unit == 64


def test_units_are_independent_of_neighbours() -> None:
    """Changing one unit changes only that unit's ciphertext (no chaining across units)."""
    rng = random.Random("independent")
    key, base, unit = random_key(rng, 32), rng.getrandbits(128), 64
    pt = bytearray(rng.randbytes(unit * 16))
    ct = xts_encrypt(key, bytes(pt), base, unit)
    pt[5 * unit + 3] ^= 1
    ct2 = xts_encrypt(key, bytes(pt), base, unit)
    diff = {i // unit for i in range(len(ct)) if ct[i] != ct2[i]}
    assert diff == {5}


@pytest.mark.parametrize("unit", [16, 64, 512, 4096])
@pytest.mark.parametrize("chunk_units", [1, 3, 7])
@pytest.mark.parametrize("compiled", LOOPS)
def test_engine_small_chunks(unit: int, chunk_units: int, compiled: bool) -> None:
    """Several chunks per call, with tweak carries and wraps landing inside and between chunks."""
    rng = random.Random(f"chunks-{unit}-{chunk_units}")
    chunk = chunk_units * unit + rng.randrange(unit)  # not unit-aligned
    engine = XtsEngine(unit, chunk=chunk, compiled=compiled)
    units = chunk_units * 5 + 2  # a partial last chunk
    for label, base in [("carry-64", carry_base(rng, unit, units // 2, rng.getrandbits(63))),
                        ("wrap-128", carry_base(rng, unit, chunk_units, MASK64)),
                        ("random", rng.getrandbits(128))]:
        key = XtsKey(random_key(rng, rng.choice([32, 64])))
        pt = rng.randbytes(units * unit)
        out = bytearray(len(pt))
        engine.encrypt_into(key, pt, out, base)
        raw_key = _raw(key)
        assert bytes(out) == reference_xts(raw_key, pt, base, unit), label
        back = bytearray(len(pt))
        engine.decrypt_into(key, out, back, base)
        assert bytes(back) == pt, label


@pytest.mark.parametrize("compiled", LOOPS)
def test_engine_default_chunk_several_rounds(compiled: bool) -> None:
    """A range larger than the default chunk for 64-byte units."""
    rng = random.Random("default-chunk")
    engine = XtsEngine(64, compiled=compiled)
    assert engine.chunk <= 1024 * 1024  # keeps the per-unit reference below affordable
    key = random_key(rng, 64)
    base = carry_base(rng, 64, engine.chunk // 64 + 5, rng.getrandbits(64))  # carry in chunk 2
    pt = rng.randbytes(engine.chunk + 37 * 64)
    out = bytearray(len(pt))
    engine.encrypt_into(XtsKey(key), pt, out, base)
    assert bytes(out) == reference_xts(key, pt, base, 64)


@pytest.mark.parametrize("compiled", LOOPS)
def test_engine_reused_across_keys_and_lengths(compiled: bool) -> None:
    """Preallocated buffers must not leak state from one call into the next."""
    rng = random.Random("reuse")
    engine = XtsEngine(256, chunk=8 * 256, compiled=compiled)
    for units in (20, 3, 8, 1, 17):
        key = random_key(rng, rng.choice([32, 64]))
        base = rng.getrandbits(128)
        pt = rng.randbytes(units * 256)
        out = bytearray(len(pt))
        engine.encrypt_into(XtsKey(key), pt, out, base)
        assert bytes(out) == reference_xts(key, pt, base, 256), units


@pytest.mark.parametrize("unit", [16, 64, 4096])
@pytest.mark.parametrize("compiled", LOOPS)
def test_engine_in_place(unit: int, compiled: bool) -> None:
    rng = random.Random(f"in-place-{unit}")
    engine = XtsEngine(unit, chunk=2 * unit, compiled=compiled)
    key = random_key(rng, 32)
    base = carry_base(rng, unit, 3, rng.getrandbits(64))
    pt = rng.randbytes(7 * unit)
    buf = bytearray(pt)
    engine.encrypt_into(XtsKey(key), buf, buf, base)
    assert bytes(buf) == reference_xts(key, pt, base, unit)
    view = memoryview(buf)
    engine.decrypt_into(XtsKey(key), view, view, base)
    assert bytes(buf) == pt


@pytest.mark.parametrize("compiled", LOOPS)
def test_engine_unaligned_buffers(compiled: bool) -> None:
    """Buffers that do not start on an 8-byte boundary (slices of an mmap, say)."""
    rng = random.Random("unaligned")
    key, base, unit = random_key(rng, 32), rng.getrandbits(128), 64
    pt = rng.randbytes(10 * unit)
    src_store, dst_store = bytearray(len(pt) + 3), bytearray(len(pt) + 5)
    src, dst = memoryview(src_store)[3:], memoryview(dst_store)[5:]
    src[:] = pt
    XtsEngine(unit, chunk=3 * unit, compiled=compiled).encrypt_into(XtsKey(key), src, dst, base)
    assert bytes(dst) == reference_xts(key, pt, base, unit)
    assert dst_store[:5] == bytes(5)


def test_key_usable_from_several_threads() -> None:
    rng = random.Random("threads")
    raw = random_key(rng, 64)
    key = XtsKey(raw)
    pt = rng.randbytes(64 * 50)
    results: dict[int, bytes] = {}

    def work(base: int) -> None:
        results[base] = xts_encrypt(key, pt, base)

    threads = [threading.Thread(target=work, args=(base,)) for base in range(0, 8 * 4096, 4096)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for base, ct in results.items():
        assert ct == reference_xts(raw, pt, base, 64)
    assert len(results) == 8


# -- XtsPool ----------------------------------------------------------------------


class _SpyEngine(XtsEngine):
    """Records which thread processed which length."""

    calls: ClassVar[list[tuple[int, int]]] = []

    def encrypt_into(self, key, src, dst, tweak_base):  # type: ignore[no-untyped-def]
        _SpyEngine.calls.append((threading.get_ident(), len(memoryview(src))))
        super().encrypt_into(key, src, dst, tweak_base)


@pytest.fixture
def spy_engine(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    _SpyEngine.calls = []
    monkeypatch.setattr(crypto, "XtsEngine", _SpyEngine)
    return _SpyEngine.calls


@pytest.mark.parametrize(("unit", "workers", "extra_units"), [(1024, 2, 37), (4096, 3, 5), (2048, 4, 1)])
def test_pool_large_range_split_across_threads(spy_engine: list[tuple[int, int]], unit: int,
                                               workers: int, extra_units: int) -> None:
    rng = random.Random(f"pool-{unit}-{workers}")
    length = 4 * 1024 * 1024 + extra_units * unit
    assert length > 2 * crypto.PARALLEL_MIN
    key = random_key(rng, 32 if unit == 1024 else 64)
    # The carry (or the 2^128 wrap) lands somewhere in the middle of the range.
    high = MASK64 if workers == 3 else rng.getrandbits(64)
    base = carry_base(rng, unit, (length // unit) * 2 // 3, high)
    pt = rng.randbytes(length)
    out = bytearray(length)
    pool = XtsPool(unit, workers=workers)
    try:
        pool.encrypt_into(XtsKey(key), pt, out, base)
        pieces = list(spy_engine)
        back = bytearray(out)
        pool.decrypt_into(XtsKey(key), back, back, base)  # in place
    finally:
        pool.close()
    assert len(pieces) > 1, "a range over 4 MiB was not split"
    # Which worker picks up which piece is up to the executor; none runs on the caller.
    assert threading.get_ident() not in {thread for thread, _ in pieces}
    assert sum(size for _, size in pieces) == length
    assert all(size % unit == 0 for _, size in pieces)
    assert bytes(out) == reference_xts(key, pt, base, unit)
    assert bytes(back) == pt


def test_pool_keeps_small_units_on_the_calling_thread_with_numpy(spy_engine: list[tuple[int, int]]) -> None:
    """With the numpy mask, below PARALLEL_MIN_UNIT threads only fight over the GIL:
    no split, same result."""
    rng = random.Random("pool-small-units")
    key = random_key(rng, 32)
    pt = rng.randbytes(5 * 1024 * 1024)
    out = bytearray(len(pt))
    pool = XtsPool(64, workers=2, compiled=False)
    try:
        pool.encrypt_into(XtsKey(key), pt, out, 0x1000)
    finally:
        pool.close()
    assert crypto.PARALLEL_MIN_UNIT > 64
    assert [thread for thread, _ in spy_engine] == [threading.get_ident()]
    assert bytes(out[:4096]) == reference_xts(key, pt[:4096], 0x1000, 64)


def test_pool_splits_small_units_with_the_compiled_loops(spy_engine: list[tuple[int, int]]) -> None:
    """The compiled loops release the GIL: 64-byte units gain from every worker."""
    rng = random.Random("pool-small-units-compiled")
    key = random_key(rng, 32)
    base = carry_base(rng, 64, 50_000, rng.getrandbits(64))  # the carry inside the first piece
    pt = rng.randbytes(5 * 1024 * 1024)
    out = bytearray(len(pt))
    pool = XtsPool(64, workers=2, compiled=True)
    try:
        pool.encrypt_into(XtsKey(key), pt, out, base)
    finally:
        pool.close()
    assert len(spy_engine) == 2 and threading.get_ident() not in {thread for thread, _ in spy_engine}
    assert bytes(out) == reference_xts(key, pt, base, 64)


def test_pool_small_range_and_single_worker() -> None:
    rng = random.Random("pool-small")
    key = random_key(rng, 64)
    base = carry_base(rng, 128, 10, rng.getrandbits(64))
    pt = rng.randbytes(128 * 40)
    expected = reference_xts(key, pt, base, 128)
    for workers in (1, 2):
        pool = XtsPool(128, workers=workers)
        try:
            buf = bytearray(pt)
            pool.encrypt_into(XtsKey(key), buf, buf, base)
            assert bytes(buf) == expected
            pool.decrypt_into(XtsKey(key), buf, buf, base)
            assert bytes(buf) == pt
        finally:
            pool.close()


# -- refusals ---------------------------------------------------------------------

SECRET = bytes.fromhex("a1b2c3d4e5f60718293a4b5c6d7e8f90" "0f1e2d3c4b5a69788796a5b4c3d2e1f0")
SECRET64 = SECRET + SECRET[::-1]


def assert_no_key(message: str, key: bytes) -> None:
    """No 6-byte run of the key, in hex of either case or as a bytes repr, is in the message."""
    lowered = message.lower()
    for start in range(len(key) - 5):
        window = key[start:start + 6]
        assert window.hex() not in lowered, message
        assert repr(window)[2:-1].lower() not in lowered, message


@pytest.mark.parametrize("unit", [0, 8, 48, 8192, -64, 24, 4095])
def test_bad_unit_refused(unit: int) -> None:
    for make in (check_unit, XtsEngine, XtsPool,
                 lambda u: xts_encrypt(SECRET, bytes(64), 0, unit=u),
                 lambda u: xts_decrypt(SECRET, bytes(64), 0, unit=u)):
        with pytest.raises(CryptoError) as info:
            make(unit)
        message = str(info.value)
        assert str(unit) in message and "power of two" in message
        assert_no_key(message, SECRET)


@pytest.mark.parametrize("unit", UNITS)
def test_good_units_accepted(unit: int) -> None:
    assert check_unit(unit) == unit
    assert XtsEngine(unit).unit == unit


@pytest.mark.parametrize("size", [0, 16, 24, 31, 33, 48, 63, 65, 96, 128])
def test_bad_key_length_refused(size: int) -> None:
    key = (SECRET * 4)[:size]
    for make in (XtsKey, lambda k: xts_encrypt(k, bytes(64), 0), lambda k: xts_decrypt(k, bytes(64), 0)):
        with pytest.raises(CryptoError) as info:
            make(key)
        message = str(info.value)
        assert "32 or 64" in message and str(size) in message
        assert_no_key(message, key)


@pytest.mark.parametrize("half", [16, 32])
def test_equal_halves_refused(half: int) -> None:
    key = SECRET[:half] * 2
    for make in (XtsKey, lambda k: xts_encrypt(k, bytes(64), 0)):
        with pytest.raises(CryptoError) as info:
            make(key)
        assert "differ" in str(info.value)
        assert_no_key(str(info.value), key)


def test_halves_differing_in_one_bit_accepted() -> None:
    key = bytearray(SECRET[:16] * 2)
    key[31] ^= 0x80
    assert XtsKey(bytes(key)).bits == 128


@pytest.mark.parametrize("length", [1, 15, 16, 63, 65, 100, 64 * 9 + 32])
def test_length_not_whole_units_refused(length: int) -> None:
    key = XtsKey(SECRET)
    data = bytes(length)
    calls = [lambda: xts_encrypt(key, data, 0), lambda: xts_decrypt(SECRET, data, 0),
             lambda: XtsEngine(64).encrypt_into(key, data, bytearray(length), 0),
             lambda: XtsEngine(64).decrypt_into(key, data, bytearray(length), 0)]
    pool = XtsPool(64, workers=2)
    calls += [lambda: pool.encrypt_into(key, data, bytearray(length), 0),
              lambda: pool.decrypt_into(key, data, bytearray(length), 0)]
    try:
        for call in calls:
            with pytest.raises(CryptoError) as info:
                call()
            message = str(info.value)
            assert str(length) in message and "64" in message, message
            assert_no_key(message, SECRET)
    finally:
        pool.close()


@pytest.mark.parametrize(("src_len", "dst_len"), [(128, 64), (64, 128), (64, 0)])
def test_src_dst_length_mismatch_refused(src_len: int, dst_len: int) -> None:
    key = XtsKey(SECRET)
    src, dst = bytes(src_len), bytearray(dst_len)
    pool = XtsPool(64, workers=2)
    try:
        for target in (XtsEngine(64), pool):
            for call in (target.encrypt_into, target.decrypt_into):
                with pytest.raises(CryptoError) as info:
                    call(key, src, dst, 0)
                message = str(info.value)
                assert str(src_len) in message and str(dst_len) in message, message
                assert_no_key(message, SECRET)
                assert dst == bytearray(dst_len)
    finally:
        pool.close()


@pytest.mark.parametrize("size", [32, 64])
def test_key_repr_shows_no_key(size: int) -> None:
    raw = SECRET64[:size]
    key = XtsKey(raw)
    assert key.bits == size * 4
    for text in (repr(key), str(key), f"{key!r:>200}", repr([key])):
        assert_no_key(text, raw)
    assert str(size * 4) in repr(key)


def test_key_from_bytearray_is_a_copy() -> None:
    """Changing (or zeroing) the caller's buffer afterwards does not change the key."""
    rng = random.Random("copy")
    raw = bytearray(random_key(rng, 32))
    key = XtsKey(raw)
    expected = reference_xts(bytes(raw), bytes(64), 0, 64)
    raw[:] = bytes(32)
    assert xts_encrypt(key, bytes(64), 0) == expected


def _raw(key: XtsKey) -> bytes:
    """Recover the raw key bytes for the reference (test-only peek at the private copy)."""
    return bytes(key._key)


def test_importing_the_engine_starts_no_blas_threads() -> None:
    """numpy's OpenBLAS would start a thread per core that spins for 0.1 s of CPU;
    the package turns it off before numpy loads (we call no BLAS routine)."""
    count_threads = "import os, mktme_emu.crypto; print(len(os.listdir('/proc/self/task')))"
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", count_threads], env=env, capture_output=True,
                         text=True, check=True, timeout=60).stdout
    assert out.strip() == "1"
