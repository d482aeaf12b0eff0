"""VM figures: boot-to-command time (TCG), and guest DAX memcpy on the emulated NVDIMM
against the same guest on QEMU's plain NVDIMM (no backend), as a ratio.

Between flushes the view is plain shared memory, so the emulator should cost
the guest nothing: the target ratio is 0.95.
"""

from __future__ import annotations

import re
import sys
import time

from mktme_emu.vm.boot import LaunchOptions, launch
from mktme_emu.vm.emulated import EmulatedNvdimm, EmulatorOptions
from mktme_emu.vm.launcher import NvdimmBackend, PlainNvdimm, RunRequest

from .report import line

DAX_TARGET = 0.95
SIZE = 32 << 20
# Runs in the guest: memcpy into a devdax mapping, best of several rounds.
_DAX_PROBE = f"""
import mmap, os, time
import numpy as np
fd = os.open("/dev/dax0.0", os.O_RDWR)
dst = np.frombuffer(mmap.mmap(fd, {SIZE}, mmap.MAP_SHARED), np.uint8)
src = np.full({SIZE}, 0x5A, np.uint8)
rounds = []
for _ in range(5):
    start = time.perf_counter()
    np.copyto(dst, src)
    rounds.append(time.perf_counter() - start)
print("MKTME-BENCH dax-gbps", {SIZE} / min(rounds) / 1e9)
"""
_RESULT = re.compile(r"MKTME-BENCH dax-gbps ([\d.]+)")


def _boot_time() -> float:
    opts = LaunchOptions(accel="tcg")
    backend = EmulatedNvdimm(EmulatorOptions(size=opts.nvdimm_size))
    try:
        start = time.perf_counter()
        result = launch(opts, RunRequest(command=("true",), echo=False), [backend])
        elapsed = time.perf_counter() - start
    finally:
        backend.close()
    if result.exit_code != 0:
        raise RuntimeError(f"boot benchmark: {result.describe()}")
    return elapsed


def _dax_throughput(backend: NvdimmBackend) -> float:
    opts = LaunchOptions(accel="tcg", ns_mode="devdax")
    command = (sys.executable, "-c", _DAX_PROBE)
    try:
        result = launch(opts, RunRequest(command=command, echo=False, timeout=600), [backend])
    finally:
        backend.close()
    match = _RESULT.search(result.console_tail)
    if result.exit_code != 0 or not match:
        raise RuntimeError(f"dax benchmark: {result.describe()}\n{result.console_tail[-1500:]}")
    return float(match.group(1))


def run(quick: bool = False) -> None:
    line("boot to command, TCG (run -- true)", _boot_time(), "s")
    plain, emulated = 0.0, 0.0
    for _ in range(1 if quick else 2):  # alternate, best of each: other load hits both alike
        plain = max(plain, _dax_throughput(PlainNvdimm(256 << 20)))
        emulated = max(emulated, _dax_throughput(EmulatedNvdimm(EmulatorOptions(size=256 << 20))))
    line(f"guest devdax memcpy {SIZE >> 20} MiB, emulated", emulated, "GB/s",
         plain, "plain QEMU nvdimm", DAX_TARGET)
