"""XTS throughput of the engine against OpenSSL's own loop for the same unit size."""

from __future__ import annotations

import os
import re
import subprocess

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
