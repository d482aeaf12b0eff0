"""Streaming a large file past the page cache (fastio.WriteBehind, prefetch, drop_cached).

These are hints to the kernel, so what is checked is what they promise: the
bytes on the file are the ones written, and a streamed file does not stay
in the page cache (measured with util-linux's `fincore`).  Filesystems that
keep no separate page cache (tmpfs) cannot drop anything: skipped there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mktme_emu.controller.fastio import WriteBehind, drop_cached, prefetch

MiB = 1024 * 1024
SPANS = 6


def resident_bytes(path: Path) -> int:
    result = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                            capture_output=True, text=True, check=True)
    return int(result.stdout.split()[0])


@pytest.fixture
def disk_file(tmp_path: Path) -> Path:
    if shutil.which("fincore") is None:
        pytest.skip("util-linux fincore is not installed")
    return tmp_path / "stream"


def test_write_behind_keeps_only_the_last_span_cached(disk_file: Path) -> None:
    spans = [os.urandom(MiB) for _ in range(SPANS)]
    fd = os.open(disk_file, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        behind = WriteBehind(fd)
        for i, data in enumerate(spans):
            os.pwrite(fd, data, i * MiB)
            behind.written(i * MiB, MiB)
        os.fdatasync(fd)
        resident = resident_bytes(disk_file)
        if resident == SPANS * MiB and _keeps_everything(disk_file, fd):
            pytest.skip("this filesystem keeps files in memory (tmpfs): nothing to drop")
        assert resident <= MiB, f"{resident} bytes still cached; only the last span may be"
        assert all(os.pread(fd, MiB, i * MiB) == data for i, data in enumerate(spans))
    finally:
        os.close(fd)


def test_prefetch_then_drop_leaves_the_data_readable_and_uncached(disk_file: Path) -> None:
    data = os.urandom(4 * MiB)
    disk_file.write_bytes(data)
    fd = os.open(disk_file, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        prefetch(fd, 0, len(data))
        assert os.pread(fd, len(data), 0) == data
        drop_cached(fd, 0, len(data))
        if _keeps_everything(disk_file, fd):
            pytest.skip("this filesystem keeps files in memory (tmpfs): nothing to drop")
        assert resident_bytes(disk_file) == 0
        assert os.pread(fd, len(data), 0) == data  # from the disk again
    finally:
        os.close(fd)


def _keeps_everything(path: Path, fd: int) -> bool:
    """Does dropping the whole file's cache leave it resident (tmpfs, ramfs)?"""
    drop_cached(fd, 0, 0)
    return resident_bytes(path) == os.fstat(fd).st_size


# Run in a fresh interpreter: how much glibc keeps depends on the heap's history.
FREED_BUFFERS = """
import threading
from mktme_emu.controller import fastio

def rss_anon():
    with open("/proc/self/status") as status:
        return next(int(l.split()[1]) << 10 for l in status if l.startswith("RssAnon:"))

def transfer_buffers():
    first = bytearray(16 << 20)
    del first  # a freed mapping raises glibc's mmap threshold: what follows is heap
    buffers = [bytearray(8 << 20) for _ in range(12)]
    transfer_buffers.kept = [bytearray(64) for _ in range(12)]  # pins the heap's top
    buffers.clear()

worker = threading.Thread(target=transfer_buffers)
worker.start()
worker.join()
before = rss_anon()
fastio.return_freed_memory()
print(before, rss_anon())
"""


def test_freed_transfer_buffers_go_back_to_the_kernel() -> None:
    """Buffers freed by a worker thread stay resident (55 MiB of 96 here) until trimmed."""
    out = subprocess.run([sys.executable, "-c", FREED_BUFFERS], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    before, after = map(int, out.split())
    assert before - after >= 40 << 20, (before, after)
