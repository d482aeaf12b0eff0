"""XTS throughput of the engine against OpenSSL's own loop for the same unit size."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from mktme_emu.crypto import XtsEngine, XtsKey, XtsPool

from .report import best_of, line

RATIO_TARGET = 0.55  # 64-byte units, one core, 64 MiB, against `openssl speed`
UNIT_4096_TARGET = 0.35  # issue 9, item 4: 4096-byte units, one core, like for like
IN_CACHE = 256 << 10  # a working set each core's L2 holds, as `openssl speed`'s 4 KiB buffer


def openssl_speed(bits: int, unit: int) -> float | None:
    """GB/s of `openssl speed -evp aes-<bits>-xts -bytes <unit>` (one core), or None.

    It encrypts one ``unit``-byte buffer over and over: the data stays in L1.
    """
    argv = ["openssl", "speed", "-evp", f"aes-{bits}-xts", "-bytes", str(unit), "-seconds", "1"]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(rf"AES-{bits}-XTS\s+([\d.]+)k", out, re.IGNORECASE)
    return float(match.group(1)) * 1000 / 1e9 if match else None


def openssl_in_memory(key: bytes, src: memoryview, dst: memoryview, encrypt: bool) -> float:
    """GB/s of OpenSSL's own XTS loop over ``src`` (in memory, not in cache), one core.

    Through `cryptography`, one call per 1 MiB data unit: the per-call cost
    vanishes, so this is an upper bound for OpenSSL with 4096-byte units on
    the same bytes (the reference for a memory-bound engine).
    """
    piece = 1 << 20

    def one_pass() -> None:
        for offset in range(0, len(src), piece):
            mode = modes.XTS(offset.to_bytes(16, "little"))
            cipher = Cipher(algorithms.AES(key), mode)
            context = cipher.encryptor() if encrypt else cipher.decryptor()
            context.update_into(src[offset:offset + piece], dst[offset:offset + piece + 15])

    return len(src) / best_of(3, one_pass) / 1e9


def _in_cache_speed(crypt: Callable[..., None], key: XtsKey, total: int) -> float:
    """GB/s of one engine call over and over on IN_CACHE bytes (as `openssl speed` runs)."""
    src, dst = memoryview(bytearray(os.urandom(IN_CACHE))), memoryview(bytearray(IN_CACHE))

    def passes() -> None:
        for _ in range(total // IN_CACHE):
            crypt(key, src, dst, 0x100000000)

    return total / best_of(3, passes) / 1e9


def run(quick: bool = False) -> None:
    """The engine against OpenSSL: on 64 MiB of memory (one core, then every core), and for
    4096-byte units like for like, both in cache and both on the same 64 MiB."""
    size = (16 if quick else 64) << 20
    src = memoryview(bytearray(os.urandom(size)))
    dst = memoryview(bytearray(size + 15))
    for bits in (128, 256):
        raw_key = os.urandom(bits // 4)
        key = XtsKey(raw_key)
        for unit in (64, 4096):
            reference = openssl_speed(bits, unit)
            engine, pool = XtsEngine(unit), XtsPool(unit)
            for direction in ("encrypt", "decrypt"):
                name = f"xts-{bits} {direction} unit {unit}"
                one = getattr(engine, f"{direction}_into")
                both = getattr(pool, f"{direction}_into")
                one_core = size / best_of(3, lambda f=one, k=key: f(k, src, dst[:size], 0x100000000)) / 1e9
                line(f"{name} (1 core, {size >> 20} MiB)", one_core, "GB/s",
                     reference, "openssl", RATIO_TARGET if unit == 64 else None)
                if unit == 4096:
                    line(f"{name} (1 core, {size >> 20} MiB)", one_core, "GB/s",
                         openssl_in_memory(raw_key, src, dst, direction == "encrypt"),
                         "openssl same bytes", UNIT_4096_TARGET)
                    line(f"{name} (1 core, in cache)", _in_cache_speed(one, key, 4 * size), "GB/s",
                         reference, "openssl", UNIT_4096_TARGET)
                seconds = best_of(3, lambda f=both, k=key: f(k, src, dst[:size], 0x100000000))
                line(f"{name} ({pool.workers} cores, {size >> 20} MiB)", size / seconds / 1e9,
                     "GB/s", reference, "openssl")
            pool.close()
    run_stream(quick)


# -- mktme-emu xts, streaming --------------------------------------------------------------

STREAM_RATIO_TARGET = 1 / 1.3  # the command's throughput within 1.3x of the engine's
STREAM_RSS_LIMIT = 64 << 20


def _run_cli(args: list[str], src: str, peak_rss: bool = False) -> tuple[float, int]:
    """Wall seconds and (with ``peak_rss``) peak RSS in bytes of one `mktme-emu xts` run
    from a file to /dev/null.

    The peak is the child's own VmHWM, sampled until it exits: wait4's
    ru_maxrss would also count this benchmark's memory, which exec records
    as the child's when it replaces the forked copy.  Sampling takes CPU
    from the command, so timed runs do not sample.
    """
    cmd = [str(Path(sys.executable).with_name("mktme-emu")), "xts", *args]
    peak = 0
    with open(src, "rb") as stdin, open(os.devnull, "wb") as stdout:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=stdin, stdout=stdout)
        while peak_rss and proc.poll() is None:
            peak = max(peak, _high_water_mark(proc.pid))
            time.sleep(0.002)
        returncode = proc.wait()
        seconds = time.perf_counter() - start
    if returncode:
        raise RuntimeError(f"mktme-emu xts exited with {returncode}")
    return seconds, peak


def _high_water_mark(pid: int) -> int:
    """VmHWM of a running process in bytes (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def _measure_command(unit: int, big: str, small: str, empty: str) -> tuple[float, float, float, int]:
    """Best wall times on ``big``, ``small`` and empty input, and the peak RSS on ``big``."""
    args = ["--encrypt", "--key", os.urandom(32).hex(), "--tweak-base", "0", "--unit", str(unit)]
    walls = [min(_run_cli(args, path)[0] for _ in range(3)) for path in (big, small, empty)]
    return walls[0], walls[1], walls[2], _run_cli(args, big, peak_rss=True)[1]


def run_stream(quick: bool = False) -> None:
    """`mktme-emu xts` from a file of random bytes in /dev/shm to /dev/null, against the
    engine (the pool, as many cores as the command uses) on the same bytes in memory.

    The streaming figure is marginal: the bytes between a quarter-size and a
    full-size input over the difference of their times, so start-up, the
    workers' start and the pipeline's fill and drain all cancel.  The file
    is written, not sparse: reading a hole costs the kernel almost nothing,
    and real inputs have data.
    """
    size = (256 if quick else 1024) << 20
    key = XtsKey(os.urandom(32))
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as tmp:
        big, small, empty = (os.path.join(tmp, name) for name in ("big", "small", "empty"))
        _write_random(big, size)
        _write_random(small, size // 4)
        open(empty, "wb").close()
        commands = {unit: _measure_command(unit, big, small, empty) for unit in (64, 4096)}
        with open(big, "rb") as f:  # after the commands: a fork would count it as theirs
            data = memoryview(bytearray(f.read()))
        for unit, (wall, wall_small, _start_up, rss) in commands.items():
            pool = XtsPool(unit)
            engine = size / best_of(2, lambda p=pool: p.encrypt_into(key, data, data, 0)) / 1e9
            pool.close()
            name = f"xts command unit {unit}"
            line(f"{name}, {size >> 20} MiB whole run", size / wall / 1e9, "GB/s", engine,
                 "engine")
            line(f"{name}, streaming (marginal)", size * 3 / 4 / (wall - wall_small) / 1e9,
                 "GB/s", engine, "engine", STREAM_RATIO_TARGET)
            line(f"{name}, peak RSS", rss / 2**20, "MiB", STREAM_RSS_LIMIT / 2**20, "limit")
        line("xts command start-up (empty input)", commands[64][2], "s")


def _write_random(path: str, size: int) -> None:
    """``size`` bytes of a 16 MiB random block repeated (the cipher's speed does not
    depend on the bytes; the file must only not be sparse)."""
    block = os.urandom(min(size, 16 << 20))
    with open(path, "wb") as f:
        for offset in range(0, size, len(block)):
            f.write(block[:size - offset])
