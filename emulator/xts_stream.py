"""Streaming XTS: any amount of data from one file to another in constant memory.

Part of the crypto layer's public API (it builds only on :mod:`.crypto`):
:func:`xts_stream` is what ``mktme-emu xts`` runs, for users' own tests that
compute expected ciphertext of inputs larger than memory.

Memory: a chunk of 4 MiB per worker and one more (2 MiB chunks past three
workers), plus each worker's engine scratch (about 2.5 MiB), with at most
four workers, whatever the input size.

Throughput: each worker thread reads the next chunk itself (the input is
sequential, so one read at a time, under a lock), encrypts it in place while
it is still in that core's cache, and hands it to the caller's thread, which
writes the chunks in input order.  Reading and encryption of different
chunks overlap, and no chunk waits on a barrier between cores.  Measured on
two cores (docs/performance.md, "``mktme-emu xts``: streaming"), this beat
a reader thread feeding a pool that split each chunk over the cores by
about 25%: that design paid a thread hand-off per chunk and a cold cache
for every byte.
"""

from __future__ import annotations

import enum
import errno
import os
import queue
import threading
from dataclasses import dataclass, replace
from typing import Protocol

from .crypto import COMPILED, DEFAULT_UNIT, XtsEngine, XtsKey, check_unit, threads_gain
from .errors import CryptoError

_MASK128 = (1 << 128) - 1

# 4 MiB measured best on two cores (the L2 of each is 4 MiB): 1 and 2 MiB
# chunks were 10-20% slower, 8 MiB no faster.
STREAM_CHUNK = 4 << 20
# The buffers' share of the command's 64 MiB: past four workers' worth the
# chunks get smaller, not more numerous.
STREAM_BUFFER_BUDGET = 16 << 20
# More workers than this would only add engines (about 2.5 MiB each): by
# then the input or the output is the limit, not the cipher.
MAX_STREAM_WORKERS = 4


@dataclass(frozen=True)
class StreamPlan:
    """How a stream runs: chunk size and worker threads (buffers follow from them)."""

    chunk: int
    workers: int

    @property
    def buffers(self) -> int:
        """One per worker and one being written (a second spare measured no faster)."""
        return self.workers + 1


def stream_plan(unit: int, workers: int | None = None, compiled: bool = COMPILED) -> StreamPlan:
    """The plan for ``unit``-byte data units on ``workers`` threads (default: every core).

    One worker where threads do not gain (the numpy mask of small units
    needs the GIL); never more than MAX_STREAM_WORKERS; all buffers within
    STREAM_BUFFER_BUDGET.
    """
    cores = workers if workers is not None else (os.cpu_count() or 1)
    if not threads_gain(unit, compiled):
        cores = 1
    plan = StreamPlan(STREAM_CHUNK, max(1, min(cores, MAX_STREAM_WORKERS)))
    while plan.chunk * plan.buffers > STREAM_BUFFER_BUDGET:
        plan = StreamPlan(plan.chunk // 2, plan.workers)
    return plan


class Source(Protocol):
    """What the stream reads from: a file opened in binary mode (raw or buffered), BytesIO."""

    def readinto(self, buffer: memoryview, /) -> int | None: ...


class Sink(Protocol):
    """What the stream writes to: a file opened in binary mode, BytesIO.

    ``write`` must copy what it keeps: the buffer is reused for a later chunk.
    """

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


class _ChunkCrypt:
    """One worker's cipher: whole units of a chunk, in place, at a given byte offset."""

    def __init__(self, key: XtsKey, unit: int, encrypt: bool, step: TweakStep,
                 tweak_base: int) -> None:
        self.key, self.unit, self.step, self.tweak_base = key, unit, step, tweak_base
        self.engine = XtsEngine(unit)
        self.crypt = self.engine.encrypt_into if encrypt else self.engine.decrypt_into

    def __call__(self, data: memoryview, offset: int) -> None:
        if self.step is TweakStep.ADDRESS:
            self.crypt(self.key, data, data, (self.tweak_base + offset) & _MASK128)
            return
        # A tweak per unit number: the engine's tweaks step by the unit size,
        # so each unit is its own call (about 100 MB/s per core at 4096-byte units).
        first = self.tweak_base + offset // self.unit
        for i in range(len(data) // self.unit):
            piece = data[i * self.unit:(i + 1) * self.unit]
            self.crypt(self.key, piece, piece, (first + i) & _MASK128)


def xts_stream(key: XtsKey, src: Source, dst: Sink, tweak_base: int, *,
               encrypt: bool = True, unit: int = DEFAULT_UNIT,
               tweak_step: TweakStep = TweakStep.ADDRESS, workers: int | None = None) -> int:
    """Encrypt (or decrypt) everything ``src`` holds into ``dst``; the byte count.

    ``src`` needs ``readinto`` and ``dst`` ``write`` (raw or buffered files,
    pipes, BytesIO); ``workers`` threads encrypt (default: one per core).
    The input must be a whole number of units: a partial last unit raises
    CryptoError after every whole unit before it was written.  Blocks on
    both files; raises OSError from them.  After an error, a worker blocked
    reading a pipe stays blocked until the pipe gives data or ends, then
    stops without touching ``dst``.
    """
    check_unit(unit)
    plan = stream_plan(unit, workers)
    stream = _Stream(src, plan)
    try:
        for _ in range(plan.workers):
            stream.start_worker(_ChunkCrypt(key, unit, encrypt, tweak_step, tweak_base))
    except BaseException:  # workers already started would wait for buffers forever
        stream.stop(join=False)
        raise
    return stream.write_all(dst, unit)


@dataclass(frozen=True)
class _Chunk:
    """The ``seq``-th chunk of the input: ``length`` bytes, or the error that ended it."""

    seq: int
    buffer: bytearray
    length: int
    error: BaseException | None = None


class _SharedSource:
    """The input, read one whole chunk at a time by whichever worker asks, in order."""

    def __init__(self, src: Source) -> None:
        self._src = src
        self._lock = threading.Lock()
        self._next_seq = 0
        self._ended = False
        self._closed = False

    def read_next(self, buffer: bytearray) -> _Chunk | None:
        """The next chunk, read into ``buffer``; None once the input ended.

        A chunk is full unless it is the last: exactly one read returns
        fewer bytes than the buffer holds (maybe none), or an error, which
        ends the input too.
        """
        with self._lock:
            if self._ended or self._closed:
                return None
            seq, self._next_seq = self._next_seq, self._next_seq + 1
            try:
                length = _read_full(self._src, memoryview(buffer))
            except BaseException as exc:  # raised in order by the caller's thread
                self._ended = True
                return _Chunk(seq, buffer, 0, exc)
            self._ended = length < len(buffer)
            return _Chunk(seq, buffer, length)

    def close(self) -> None:
        """Start no more reads (after an error).  Not under the lock: a worker may
        hold it while blocked reading a pipe."""
        self._closed = True


class _Stream:
    """Worker threads that read and encrypt chunks; the caller's thread writes them in order."""

    def __init__(self, src: Source, plan: StreamPlan) -> None:
        self.plan = plan
        self.source = _SharedSource(src)
        self.free: queue.Queue[bytearray | None] = queue.Queue()
        for _ in range(plan.buffers):
            self.free.put(bytearray(plan.chunk))
        self.finished: queue.Queue[_Chunk] = queue.Queue()
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []

    def start_worker(self, crypt: _ChunkCrypt) -> None:
        thread = threading.Thread(target=self._work, args=(crypt,), daemon=True,
                                  name=f"xts-stream-{len(self.threads)}")
        self.threads.append(thread)
        thread.start()

    def _work(self, crypt: _ChunkCrypt) -> None:
        """Take a free buffer, fill it with the next chunk, encrypt it, pass it on."""
        while True:
            buffer = self.free.get()
            if buffer is None or self.stopping.is_set():
                return
            chunk = self.source.read_next(buffer)
            if chunk is None:
                return
            whole = chunk.length - chunk.length % crypt.unit
            if chunk.error is None and whole:
                try:
                    crypt(memoryview(buffer)[:whole], chunk.seq * self.plan.chunk)
                except BaseException as exc:  # raised in order by the caller's thread
                    chunk = replace(chunk, error=exc)
            self.finished.put(chunk)
            if chunk.error is not None:
                return

    def write_all(self, dst: Sink, unit: int) -> int:
        """Write finished chunks in input order until the last one; the byte count."""
        pending: dict[int, _Chunk] = {}
        next_seq = total = 0
        ended = False
        try:
            while not ended:
                item = self.finished.get()
                pending[item.seq] = item
                while next_seq in pending and not ended:
                    chunk = pending.pop(next_seq)
                    next_seq += 1
                    total += self._write_chunk(dst, chunk, unit, total)
                    ended = chunk.length < self.plan.chunk
        finally:
            self.stop(join=ended)
        return total

    def _write_chunk(self, dst: Sink, chunk: _Chunk, unit: int, before: int) -> int:
        """Write a chunk's whole units and recycle its buffer; the bytes written.

        Raises the error that ended the input (every chunk before it was
        written), or CryptoError after writing a last chunk that ends in
        part of a unit.
        """
        if chunk.error is not None:
            raise chunk.error
        whole = chunk.length - chunk.length % unit
        _write_all(dst, memoryview(chunk.buffer)[:whole])
        self.free.put(chunk.buffer)
        if whole != chunk.length:
            raise CryptoError(f"the input ends with {chunk.length - whole} bytes, not a whole "
                              f"{unit}-byte data unit ({before + whole} bytes before it were "
                              "written)")
        return whole

    def stop(self, join: bool) -> None:
        """Wake every worker waiting for a buffer; wait for them only after a clean end
        (after an error one may be blocked reading a pipe)."""
        self.stopping.set()
        self.source.close()
        for _ in self.threads:
            self.free.put(None)
        if join:
            for thread in self.threads:
                thread.join()


def _read_full(src: Source, view: memoryview) -> int:
    """Read until ``view`` is full or the input ends; the byte count."""
    got = 0
    while got < len(view):
        n = src.readinto(view[got:])
        if n is None:  # a non-blocking file with nothing yet: not supported
            raise OSError(errno.EAGAIN, "the input would block")
        if n == 0:
            break
        got += n
    return got


def _write_all(dst: Sink, data: memoryview) -> None:
    while data:
        n = dst.write(data)
        if n is None:  # a non-blocking file that is full: not supported
            raise OSError(errno.EAGAIN, "the output would block")
        if n == 0:
            raise OSError(errno.ENOSPC, "the output took nothing (write made no progress)")
        data = data[n:]
