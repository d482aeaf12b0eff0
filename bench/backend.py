"""Backend figures: fill and flush throughput, map latency, socket round trips, private memory."""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from mktme_emu.protocol import Client, KeyCommand, key_program
from mktme_emu.vm.emulated import EmulatedNvdimm, EmulatorOptions

from .report import best_of, line
from .sizes import reference_write_sync

MiB = 1 << 20


@contextlib.contextmanager
def backend(size: int) -> Iterator[EmulatedNvdimm]:
    """A real `mktme-emu serve` (view in /dev/shm) at a fixed base; stopped with SIGTERM."""
    nvdimm = EmulatedNvdimm(EmulatorOptions(size=size))
    try:
        nvdimm.attach(0x100000000)
        yield nvdimm
    finally:
        nvdimm.close()


def _private_memory(pid: int) -> dict[str, int]:
    fields = {}
    for row in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = row.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            fields[name] = int(value.split()[0]) * 1024
    return fields


def _throughput(nvdimm: EmulatedNvdimm, size: int) -> None:
    sock = nvdimm.control_socket
    with Client.connect(sock) as client, open(nvdimm.view_path, "r+b") as f:
        for keyid in (1, 2):
            client.program_key(key_program(keyid, KeyCommand.SET_KEY_DIRECT, "aes-xts-128",
                                           os.urandom(16).hex(), os.urandom(16).hex()))
        client.map(0, size, 1)
        mem = mmap.mmap(f.fileno(), size)
        chunk = os.urandom(MiB)
        for offset in range(0, size, MiB):
            mem[offset:offset + MiB] = chunk[offset // MiB % 7:] + chunk[:offset // MiB % 7]
        start = time.perf_counter()
        written = client.flush().written
        dirty = time.perf_counter() - start
        reference = reference_write_sync(sock.parent, size)
        line(f"flush {size // MiB} MiB fully dirty ({written} pages)", size / dirty / 1e9, "GB/s",
             size / reference / 1e9, "disk write+fdatasync")
        clean = best_of(3, client.flush)
        line(f"flush {size // MiB} MiB clean", size / clean / 1e9, "GB/s")
        remap = best_of(2, lambda: (client.map(0, size, 2), client.map(0, size, 1)))
        fill = max(remap / 2 - clean, 1e-9)
        line(f"fill {size // MiB} MiB (map time less clean flush)", size / fill / 1e9, "GB/s")
        maps = best_of(5, lambda: [client.map(0, 2 * MiB, k) for k in (2, 1) * 5])
        line("map 2 MiB (write back + fill + metadata)", maps / 10 * 1e3, "ms")
        mem.close()
    assert nvdimm.pid is not None
    for name, value in _private_memory(nvdimm.pid).items():
        line(f"backend {name}", value / MiB, "MiB")


def _round_trips(sock: Path, quick: bool) -> None:
    count = 500 if quick else 3000
    with Client.connect(sock) as client:
        seconds = best_of(3, lambda: [client.features() for _ in range(count)])
    line("request round trip (GET_FEATURES)", seconds / count * 1e6, "us")
    line("requests/s, 1 client", count / seconds, "req/s")

    def worker() -> None:
        with Client.connect(sock) as c:
            for _ in range(count // 4):
                c.features()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    line("requests/s, 4 clients", count / (time.perf_counter() - start), "req/s")


def run(quick: bool = False) -> None:
    size = (64 if quick else 256) * MiB
    with backend(size) as nvdimm:
        _throughput(nvdimm, size)
        _round_trips(nvdimm.control_socket, quick)
