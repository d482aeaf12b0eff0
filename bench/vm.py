"""VM figures: boot-to-command time (TCG) phase by phase, the cost of a `mktme-guest`
call against a bare `python3 -c pass` in the same guest, and guest DAX memcpy on the
emulated NVDIMM against the same guest on QEMU's plain NVDIMM (no backend), as a ratio.

Between flushes the view is plain shared memory, so the emulator should cost
the guest nothing: the target ratio is 0.95.  Boot to command should take at
most 6 s under TCG; `mktme-guest status` at most 1.5x `python3 -c pass`.
"""

from __future__ import annotations

import re
import statistics
import sys
import time

from mktme_emu.vm.boot import LaunchOptions, launch
from mktme_emu.vm.emulated import EmulatedNvdimm, EmulatorOptions
from mktme_emu.vm.launcher import NvdimmBackend, PlainNvdimm, RunRequest
from mktme_emu.vm.timeline import steps

from .report import line

DAX_TARGET = 0.95
BOOT_TARGET = 6.0  # seconds, `run -- true` under TCG
GUEST_CLI_TARGET = 1.5  # `mktme-guest status` / `python3 -c pass`, same guest
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
    """`run -- true` on an emulated NVDIMM; prints where the time went, returns the total."""
    opts = LaunchOptions(accel="tcg")
    start = time.monotonic()
    backend = EmulatedNvdimm(EmulatorOptions(size=opts.nvdimm_size))
    ready = time.monotonic()
    try:
        result = launch(opts, RunRequest(command=("true",), echo=False), [backend])
    finally:
        backend.close()
    elapsed = time.monotonic() - ready  # the launch, as before: the backend is apart
    if result.exit_code != 0:
        raise RuntimeError(f"boot benchmark: {result.describe()}")
    line("  backend ready", ready - start, "s")
    for step in steps(result.phases, ready):
        line(f"  {step.name}", step.seconds, "s")
    line("  (launch returned)", ready + elapsed - max(m.at for m in result.phases), "s")
    return elapsed


#: Runs in the guest: alternate the two commands (so load hits both alike), N times each.
_CLI_PROBE = """
import subprocess, sys, time
def once(argv):
    start = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start
runs = {"pass": [], "status": []}
once([sys.executable, "-c", "pass"]); once(["mktme-guest", "status"])  # warm the caches
for _ in range(%d):
    runs["pass"].append(once([sys.executable, "-c", "pass"]))
    runs["status"].append(once(["mktme-guest", "status"]))
for name, times in runs.items():
    print("MKTME-BENCH", name, " ".join(f"{t:.4f}" for t in times))
"""
_CLI_RESULT = re.compile(r"MKTME-BENCH (pass|status) ([\d. ]+)")


def _guest_cli(repeats: int) -> tuple[float, float]:
    """Median seconds of `python3 -c pass` and of `mktme-guest status`, in one TCG guest."""
    opts = LaunchOptions(accel="tcg")
    backend = EmulatedNvdimm(EmulatorOptions(size=opts.nvdimm_size))
    command = (sys.executable, "-c", _CLI_PROBE % repeats)
    try:
        result = launch(opts, RunRequest(command=command, echo=False, capture=True, timeout=900),
                        [backend])
    finally:
        backend.close()
    found = {m.group(1): [float(t) for t in m.group(2).split()]
             for m in _CLI_RESULT.finditer(result.output)}
    if result.exit_code != 0 or len(found) != 2:
        raise RuntimeError(f"guest cli benchmark: {result.describe()}\n{result.output[-1500:]}")
    return statistics.median(found["pass"]), statistics.median(found["status"])


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
    boot = _boot_time()
    line("boot to command, TCG (run -- true)", boot, "s")
    print(f"{'':44} ({'meets' if boot <= BOOT_TARGET else 'ABOVE'} target {BOOT_TARGET:.1f} s)",
          flush=True)
    bare, status = _guest_cli(3 if quick else 10)
    line("guest python3 -c pass, TCG (median)", bare, "s")
    line("guest mktme-guest status, TCG (median)", status, "s", bare, "python3 -c pass")
    print(f"{'':44} mktme-guest status / python3 -c pass {status / bare:.2f} "
          f"({'meets' if status / bare <= GUEST_CLI_TARGET else 'ABOVE'} target "
          f"{GUEST_CLI_TARGET:.2f})", flush=True)
    plain, emulated = 0.0, 0.0
    for _ in range(1 if quick else 2):  # alternate, best of each: other load hits both alike
        plain = max(plain, _dax_throughput(PlainNvdimm(256 << 20)))
        emulated = max(emulated, _dax_throughput(EmulatedNvdimm(EmulatorOptions(size=256 << 20))))
    line(f"guest devdax memcpy {SIZE >> 20} MiB, emulated", emulated, "GB/s",
         plain, "plain QEMU nvdimm", DAX_TARGET)
