"""XTS throughput of the engine against OpenSSL's own loop for the same unit size."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mktme_emu.crypto import XtsEngine, XtsKey, XtsPool

from .report import best_of, line

RATIO_TARGET = 0.55


def openssl_speed(bits: int, unit: int) -> float | None:
    """GB/s of `openssl speed -evp aes-<bits>-xts -bytes <unit>` (one core), or None."""
    argv = ["openssl", "speed", "-evp", f"aes-{bits}-xts", "-bytes", str(unit), "-seconds", "1"]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(rf"AES-{bits}-XTS\s+([\d.]+)k", out, re.IGNORECASE)
    return float(match.group(1)) * 1000 / 1e9 if match else None


def run(quick: bool = False) -> None:
    size = (16 if quick else 64) << 20
    src = memoryview(bytearray(os.urandom(size)))
    dst = memoryview(bytearray(size))
    for bits in (128, 256):
        key = XtsKey(os.urandom(bits // 4))
        for unit in (64, 4096):
            reference = openssl_speed(bits, unit)
            engine, pool = XtsEngine(unit), XtsPool(unit)
            for direction in ("encrypt", "decrypt"):
                one = getattr(engine, f"{direction}_into")
                both = getattr(pool, f"{direction}_into")
                seconds = best_of(3, lambda f=one, k=key: f(k, src, dst, 0x100000000))
                line(f"xts-{bits} {direction} unit {unit} (1 core)", size / seconds / 1e9, "GB/s",
                     reference, "openssl", RATIO_TARGET)
                seconds = best_of(3, lambda f=both, k=key: f(k, src, dst, 0x100000000))
                line(f"xts-{bits} {direction} unit {unit} ({pool.workers} cores)",
                     size / seconds / 1e9, "GB/s", reference, "openssl")
            pool.close()
    run_stream(quick)


# -- mktme-emu xts, streaming --------------------------------------------------------------

STREAM_RATIO_TARGET = 1 / 1.3  # the command's throughput within 1.3x of the engine's
STREAM_RSS_LIMIT = 64 << 20


def _run_cli(args: list[str], src: str) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one `mktme-emu xts` run from a file to /dev/null.

    The peak is the child's own VmHWM, sampled until it exits: wait4's
    ru_maxrss would also count this benchmark's memory, which exec records
    as the child's when it replaces the forked copy.
    """
    cmd = [str(Path(sys.executable).with_name("mktme-emu")), "xts", *args]
    with open(src, "rb") as stdin, open(os.devnull, "wb") as stdout:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=stdin, stdout=stdout)
        peak = 0
        while True:
            pid, status = os.waitpid(proc.pid, os.WNOHANG)
            if pid:
                break
            peak = max(peak, _high_water_mark(proc.pid))
            time.sleep(0.002)
        seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"mktme-emu xts exited with {proc.returncode}")
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


def _measure_command(unit: int, src: str, empty: str) -> tuple[float, float, int]:
    """Best wall time on ``src``, best start-up time (empty input), peak RSS of the runs."""
    args = ["--encrypt", "--key", os.urandom(32).hex(), "--tweak-base", "0", "--unit", str(unit)]
    start_up = min(_run_cli(args, empty)[0] for _ in range(2))
    runs = [_run_cli(args, src) for _ in range(2)]
    return min(s for s, _ in runs), start_up, max(peak for _, peak in runs)


def run_stream(quick: bool = False) -> None:
    """`mktme-emu xts` on a file of zeros against the engine (the pool, as the command uses
    it) on the same bytes in memory; start-up is measured on empty input and left out."""
    size = (128 if quick else 512) << 20
    key = XtsKey(os.urandom(32))
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as tmp:
        src, empty = os.path.join(tmp, "zeros"), os.path.join(tmp, "empty")
        with open(src, "wb") as f:
            f.truncate(size)
        open(empty, "wb").close()
        commands = {unit: _measure_command(unit, src, empty) for unit in (64, 4096)}
        data = memoryview(bytearray(size))  # after the commands: a fork would count it as theirs
        for unit, (wall, start_up, rss) in commands.items():
            pool = XtsPool(unit)
            engine = size / best_of(2, lambda p=pool: p.encrypt_into(key, data, data, 0)) / 1e9
            pool.close()
            line(f"xts command unit {unit}, with start-up", size / wall / 1e9, "GB/s",
                 engine, "engine")
            line(f"xts command unit {unit}, start-up excluded", size / (wall - start_up) / 1e9,
                 "GB/s", engine, "engine", STREAM_RATIO_TARGET)
            line(f"xts command unit {unit}, peak RSS", rss / 2**20, "MiB", STREAM_RSS_LIMIT / 2**20,
                 "limit")
        line("xts command start-up (empty input)", commands[64][1], "s")
