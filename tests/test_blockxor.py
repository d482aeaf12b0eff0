"""The compiled block loops (emulator/_blockxor.c) against numpy models of the same sums.

They carry no key, but every ciphertext and every flush digest passes
through them: each loop is checked against an independent numpy version on
random inputs (bounded fuzzing), bad arguments must raise, never crash, and
the chunk digest must be the same with either way of folding.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
from mktme_emu import crypto
from mktme_emu.controller.digest import CHUNK_BYTES, ChunkDigests

_blockxor = crypto._blockxor
MASK64 = (1 << 64) - 1
needs_loops = pytest.mark.skipif(not crypto.COMPILED, reason="mktme_emu._blockxor is not built")


def model_xor_tweaks(first: bytes, src: bytes, unit: int) -> bytes:
    """src XOR (first[i] * alpha^j) for block j of unit i, with Python integers."""
    out = bytearray(len(src))
    for i in range(len(src) // unit):
        tweak = int.from_bytes(first[16 * i:16 * i + 16], "little")
        for j in range(unit // 16):
            at = i * unit + 16 * j
            block = int.from_bytes(src[at:at + 16], "little") ^ tweak
            out[at:at + 16] = block.to_bytes(16, "little")
            tweak = ((tweak << 1) & ((1 << 128) - 1)) ^ (0x87 if tweak >> 127 else 0)
    return bytes(out)


def test_the_compiled_loops_are_built() -> None:
    """`make setup` compiles them (gcc and python3-dev are among its apt packages);
    without them every flush would run on the numpy fallback at about half the speed.
    The other tests here need them; this one says when they are missing."""
    assert crypto.COMPILED, "mktme_emu._blockxor is not built: see `make setup`'s output"


@needs_loops
@pytest.mark.parametrize("unit", [16, 32, 64, 128, 512, 4096])
def test_xor_tweaks_matches_the_model(unit: int) -> None:
    rng = random.Random(f"xor-tweaks-{unit}")
    for _ in range(12):
        units = rng.randint(1, max(1, 8192 // unit))
        # Tweaks with the top bit set (the fold) and all-ones words (the carry between halves).
        first = b"".join(rng.choice([rng.randbytes(16), b"\xff" * 16, (1 << 127).to_bytes(16, "little")])
                         for _ in range(units))
        src = rng.randbytes(units * unit)
        dst = bytearray(len(src))
        _blockxor.xor_tweaks(first, src, dst, unit)
        assert bytes(dst) == model_xor_tweaks(first, src, unit)
        in_place = bytearray(src)
        _blockxor.xor_tweaks(first, in_place, in_place, unit)
        assert in_place == dst


@needs_loops
def test_fold_blocks_matches_numpy() -> None:
    rng = np.random.default_rng(7)
    for span in (32, 4096, CHUNK_BYTES):
        spans = int(rng.integers(1, 9))
        data = rng.integers(0, MASK64, size=spans * span // 8, dtype=np.uint64, endpoint=True)
        out = np.zeros((spans, 2), np.uint64)
        _blockxor.fold_blocks(data, out, span)
        expected = np.bitwise_xor.reduce(data.reshape(spans, span // 16, 2), axis=1)
        assert (out == expected).all()


@needs_loops
@pytest.mark.parametrize(("first_len", "src_len", "dst_len", "unit"), [
    (64, 256, 256, 0), (64, 256, 256, -64), (64, 256, 256, 24), (64, 250, 250, 64),
    (64, 256, 128, 64), (48, 256, 256, 64),
])
def test_xor_tweaks_refuses_bad_shapes(first_len: int, src_len: int, dst_len: int, unit: int) -> None:
    dst = bytearray(dst_len)
    with pytest.raises(ValueError):
        _blockxor.xor_tweaks(bytes(first_len), bytes(src_len), dst, unit)
    assert dst == bytearray(dst_len)  # nothing written


@needs_loops
def test_block_loops_refuse_a_read_only_destination() -> None:
    with pytest.raises(TypeError):
        _blockxor.xor_tweaks(bytes(16), bytes(64), bytes(64), 64)
    with pytest.raises(TypeError):
        _blockxor.fold_blocks(bytes(64), bytes(32), 32)


@needs_loops
@pytest.mark.parametrize(("data_len", "out_len", "span"),
                         [(64, 32, 0), (64, 32, 48), (96, 48, 64), (128, 16, 32)])
def test_fold_blocks_refuses_bad_shapes(data_len: int, out_len: int, span: int) -> None:
    with pytest.raises(ValueError):
        _blockxor.fold_blocks(bytes(data_len), bytearray(out_len), span)


@needs_loops
def test_the_chunk_digest_is_the_same_either_way() -> None:
    key = os.urandom(32)
    compiled, numpy_fold = (ChunkDigests(64 * 16, compiled=True, key=key),
                            ChunkDigests(64 * 16, compiled=False, key=key))
    data = bytearray(os.urandom(4 * CHUNK_BYTES))
    before = compiled.compute(memoryview(data))
    assert (before == numpy_fold.compute(memoryview(data))).all()
    data[CHUNK_BYTES + 100] ^= 1  # one bit of the second chunk
    after = compiled.compute(memoryview(data))
    assert (after == numpy_fold.compute(memoryview(data))).all()
    assert [bool((a == b).all()) for a, b in zip(before, after, strict=True)] == [True, False, True, True]
