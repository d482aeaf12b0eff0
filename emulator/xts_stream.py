"""Streaming XTS: any amount of data from one file to another in constant memory.

Part of the crypto layer's public API (it builds only on :mod:`.crypto`):
:func:`xts_stream` is what ``mktme-emu xts`` runs, for users' own tests that
compute expected ciphertext of inputs larger than memory.

Memory: at most 8 MiB of buffers plus the engines' scratch space (about
5 MiB per engine), whatever the input size.  Throughput: a reader thread
fills the next buffer and a writer thread drains the previous one while the
caller's thread encrypts (file I/O releases the GIL), so the stream runs
close to the engine's own speed instead of adding the copies.
"""

from __future__ import annotations

import enum
import queue
import threading
from collections.abc import Callable
from typing import Protocol

from .crypto import DEFAULT_UNIT, PARALLEL_MIN, XtsEngine, XtsKey, XtsPool, check_unit
from .errors import CryptoError

_MASK128 = (1 << 128) - 1


def stream_plan(pool: XtsPool) -> tuple[int, int]:
    """(chunk bytes, buffers) for a stream: 8 MiB of buffers at most.

    Where the pool splits a chunk over several cores, a chunk must be at
    least two pool pieces (4 MiB), and two buffers leave the cores to the
    cipher; otherwise three 2 MiB buffers let reading, encrypting and
    writing run at once on one core each.
    """
    if pool.splits:
        return 2 * PARALLEL_MIN, 2
    return PARALLEL_MIN, 3


class Source(Protocol):
    """What the stream reads from: a file opened in binary mode (raw or buffered), BytesIO."""

    def readinto(self, buffer: memoryview, /) -> int | None: ...


class Sink(Protocol):
    """What the stream writes to: a file opened in binary mode, BytesIO."""

    def write(self, data: memoryview, /) -> int | None: ...


class TweakStep(enum.Enum):
    """How the tweak advances from one data unit to the next.

    ``address``: unit i uses ``tweak_base + i * unit`` (an address of the
    unit: the spa, dpa and logical modes of the controller).  ``dun``: unit i
    uses ``tweak_base + i`` (a data unit number, as fscrypt's IV_INO_LBLK_64
    with 4096-byte units).
    """

    ADDRESS = "address"
    DUN = "dun"


class _Crypt:
    """Encrypt or decrypt whole units in place at a given unit index."""

    def __init__(self, key: XtsKey, unit: int, encrypt: bool, step: TweakStep,
                 workers: int | None) -> None:
        self.key, self.unit, self.step = key, unit, step
        self.pool = XtsPool(unit, workers)
        self.engine: XtsEngine | None = None  # only the dun step needs one of its own
        self.encrypt = encrypt

    def run(self, data: memoryview, first_unit: int, tweak_base: int) -> None:
        if self.step is TweakStep.ADDRESS:
            crypt = self.pool.encrypt_into if self.encrypt else self.pool.decrypt_into
            crypt(self.key, data, data, (tweak_base + first_unit * self.unit) & _MASK128)
            return
        # A tweak per unit number: the engine's tweaks step by the unit size,
        # so each unit is its own call (about 100 MB/s at 4096-byte units).
        if self.engine is None:
            self.engine = XtsEngine(self.unit)
        one = self.engine.encrypt_into if self.encrypt else self.engine.decrypt_into
        for i in range(len(data) // self.unit):
            piece = data[i * self.unit:(i + 1) * self.unit]
            one(self.key, piece, piece, (tweak_base + first_unit + i) & _MASK128)

    def close(self) -> None:
        self.pool.close()


def xts_stream(key: XtsKey, src: Source, dst: Sink, tweak_base: int, *,
               encrypt: bool = True, unit: int = DEFAULT_UNIT,
               tweak_step: TweakStep = TweakStep.ADDRESS, workers: int | None = None) -> int:
    """Encrypt (or decrypt) everything ``src`` holds into ``dst``; the byte count.

    ``src`` needs ``readinto`` and ``dst`` ``write`` (raw or buffered files,
    pipes, BytesIO).  The input must be a whole number of units: a partial
    last unit raises CryptoError after every whole unit before it was
    written.  Blocks on both files; raises OSError from them.
    """
    check_unit(unit)
    crypt = _Crypt(key, unit, encrypt, tweak_step, workers)
    chunk, depth = stream_plan(crypt.pool)
    try:
        return _pipeline(src, dst, (chunk, depth),
                         lambda data, done: crypt.run(data, done // unit, tweak_base), unit)
    finally:
        crypt.close()


def _pipeline(src: Source, dst: Sink, plan: tuple[int, int],
              work: Callable[[memoryview, int], None], unit: int) -> int:
    """Read, work and write chunks with the I/O in two threads; the total byte count."""
    chunk, depth = plan
    free: queue.Queue[bytearray] = queue.Queue()
    for _ in range(depth):
        free.put(bytearray(chunk))
    filled: queue.Queue[tuple[bytearray, int] | BaseException | None] = queue.Queue(depth + 1)
    done: queue.Queue[tuple[bytearray, int] | None] = queue.Queue(depth + 2)
    writer_error: list[BaseException] = []
    reader = threading.Thread(target=_read_loop, args=(src, free, filled), daemon=True)
    writer = threading.Thread(target=_write_loop, args=(dst, done, free, writer_error), daemon=True)
    reader.start()
    writer.start()
    total = 0
    try:
        while not writer_error:
            item = filled.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            buffer, length = item
            whole = length - length % unit
            work(memoryview(buffer)[:whole], total)
            done.put((buffer, whole))
            total += whole
            if whole != length:
                done.put(None)
                writer.join()
                raise CryptoError(f"the input ends with {length - whole} bytes, not a whole "
                                  f"{unit}-byte data unit ({total} bytes before it were written)")
    finally:
        done.put(None)
        writer.join()
        free.put(bytearray(0))  # wakes a reader waiting for a buffer after an error
    if writer_error:
        raise writer_error[0]
    return total


def _read_loop(src: Source, free: queue.Queue[bytearray],
               filled: queue.Queue[tuple[bytearray, int] | BaseException | None]) -> None:
    """Fill free buffers completely (or up to end of input) and pass them on."""
    try:
        while True:
            buffer = free.get()
            if not buffer:
                return
            view = memoryview(buffer)
            got = 0
            while got < len(buffer):
                n = src.readinto(view[got:])
                if not n:
                    break
                got += n
            if got:
                filled.put((buffer, got))
            if got < len(buffer):
                filled.put(None)
                return
    except BaseException as exc:  # handed to the caller's thread, which raises it
        filled.put(exc)


def _write_loop(dst: Sink, done: queue.Queue[tuple[bytearray, int] | None],
                free: queue.Queue[bytearray], error: list[BaseException]) -> None:
    """Write finished buffers in order and return them to the free list."""
    while True:
        item = done.get()
        if item is None:
            return
        buffer, length = item
        if not error:
            try:
                _write_all(dst, memoryview(buffer)[:length])
            except BaseException as exc:  # reported by the caller's thread
                error.append(exc)
        free.put(buffer)


def _write_all(dst: Sink, data: memoryview) -> None:
    while data:
        n = dst.write(data)
        if n is None:  # a non-blocking file that is full: not supported
            raise OSError("the output would block")
        data = data[n:]
