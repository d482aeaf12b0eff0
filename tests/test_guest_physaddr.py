"""mktme_guest.physaddr on the host: extents, fake pagemap and sysfs trees, real pagemap and FIEMAP."""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

import pytest
from mktme_guest import physaddr
from mktme_guest.errors import DeviceError, ResolveError
from mktme_guest.physaddr import PAGE_SIZE, DaxRange, Extent, FileExtent

ROOT = os.geteuid() == 0


# -- extents ----------------------------------------------------------------------------------

def test_merge_joins_only_physical_and_logical_neighbours() -> None:
    parts = [Extent(0x1000, 0x1000, 0), Extent(0x2000, 0x1000, 0x1000),  # continue: merged
             Extent(0x9000, 0x1000, 0x2000),  # physical jump
             Extent(0xA000, 0x1000, 0x5000),  # physical neighbour, logical jump
             Extent(0xB000, 0, 0x6000)]  # empty: dropped
    assert physaddr.merge_extents(parts) == [
        Extent(0x1000, 0x2000, 0), Extent(0x9000, 0x1000, 0x2000), Extent(0xA000, 0x1000, 0x5000)]


def test_merge_keeps_order() -> None:
    parts = [Extent(0x5000, 0x1000, 0), Extent(0x4000, 0x1000, 0x1000)]
    assert physaddr.merge_extents(parts) == parts


# -- pagemap ----------------------------------------------------------------------------------

def _fake_pagemap(path: Path, entries: dict[int, int]) -> Path:
    """A pagemap file: page number -> 64-bit entry."""
    raw = bytearray(8 * (max(entries) + 1))
    for page, entry in entries.items():
        struct.pack_into("<Q", raw, page * 8, entry)
    path.write_bytes(bytes(raw))
    return path


def test_pagemap_extents_from_fake_file(tmp_path: Path) -> None:
    present = physaddr.PM_PRESENT
    pm = _fake_pagemap(tmp_path / "pagemap", {
        16: present | 0x100600, 17: present | 0x100601, 18: present | 0x100900})
    extents = physaddr.pagemap_extents(16 * PAGE_SIZE + 0x10, 3 * PAGE_SIZE - 0x20, pm)
    assert extents == [Extent(0x100600010, 2 * PAGE_SIZE - 0x10, 0),
                       Extent(0x100900000, PAGE_SIZE - 0x10, 2 * PAGE_SIZE - 0x10)]


def test_pagemap_refuses_absent_pages_and_hidden_pfns(tmp_path: Path) -> None:
    pm = _fake_pagemap(tmp_path / "pagemap", {4: physaddr.PM_PRESENT | 7, 5: 0, 6: physaddr.PM_PRESENT})
    with pytest.raises(ResolveError, match="0x5000: page not present"):
        physaddr.pagemap_extents(4 * PAGE_SIZE, 2 * PAGE_SIZE, pm)
    with pytest.raises(ResolveError, match="CAP_SYS_ADMIN"):
        physaddr.pagemap_extents(6 * PAGE_SIZE, PAGE_SIZE, pm)
    with pytest.raises(ResolveError, match="page boundary"):
        physaddr.read_pfns(0x10, 1, pm)


@pytest.mark.skipif(not ROOT, reason="PFNs in pagemap need CAP_SYS_ADMIN")
def test_real_pagemap_of_an_anonymous_mapping() -> None:
    mm = mmap.mmap(-1, 4 * PAGE_SIZE)
    try:
        for i in range(0, len(mm), PAGE_SIZE):
            mm[i] = 1  # fault in, each page gets its own frame
        address = physaddr.mmap_address(mm)
        extents = physaddr.pagemap_extents(address, len(mm))
        assert sum(e.length for e in extents) == len(mm)
        assert all(e.pa > 0 and e.pa % PAGE_SIZE == 0 for e in extents)
        inner = physaddr.pagemap_extents(address + 100, 200)
        assert inner == [Extent(extents[0].pa + 100, 200, 0)]
    finally:
        mm.close()  # the address lookup left no export behind


def test_mmap_address_leaves_the_mmap_closable() -> None:
    mm = mmap.mmap(-1, PAGE_SIZE)
    assert physaddr.mmap_address(mm) % PAGE_SIZE == 0
    mm.close()


# -- FIEMAP ------------------------------------------------------------------------------------

def test_fiemap_of_a_real_file(tmp_path: Path) -> None:
    path = tmp_path / "data"
    path.write_bytes(os.urandom(3 * PAGE_SIZE + 100))
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            found = physaddr.fiemap(fd)
        except ResolveError as exc:
            pytest.skip(f"no FIEMAP on this filesystem: {exc}")
    finally:
        os.close(fd)
    assert found and found[0].logical == 0
    assert found[-1].flags & physaddr.FIEMAP_EXTENT_LAST
    assert sum(e.length for e in found) >= path.stat().st_size


@pytest.mark.skipif(not ROOT, reason="reads the block device under the filesystem")
def test_fiemap_physical_offsets_point_at_the_data(tmp_path: Path) -> None:
    """Read the filesystem's block device where FIEMAP says the file is: same bytes."""
    data = os.urandom(2 * PAGE_SIZE)
    path = tmp_path / "data"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        found = physaddr.fiemap(fd)
    except ResolveError as exc:
        pytest.skip(f"no FIEMAP here: {exc}")
    finally:
        os.close(fd)
    if any(e.flags & ~(physaddr.FIEMAP_EXTENT_LAST | 0x1000) for e in found):
        pytest.skip("inline/encoded extents: nothing to read back")
    dev = physaddr.block_device_of(path)
    node = Path("/dev") / dev.name
    if not node.exists():
        pytest.skip(f"no {node}")
    try:
        bdev = os.open(node, os.O_RDONLY | os.O_DIRECT)
    except OSError as exc:
        pytest.skip(f"cannot read {node}: {exc.strerror}")
    try:
        for ext in found:
            buf = mmap.mmap(-1, ext.length)  # page-aligned, as O_DIRECT wants
            os.preadv(bdev, [buf], ext.physical)
            assert bytes(buf[:ext.length]) == data[ext.logical:ext.logical + ext.length]
            buf.close()
    finally:
        os.close(bdev)


def test_fiemap_extents_are_clipped_and_checked() -> None:
    raw = [FileExtent(0, 0x10000, 0x2000, 0), FileExtent(0x2000, 0x50000, 0x2000, 0x801)]
    got = physaddr._extents_from_fiemap(raw, 0x100600000, 0x1000, 0x3800, "f")
    assert got == [Extent(0x100611000, 0x1000, 0x1000), Extent(0x100650000, 0x1800, 0x2000)]
    with pytest.raises(ResolveError, match="hole at file offset 0x4000"):
        physaddr._extents_from_fiemap(raw, 0, 0, 0x5000, "f")
    with pytest.raises(ResolveError, match="hole at file offset 0x0"):
        physaddr._extents_from_fiemap(raw[1:], 0, 0, 0x3000, "f")
    with pytest.raises(ResolveError, match="delalloc"):
        physaddr._extents_from_fiemap([FileExtent(0, 0, 0x1000, 0x4 | 0x1)], 0, 0, 0x1000, "f")


# -- sysfs ---------------------------------------------------------------------------------------

def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def _fake_pmem(sysfs: Path, resource: str = "0x100600000", sectors: int = 512000) -> None:
    """/sys/block/pmem0 under a pfn device, its partition pmem0p1, and /sys/dev/block links."""
    pfn = sysfs / "devices" / "ndbus0" / "region0" / "pfn0.0"
    disk = pfn / "block" / "pmem0"
    _write(pfn / "resource", resource)
    _write(disk / "size", str(sectors))
    (disk / "device").symlink_to(pfn)
    _write(disk / "pmem0p1" / "partition", "1")
    _write(disk / "pmem0p1" / "start", "2048")
    _write(disk / "pmem0p1" / "size", "4096")
    links = sysfs / "dev" / "block"
    links.mkdir(parents=True)
    (links / "259:0").symlink_to(disk)
    (links / "259:1").symlink_to(disk / "pmem0p1")
    (sysfs / "block").mkdir()
    (sysfs / "block" / "pmem0").symlink_to(disk)


def test_pmem_disk_and_partition_start(tmp_path: Path) -> None:
    _fake_pmem(tmp_path)
    disk = physaddr.block_device(259, 0, tmp_path)
    assert (disk.name, disk.disk, disk.partition_start) == ("pmem0", "pmem0", 0)
    assert physaddr.pmem_data_start(disk) == 0x100600000
    assert physaddr.device_size(disk) == 512000 * 512
    part = physaddr.block_device(259, 1, tmp_path)
    assert (part.name, part.disk, part.partition_start) == ("pmem0p1", "pmem0", 2048 * 512)
    assert physaddr.pmem_data_start(part) == 0x100600000 + 2048 * 512
    assert physaddr.device_size(part) == 4096 * 512


def test_non_pmem_and_missing_devices_are_refused(tmp_path: Path) -> None:
    _fake_pmem(tmp_path)
    with pytest.raises(DeviceError, match="no block device 8:0"):
        physaddr.block_device(8, 0, tmp_path)
    with pytest.raises(DeviceError, match="not a persistent-memory disk"):
        physaddr.pmem_data_start(physaddr.BlockDevice("vda", "vda", tmp_path))
    with pytest.raises(DeviceError, match="BTT"):
        physaddr.pmem_data_start(physaddr.BlockDevice("pmem0s", "pmem0s", tmp_path))


def _fake_dax(sysfs: Path, mappings: list[tuple[int, int, int]] | None) -> None:
    top = sysfs / "bus" / "dax" / "devices" / "dax0.0"
    _write(top / "resource", "0x100600000")
    _write(top / "size", str(0x200000))
    _write(top / "align", "2097152")
    for i, (start, end, pgoff) in enumerate(mappings or []):
        _write(top / f"mapping{i}" / "start", hex(start))
        _write(top / f"mapping{i}" / "end", hex(end))
        _write(top / f"mapping{i}" / "page_offset", hex(pgoff))


def test_dax_ranges_from_resource(tmp_path: Path) -> None:
    _fake_dax(tmp_path, None)
    assert physaddr.dax_ranges("/dev/dax0.0", tmp_path) == [DaxRange(0x100600000, 0x100800000, 0)]
    assert physaddr.dax_align("dax0.0", tmp_path) == 2 << 20
    assert physaddr.dax_extents("/dev/dax0.0", 0x1000, 0x2000, tmp_path) == [Extent(0x100601000, 0x2000)]


def test_dax_extents_span_mappings(tmp_path: Path) -> None:
    # Two pieces, listed out of device order: pages 0x200.. live at 0x200000000.
    _fake_dax(tmp_path, [(0x200000000, 0x2000fffff, 0x200), (0x100600000, 0x1007fffff, 0)])
    ranges = physaddr.dax_ranges("dax0.0", tmp_path)
    assert [r.pgoff for r in ranges] == [0, 0x200]
    got = physaddr.dax_extents("dax0.0", 0x1ff000, 0x2000, tmp_path)
    assert got == [Extent(0x1007ff000, 0x1000, 0), Extent(0x200000000, 0x1000, 0x1000)]
    with pytest.raises(ResolveError, match="not inside the device"):
        physaddr.dax_extents("dax0.0", 0x2ff000, 0x2000, tmp_path)


def test_dax_names(tmp_path: Path) -> None:
    with pytest.raises(DeviceError, match="not a device-DAX node"):
        physaddr.dax_name("/dev/pmem0")
    with pytest.raises(DeviceError, match=r"no device-DAX device dax1\.0"):
        physaddr.dax_ranges("/dev/dax1.0", tmp_path)
