"""The size sweep: backend start, power cycle, map and flush at real sizes, each beside
a physical reference measured in the same run on the same machine.

References (what the operation must at least cost here):

- (a) ``fallocate`` of a new /dev/shm file of the device's size and one write pass
  through a shared mapping of it: what populating a view costs, for first start,
  fill and power cycle;
- (b) reading the whole view once through its descriptor, for a flush that finds
  nothing changed;
- (c) writing the device's size and fdatasyncing it in the state directory's
  filesystem, for a fully dirty flush.

Sizes come from ``BENCH_SIZES`` (default ``256M,1G,4G``; e.g. ``BENCH_SIZES=16G``),
and a size is skipped with a line saying so when the machine lacks the memory for it.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mktme_emu.protocol import Client, KeyCommand, key_program
from mktme_emu.vm.emulated import EmulatedNvdimm, EmulatorOptions
from mktme_emu.vm.qemu import parse_size

MiB = 1 << 20
GiB = 1 << 30
CHUNK = 4 * MiB
BASE = 0x100000000
SHM = Path("/dev/shm")


@dataclass(frozen=True)
class References:
    """The three physical references for one size, in seconds."""

    populate: float  # (a)
    read: float  # (b)
    write_sync: float  # (c)


def sizes_from_env(quick: bool) -> list[int]:
    """The sizes to sweep: BENCH_SIZES, or a default that fits the run's ambition."""
    text = os.environ.get("BENCH_SIZES", "64M,256M" if quick else "256M,1G,4G")
    return [parse_size(item.strip()) for item in text.split(",") if item.strip()]


def _available_memory() -> int:
    for row in Path("/proc/meminfo").read_text().splitlines():
        if row.startswith("MemAvailable:"):
            return int(row.split()[1]) * 1024
    return 0


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def reference_populate(size: int) -> float:
    """(a) fallocate a new /dev/shm file and write it once through a shared mapping."""
    fd, name = tempfile.mkstemp(prefix="mktme-bench-ref-", dir=SHM)
    try:
        start = time.perf_counter()
        os.posix_fallocate(fd, 0, size)
        with mmap.mmap(fd, size) as mem:
            pattern = b"\xa5" * CHUNK
            for offset in range(0, size, CHUNK):
                mem[offset:offset + CHUNK] = pattern
        return time.perf_counter() - start
    finally:
        os.close(fd)
        os.unlink(name)


def reference_read(view: Path) -> float:
    """(b) read the whole view once through its descriptor."""
    buffer = bytearray(CHUNK)
    fd = os.open(view, os.O_RDONLY)
    try:
        start = time.perf_counter()
        while os.readv(fd, [buffer]):
            pass
        return time.perf_counter() - start
    finally:
        os.close(fd)


def reference_write_sync(directory: Path, size: int) -> float:
    """(c) write `size` bytes and fdatasync them in the state directory's filesystem."""
    data = os.urandom(CHUNK)
    path = directory / "bench-disk-reference"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        start = time.perf_counter()
        for offset in range(0, size, CHUNK):
            os.pwrite(fd, data, offset)
        os.fdatasync(fd)
        return time.perf_counter() - start
    finally:
        os.close(fd)
        path.unlink()


def _private_memory(pid: int) -> int:
    """Resident memory of the backend beyond the shared view (VmRSS less RssShmem)."""
    fields = {}
    for row in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = row.partition(":")
        if name in ("VmRSS", "RssShmem"):
            fields[name] = int(value.split()[0]) * 1024
    return fields["VmRSS"] - fields.get("RssShmem", 0)


class Device:
    """One backend on a state directory and view of this sweep's own, restartable."""

    def __init__(self, root: Path, size: int) -> None:
        self.size = size
        self.state = root / "state"
        self.nvdimm: EmulatedNvdimm | None = None

    def start(self) -> float:
        """Start `serve` and return seconds until it answers; the view is kept across stops."""
        start = time.perf_counter()
        self.nvdimm = EmulatedNvdimm(EmulatorOptions(state_dir=self.state, size=self.size, keep=True))
        self.nvdimm.attach(BASE)
        return time.perf_counter() - start

    def stop(self) -> None:
        if self.nvdimm is not None:
            self.nvdimm.close()

    @property
    def view(self) -> Path:
        assert self.nvdimm is not None
        return self.nvdimm.view_path

    def client(self) -> Client:
        assert self.nvdimm is not None
        return Client.connect(self.nvdimm.control_socket, timeout=600)

    def remove_view(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.view.unlink()


def _program_keys(client: Client) -> None:
    for keyid in (1, 2):
        client.program_key(key_program(keyid, KeyCommand.SET_KEY_DIRECT, "aes-xts-128",
                                       os.urandom(16).hex(), os.urandom(16).hex()))


def _dirty_whole_view(view: Path, size: int) -> None:
    """Write every page of the view (as a guest would), through the descriptor."""
    data = os.urandom(CHUNK)
    fd = os.open(view, os.O_WRONLY)
    try:
        for offset in range(0, size, CHUNK):
            os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def _ratio_line(name: str, seconds: float, reference: float, ref_name: str, target: float) -> None:
    """`name seconds ... ratio to the reference` with the target as a ratio ceiling."""
    ratio = seconds / reference
    verdict = "meets" if ratio <= target else "ABOVE"
    print(f"{name:44} {seconds:10.3f} s   ref {ref_name} {reference:.3f} s   "
          f"ratio {ratio:.2f} ({verdict} target <= {target:.2f})", flush=True)


def _limit_line(name: str, value: float, unit: str, limit: float) -> None:
    verdict = "meets" if value <= limit else "ABOVE"
    print(f"{name:44} {value:10.3f} {unit}   ({verdict} target <= {limit:.3f} {unit})", flush=True)


@contextlib.contextmanager
def _scratch() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="mktme-bench-sizes-"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def sweep_one(size: int) -> None:
    """Every figure of issue-9's table for one size, each beside its reference."""
    label = f"{size // MiB} MiB" if size < GiB else f"{size // GiB} GiB"
    with _scratch() as root:
        device = Device(root, size)
        try:
            _sweep(device, label, root)
        finally:
            device.stop()
            with contextlib.suppress(AssertionError):
                device.remove_view()


def _sweep(device: Device, label: str, root: Path) -> None:
    size = device.size
    populate, write_sync = reference_populate(size), reference_write_sync(root, size)
    _limit_line(f"[{label}] first start, new empty device", device.start(), "s", 1.0)
    with device.client() as client:
        _program_keys(client)
        seconds = _timed(lambda: client.map(0, size, 1))
        print(f"[{label}] map whole device to a user KeyID {seconds:10.3f} s", flush=True)
        _dirty_whole_view(device.view, size)
        # (b) on the view as a flush finds it: every page holds data (a new view's
        # holes read three times faster and would flatter no one but the reference).
        refs = References(populate, reference_read(device.view), write_sync)
        print(f"[{label}] references: (a) populate {refs.populate:.3f} s, (b) read view "
              f"{refs.read:.3f} s, (c) write+fdatasync {refs.write_sync:.3f} s", flush=True)
        _ratio_line(f"[{label}] flush fully dirty", _timed(client.flush), refs.write_sync, "(c)", 2.5)
        _ratio_line(f"[{label}] flush nothing changed, user KeyID", _timed(client.flush), refs.read,
                    "(b)", 3.0)
        maps = [_timed(lambda k=k: client.map(0, 2 * MiB, k)) for k in (2, 1) * 3]
        _limit_line(f"[{label}] map 2 MiB", min(maps) * 1e3, "ms", 5.0)
        assert device.nvdimm is not None and device.nvdimm.pid is not None
        limit = (100 * MiB + size / 16) / MiB
        _limit_line(f"[{label}] backend memory beyond the view", _private_memory(device.nvdimm.pid) / MiB,
                    "MiB", limit)
        _ratio_line(f"[{label}] power cycle", _timed(client.power_cycle), refs.populate, "(a)", 2.0)
    device.stop()
    _limit_line(f"[{label}] restart re-attaching to the view", device.start(), "s", 1.0)
    device.stop()
    device.remove_view()
    _ratio_line(f"[{label}] first start, device holding data", device.start(), refs.populate, "(a)", 2.0)


def run(quick: bool = False) -> None:
    """The sweep over BENCH_SIZES; sizes the machine cannot hold are skipped, saying so."""
    for size in sizes_from_env(quick):
        # The view, the reference file and the media's page cache may all be resident at once.
        if 3 * size > _available_memory():
            need = 3 * size // GiB
            print(f"[{size // MiB} MiB] skipped: needs about {need} GiB of free memory", flush=True)
            continue
        sweep_one(size)
