"""Batched AES-XTS (IEEE 1619) over many data units, each with its own tweak.

This is the memory controller's cipher.  A region is a run of data units of
``unit`` bytes (a power of two, 16 .. 4096); unit *i* of a region whose tweak
base is *T* uses the tweak ``T + i * unit``, a 128-bit little-endian integer.
Because every tweak mode of SPEC section 3 makes the tweak "an address of the
unit", one routine serves them all.

Why our own XTS loop and not ``modes.XTS`` from ``cryptography``: that API
takes one tweak per call, and one call per 64-byte unit runs at ~18 MB/s.
Here OpenSSL (through ``cryptography``) does the AES work as two large ECB
passes, and numpy does the GF(2^128) tweak multiplications and the XORs on
whole arrays, chunk by chunk, in preallocated buffers; no Python runs per
unit.  Units are whole multiples of the AES block, so XTS ciphertext stealing
never applies.

Public API (all functions are pure and thread-compatible; an :class:`XtsKey`
may be shared, an :class:`XtsEngine` belongs to one thread):

- :func:`xts_encrypt` / :func:`xts_decrypt`: bytes in, bytes out.
- :class:`XtsKey`: a validated key (data key || tweak key) whose repr never
  shows key material.
- :class:`XtsEngine`: the reusable engine, with ``encrypt_into`` /
  ``decrypt_into`` working in place on writable buffers (mmap, bytearray).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

from .errors import CryptoError

try:  # the compiled block loops (emulator/_blockxor.c); numpy does the same where it is not built
    from . import _blockxor
except ImportError:  # pragma: no cover - only without a C compiler at install time
    _blockxor = None  # type: ignore[assignment]

COMPILED = _blockxor is not None

BLOCK = 16
MIN_UNIT = 16
MAX_UNIT = 4096
DEFAULT_UNIT = 64
_MASK64 = (1 << 64) - 1
_MASK128 = (1 << 128) - 1
# Parallel work is split in pieces of at least this size, so that thread
# hand-off costs stay small next to the encryption itself.
PARALLEL_MIN = 2 * 1024 * 1024
# Without the compiled loops, below this unit size the numpy calls per byte
# are many and short, the GIL they need serialises the workers, and two
# threads ran slower than one (64-byte units: 1.1 vs 1.5 GB/s); 4096-byte
# units gain (1.4 vs 1.0 GB/s).  The compiled loops release the GIL: two
# threads gain at every unit size (64-byte units: 3.6 vs 2.1 GB/s).
PARALLEL_MIN_UNIT = 1024


def threads_gain(unit: int, compiled: bool = COMPILED) -> bool:
    """Do several threads running engines of this unit size beat one?"""
    return compiled or unit >= PARALLEL_MIN_UNIT


def default_chunk(unit: int) -> int:
    """Bytes per round, for any unit size.

    Measured on the 2-core CI machine, 64-byte units: 256K 1.48, 512K 1.58,
    1M 1.68 GB/s. Below that numpy's per-call cost dominates; the buffers of
    one round (a few MiB) still stay in the last-level cache.
    """
    return 1024 * 1024


# x^128 = x^7 + x^2 + x + 1 in the XTS field: bits a left shift pushes out of
# the top come back in shifted by 0, 1, 2 and 7.  A shift of up to 57 bits
# keeps the folded-back bits inside the low word.
_FOLD_SHIFTS = (np.uint64(1), np.uint64(2), np.uint64(7))
_MAX_SHIFT = 57


def fold_blocks(data: np.ndarray, span: int, compiled: bool = COMPILED) -> np.ndarray:
    """(spans, 2) uint64: row ``k`` is the XOR of the 16-byte blocks of span ``k``
    of ``data`` (contiguous uint64, a whole number of ``span``-byte spans;
    ``span`` a multiple of 256 bytes).

    One compiled pass, or two numpy reductions (``compiled=False``, or when
    the compiled loops are not built): first 16 long rows into one, which is
    seven times faster than reducing the 16-byte pairs directly.
    """
    spans = data.size * 8 // span
    assert span % 256 == 0 and spans * span == data.size * 8
    if compiled and COMPILED:
        out = np.empty((spans, 2), np.uint64)
        _blockxor.fold_blocks(data.data, out.data, span)
        return out
    words = span // 8
    halves = np.bitwise_xor.reduce(data.reshape(spans, 16, words // 16), axis=1)
    return np.bitwise_xor.reduce(halves.reshape(spans, words // 32, 2), axis=1)


def check_unit(unit: int) -> int:
    """Return ``unit`` if it is a valid data-unit size, else raise CryptoError."""
    if not (MIN_UNIT <= unit <= MAX_UNIT) or unit & (unit - 1):
        raise CryptoError(f"data unit must be a power of two from {MIN_UNIT} to {MAX_UNIT}, got {unit}")
    return unit


class _Contexts(NamedTuple):
    data_enc: CipherContext
    data_dec: CipherContext
    tweak_enc: CipherContext


class XtsKey:
    """An AES-XTS key: data key followed by tweak key (32 or 64 bytes).

    OpenSSL contexts (ECB, never finalised, so reusable) are built lazily,
    one set per thread: ``cryptography`` releases the GIL while it encrypts,
    and a context may not be used by two threads at once.  Equal halves are
    refused, as IEEE 1619-2018 requires.  :meth:`wipe` zeroes the copy of
    the key this object holds in place and drops every context; a wiped key
    raises CryptoError instead of ever building an all-zero cipher.  The
    repr never shows key material.
    """

    __slots__ = ("_key", "_local", "_wiped", "bits")

    def __init__(self, key: bytes | bytearray) -> None:
        if len(key) not in (32, 64):
            raise CryptoError(f"XTS key must be 32 or 64 bytes (data key || tweak key), got {len(key)}")
        half = len(key) // 2
        if key[:half] == key[half:]:
            raise CryptoError("XTS data key and tweak key must differ")
        self.bits = half * 8
        self._key = bytearray(key)
        self._local = threading.local()
        self._wiped = False

    def contexts(self) -> _Contexts:
        """This thread's OpenSSL contexts for the key (built on first use).

        Raises CryptoError once the key is wiped.
        """
        if self._wiped:
            raise CryptoError("this XTS key was wiped; it can no longer encrypt or decrypt")
        ctx: _Contexts | None = getattr(self._local, "ctx", None)
        if ctx is None:
            half = len(self._key) // 2
            data_key, tweak_key = bytes(self._key[:half]), bytes(self._key[half:])
            ctx = _Contexts(_ecb(data_key).encryptor(), _ecb(data_key).decryptor(),
                            _ecb(tweak_key).encryptor())
            self._local.ctx = ctx
        return ctx

    def wipe(self) -> None:
        """Zero the held key bytes in place and forget every thread's contexts."""
        self._wiped = True
        self._key[:] = bytes(len(self._key))
        self._local = threading.local()

    @property
    def wiped(self) -> bool:
        return self._wiped

    def __repr__(self) -> str:
        return f"<XtsKey AES-XTS-{self.bits}>"


def _ecb(key: bytes) -> Cipher[modes.ECB]:
    return Cipher(algorithms.AES(key), modes.ECB())


@dataclass(frozen=True)
class _Buffers:
    """Preallocated per-engine scratch space for one chunk."""

    steps: np.ndarray  # unit index * unit, as uint64
    tweak_in: np.ndarray  # (n, 2) uint64: tweak values before encryption
    tweak_out: bytearray  # ECB output for n blocks (+15 slack update_into wants)
    lo: np.ndarray  # (B, n) uint64: low halves of the per-block tweaks, block-major
    hi: np.ndarray  # (B, n) uint64: high halves
    scratch: np.ndarray  # (n * B,) uint64 temporaries
    scratch2: np.ndarray
    tweaks: np.ndarray  # (n, B, 2) uint64 interleaved tweaks, the XOR mask
    work: bytearray  # data XOR tweak, input of the data ECB pass
    ecb_out: bytearray  # output of the data ECB pass (+15 slack)


class XtsEngine:
    """Batched XTS for one unit size, with its own preallocated buffers.

    Not thread-safe (the buffers are per engine); cheap to create one per
    thread.  ``chunk`` bytes are processed per round.
    """

    def __init__(self, unit: int = DEFAULT_UNIT, chunk: int | None = None,
                 compiled: bool = COMPILED) -> None:
        self.unit = check_unit(unit)
        chunk = default_chunk(unit) if chunk is None else chunk
        self.chunk = max(chunk - chunk % unit, unit)
        if compiled and not COMPILED:
            raise CryptoError("the compiled block loops (mktme_emu._blockxor) are not built")
        self.compiled = compiled
        self._buf = self._allocate(self.chunk // unit, masks=not compiled)

    def _allocate(self, n: int, masks: bool) -> _Buffers:
        """Buffers for n units; the numpy mask's own (``masks``) only when it is used."""
        blocks = self.unit // BLOCK
        m = n if masks else 0
        return _Buffers(
            steps=np.arange(n, dtype=np.uint64) * np.uint64(self.unit),
            tweak_in=np.zeros((n, 2), dtype=np.uint64),
            tweak_out=bytearray(n * BLOCK + BLOCK - 1),
            lo=np.zeros((blocks, m), dtype=np.uint64),
            hi=np.zeros((blocks, m), dtype=np.uint64),
            scratch=np.zeros(m * blocks, dtype=np.uint64),
            scratch2=np.zeros(m * blocks, dtype=np.uint64),
            tweaks=np.zeros((m, blocks, 2), dtype=np.uint64),
            work=bytearray(n * self.unit),
            ecb_out=bytearray(n * self.unit + BLOCK - 1),
        )

    def encrypt_into(self, key: XtsKey, src: memoryview | bytes | bytearray,
                     dst: memoryview | bytearray, tweak_base: int) -> None:
        """Encrypt ``src`` into ``dst`` (same length, may be the same buffer).

        ``tweak_base`` is the tweak of the first unit; later units add
        ``unit`` each.  Raises CryptoError if the length is not a whole
        number of units.  Does not block on anything but the CPU.
        """
        self._crypt(key.contexts().data_enc.update_into, key, src, dst, tweak_base)

    def decrypt_into(self, key: XtsKey, src: memoryview | bytes | bytearray,
                     dst: memoryview | bytearray, tweak_base: int) -> None:
        """Decrypt ``src`` into ``dst``; the inverse of :meth:`encrypt_into`."""
        self._crypt(key.contexts().data_dec.update_into, key, src, dst, tweak_base)

    def _crypt(self, ecb: Callable[[bytes | bytearray | memoryview, bytearray], int],
               key: XtsKey, src: memoryview | bytes | bytearray,
               dst: memoryview | bytearray, tweak_base: int) -> None:
        src_view, dst_view = memoryview(src).cast("B"), memoryview(dst).cast("B")
        length = len(src_view)
        if len(dst_view) != length:
            raise CryptoError(f"source and destination differ in length ({length} != {len(dst_view)})")
        if length % self.unit:
            raise CryptoError(f"length {length} is not a multiple of the {self.unit}-byte data unit")
        for start in range(0, length, self.chunk):
            end = min(start + self.chunk, length)
            self._crypt_chunk(ecb, key, src_view[start:end], dst_view[start:end],
                              (tweak_base + start) & _MASK128)

    def _crypt_chunk(self, ecb: Callable[[bytes | bytearray | memoryview, bytearray], int],
                     key: XtsKey, src: memoryview, dst: memoryview, tweak_base: int) -> None:
        """XTS of one chunk: mask, AES-ECB, mask again (the mask of block j of
        unit i is E_tweakkey(T_i) * alpha^j)."""
        b = self._buf
        size = len(src)
        n = size // self.unit
        first = self._encrypted_tweaks(key, n, tweak_base)
        if not self.compiled:
            self._crypt_chunk_numpy(ecb, first, src, dst)
            return
        first_bytes = memoryview(b.tweak_out)[:n * BLOCK]
        work = memoryview(b.work)[:size]
        _blockxor.xor_tweaks(first_bytes, src, work, self.unit)
        ecb(work, b.ecb_out)
        _blockxor.xor_tweaks(first_bytes, memoryview(b.ecb_out)[:size], dst, self.unit)

    def _crypt_chunk_numpy(self, ecb: Callable[[bytes | bytearray | memoryview, bytearray], int],
                           first: np.ndarray, src: memoryview, dst: memoryview) -> None:
        """The same with the mask built by whole-array numpy passes (no compiled loops)."""
        b = self._buf
        size = len(src)
        words = size // 8
        tweaks = self._tweaks(first).reshape(-1)[:words]
        data = np.frombuffer(src, dtype=np.uint64)
        work = np.frombuffer(b.work, dtype=np.uint64)[:words]
        np.bitwise_xor(data, tweaks, out=work)
        ecb(memoryview(b.work)[:size], b.ecb_out)
        out = np.frombuffer(b.ecb_out, dtype=np.uint64, count=words)
        np.bitwise_xor(out, tweaks, out=np.frombuffer(dst, dtype=np.uint64))

    def _encrypted_tweaks(self, key: XtsKey, n: int, tweak_base: int) -> np.ndarray:
        """(n, 2) uint64: E_tweakkey(T_i) for the n units from ``tweak_base``
        (also left as bytes at the start of the buffer ``tweak_out``)."""
        b = self._buf
        base_lo, base_hi = tweak_base & _MASK64, tweak_base >> 64
        tin = b.tweak_in[:n]
        lo_col, hi_col = tin[:, 0], tin[:, 1]
        np.add(b.steps[:n], np.uint64(base_lo), out=lo_col)
        # A carry out of the low half happened where the sum wrapped around.
        np.less(lo_col, np.uint64(base_lo), out=hi_col, casting="unsafe")
        np.add(hi_col, np.uint64(base_hi), out=hi_col)
        key.contexts().tweak_enc.update_into(tin.data.cast("B"), b.tweak_out)
        return np.frombuffer(b.tweak_out, dtype=np.uint64, count=2 * n).reshape(n, 2)

    def _tweaks(self, first: np.ndarray) -> np.ndarray:
        """The XOR mask for n units: ``first[i]`` * alpha^j for block j of unit i.

        The multiplications run on block-major arrays (block j of every unit
        is contiguous), so each numpy call works on long contiguous runs;
        the result is then laid out unit-major to match the data.
        """
        b = self._buf
        n = len(first)
        blocks = self.unit // BLOCK
        lo, hi = b.lo[:, :n], b.hi[:, :n]
        lo[0], hi[0] = first[:, 0], first[:, 1]
        done = 1
        while done < blocks:
            # Double the known blocks while a single shift-and-fold can; past
            # 64 blocks, extend 64 at a time from the previous 64 (x^64 is one
            # step, x^128 would be two).
            step = min(done, 64)
            self._mul_alpha_pow(lo[done - step:done], hi[done - step:done], step,
                                lo[done:done + step], hi[done:done + step])
            done += step
        return self._unit_major(lo, hi, n)

    def _unit_major(self, lo: np.ndarray, hi: np.ndarray, n: int) -> np.ndarray:
        """Interleave block-major (lo, hi) into the data's (unit, block, half) order."""
        tweaks = self._buf.tweaks[:n]
        if lo.shape[0] <= 16:  # few blocks: one long strided copy per block is fastest
            for j in range(lo.shape[0]):
                tweaks[:, j, 0], tweaks[:, j, 1] = lo[j], hi[j]
        else:
            tweaks[:, :, 0], tweaks[:, :, 1] = lo.T, hi.T
        return tweaks

    def _mul_alpha_pow(self, lo: np.ndarray, hi: np.ndarray, power: int,
                       out_lo: np.ndarray, out_hi: np.ndarray) -> None:
        """out = (lo, hi) * alpha^power in GF(2^128), XTS bit order.

        Multiplying by alpha is a one-bit left shift of the 128-bit
        little-endian tweak, with x^128 folded back as x^7 + x^2 + x + 1
        (0x87).  Shifts up to 57 bits fold in one step; 64 has its own step.
        """
        if power <= _MAX_SHIFT:
            self._shift_reduce(lo, hi, power, out_lo, out_hi)
            return
        for _ in range(power // 64):
            self._shift64_reduce(lo, hi, out_lo, out_hi)
            lo, hi = out_lo, out_hi

    def _scratch(self, like: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        count = like.size
        return (self._buf.scratch[:count].reshape(like.shape),
                self._buf.scratch2[:count].reshape(like.shape))

    def _shift_reduce(self, lo: np.ndarray, hi: np.ndarray, shift: int,
                      out_lo: np.ndarray, out_hi: np.ndarray) -> None:
        """Multiply by x^shift for shift <= 57: the folded bits still fit one word."""
        top, tmp = self._scratch(lo)
        s, back = np.uint64(shift), np.uint64(64 - shift)
        np.right_shift(hi, back, out=top)
        np.right_shift(lo, back, out=tmp)
        np.left_shift(hi, s, out=out_hi)
        np.bitwise_or(out_hi, tmp, out=out_hi)
        np.left_shift(lo, s, out=out_lo)
        np.bitwise_xor(out_lo, top, out=out_lo)
        for fold in _FOLD_SHIFTS:
            np.left_shift(top, fold, out=tmp)
            np.bitwise_xor(out_lo, tmp, out=out_lo)

    def _shift64_reduce(self, lo: np.ndarray, hi: np.ndarray,
                        out_lo: np.ndarray, out_hi: np.ndarray) -> None:
        """Multiply by x^64: the high word folds back as a 71-bit product."""
        top, tmp = self._scratch(lo)
        np.copyto(top, hi)
        np.copyto(out_hi, lo)
        np.copyto(out_lo, top)
        for fold in _FOLD_SHIFTS:
            np.left_shift(top, fold, out=tmp)
            np.bitwise_xor(out_lo, tmp, out=out_lo)
            np.right_shift(top, np.uint64(64) - fold, out=tmp)
            np.bitwise_xor(out_hi, tmp, out=out_hi)


class XtsPool:
    """XTS over large ranges on every core: one engine per worker thread.

    A range of at least ``2 * PARALLEL_MIN`` bytes is cut at unit boundaries
    into one piece per worker (with the numpy mask, ``compiled=False``, only
    for units of at least ``PARALLEL_MIN_UNIT`` bytes); anything else runs on
    the caller's thread.  Blocks until the whole range is done.  The pool is
    thread-safe as long as concurrent calls do not overlap in ``dst``.
    """

    def __init__(self, unit: int = DEFAULT_UNIT, workers: int | None = None,
                 compiled: bool = COMPILED) -> None:
        self.unit = check_unit(unit)
        self.compiled = compiled
        self.workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
        self._local = threading.local()
        self._executor = (ThreadPoolExecutor(self.workers, thread_name_prefix="xts")
                          if self.workers > 1 else None)

    def _engine(self) -> XtsEngine:
        engine: XtsEngine | None = getattr(self._local, "engine", None)
        if engine is None:
            engine = self._local.engine = XtsEngine(self.unit, compiled=self.compiled)
        return engine

    def encrypt_into(self, key: XtsKey, src: memoryview | bytes | bytearray,
                     dst: memoryview | bytearray, tweak_base: int) -> None:
        """Encrypt ``src`` into ``dst``; see :meth:`XtsEngine.encrypt_into`."""
        self._run(True, key, memoryview(src).cast("B"), memoryview(dst).cast("B"), tweak_base)

    def decrypt_into(self, key: XtsKey, src: memoryview | bytes | bytearray,
                     dst: memoryview | bytearray, tweak_base: int) -> None:
        """Decrypt ``src`` into ``dst``; see :meth:`XtsEngine.decrypt_into`."""
        self._run(False, key, memoryview(src).cast("B"), memoryview(dst).cast("B"), tweak_base)

    def _run(self, encrypt: bool, key: XtsKey, src: memoryview, dst: memoryview,
             tweak_base: int) -> None:
        def piece(start: int, end: int) -> None:
            engine = self._engine()
            crypt = engine.encrypt_into if encrypt else engine.decrypt_into
            crypt(key, src[start:end], dst[start:end], (tweak_base + start) & _MASK128)

        length = len(src)
        if len(dst) != length or length % self.unit:
            raise CryptoError(f"bad XTS range: {length} bytes in, {len(dst)} out, "
                              f"{self.unit}-byte units")
        if (self._executor is None or not threads_gain(self.unit, self.compiled)
                or length < 2 * PARALLEL_MIN):
            piece(0, length)
            return
        step = -(-length // self.workers)
        step += -step % self.unit
        futures = [self._executor.submit(piece, start, min(start + step, length))
                   for start in range(0, length, step)]
        for future in futures:
            future.result()

    def close(self) -> None:
        """Stop the worker threads."""
        if self._executor is not None:
            self._executor.shutdown()


def _engine_for(unit: int) -> XtsEngine:
    return XtsEngine(unit)


def _as_key(key: bytes | XtsKey) -> XtsKey:
    return key if isinstance(key, XtsKey) else XtsKey(key)


def xts_encrypt(key: bytes | XtsKey, plaintext: bytes, tweak_base: int,
                unit: int = DEFAULT_UNIT) -> bytes:
    """Encrypt ``plaintext`` as consecutive ``unit``-byte data units.

    Unit *i* uses tweak ``tweak_base + i * unit`` (128-bit little-endian).
    ``key`` is data key || tweak key (32 bytes for AES-XTS-128, 64 for
    AES-XTS-256).  Raises CryptoError for a bad key, unit or length.
    """
    out = bytearray(len(plaintext))
    _engine_for(unit).encrypt_into(_as_key(key), plaintext, out, tweak_base)
    return bytes(out)


def xts_decrypt(key: bytes | XtsKey, ciphertext: bytes, tweak_base: int,
                unit: int = DEFAULT_UNIT) -> bytes:
    """Decrypt what :func:`xts_encrypt` produced with the same key, tweak base and unit."""
    out = bytearray(len(ciphertext))
    _engine_for(unit).decrypt_into(_as_key(key), ciphertext, out, tweak_base)
    return bytes(out)
