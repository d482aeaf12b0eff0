"""Physical addresses of guest memory: pagemap, FIEMAP and the NVDIMM's sysfs resources.

The backend speaks data-area offsets (offset = PA - base); the guest knows
virtual addresses, file offsets and device offsets.  Three ways bridge them,
each returning :class:`Extent` lists in the caller's order:

- an address range of this process (a DAX mmap): ``/proc/self/pagemap``
  gives each present page's PFN (bits 0-54, present bit 63; the PFN reads 0
  without CAP_SYS_ADMIN), PA = PFN x 4096;
- a file on a DAX filesystem: the FIEMAP ioctl gives byte offsets in the
  filesystem's block device; the block device ``pmemN`` starts at the PA in
  ``/sys/block/pmemN/device/resource`` (the pfn device's resource in fsdax
  mode, which already skips the info block and memmap reserve; the
  namespace's own resource in raw mode), plus a partition's start;
- a devdax device: ``/sys/bus/dax/devices/daxX.Y/resource`` (or its
  ``mappingN`` ranges when the device is made of several).

Nothing here talks to the backend.  Every sysfs root and pagemap path is a
parameter, so tests run on fake trees.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import DeviceError, ResolveError

PAGE_SIZE = 4096
SECTOR = 512
SYSFS = Path("/sys")

PAGEMAP_ENTRY = struct.Struct("<Q")
PM_PRESENT = 1 << 63
PM_PFN_MASK = (1 << 55) - 1

FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_HEADER = struct.Struct("<QQIIII")  # start, length, flags, mapped, count, reserved
FIEMAP_EXTENT = struct.Struct("<QQQ16xI12x")  # logical, physical, length, (res), flags, (res)
FIEMAP_BATCH = 128
FIEMAP_EXTENT_LAST = 0x1
# Extents without a stable, plain physical location (no address, inline, packed, encoded).
FIEMAP_EXTENT_UNUSABLE = {0x2: "unknown", 0x4: "delalloc", 0x8: "encoded", 0x100: "not-aligned",
                          0x200: "inline", 0x400: "tail"}
FIEMAP_EXTENT_UNWRITTEN = 0x800


@dataclass(frozen=True)
class Extent:
    """``length`` bytes at physical address ``pa``, holding the source's bytes from ``logical``.

    ``logical`` is the offset in what was resolved (file offset, or offset
    from the start of the address range), so a caller can tell which part of
    its data lives where (and derive per-page logical tweaks).
    """

    pa: int
    length: int
    logical: int = 0

    @property
    def end(self) -> int:
        return self.pa + self.length

    def as_dict(self) -> dict[str, int]:
        return {"pa": self.pa, "length": self.length, "logical": self.logical}


def merge_extents(extents: Iterable[Extent]) -> list[Extent]:
    """Join neighbours that continue each other both physically and logically.

    Keeps the caller's order (file order, address order); never sorts, so two
    pieces that are adjacent physically but not logically stay apart.
    """
    merged: list[Extent] = []
    for ext in extents:
        if ext.length <= 0:
            continue
        last = merged[-1] if merged else None
        if last and last.end == ext.pa and last.logical + last.length == ext.logical:
            merged[-1] = Extent(last.pa, last.length + ext.length, last.logical)
        else:
            merged.append(ext)
    return merged


def _hex_or_int(text: str, where: Path) -> int:
    try:
        return int(text.strip(), 0)
    except ValueError:
        raise DeviceError(f"{where}: unexpected content {text.strip()!r}") from None


def read_sysfs_int(path: Path) -> int:
    """An integer sysfs attribute (decimal or 0x hex); DeviceError when absent or unreadable."""
    try:
        return _hex_or_int(path.read_text(), path)
    except OSError as exc:
        raise DeviceError(f"cannot read {path}: {exc.strerror or exc}") from exc


# -- pagemap -----------------------------------------------------------------------------

def mmap_address(mm: mmap.mmap) -> int:
    """The virtual address of a writable mmap object's first byte.

    The ctypes view is dropped at once: a live export would stop the mmap
    from being closed or resized.
    """
    import ctypes  # here: only mmap users need it, and it is slow to import in the guest

    view = ctypes.c_char.from_buffer(mm)
    try:
        return ctypes.addressof(view)
    finally:
        del view


def read_pfns(address: int, pages: int, pagemap: Path = Path("/proc/self/pagemap")) -> list[int | None]:
    """The PFN of each page from ``address`` (page-aligned); None where not present.

    A present page whose PFN reads 0 means the caller lacks CAP_SYS_ADMIN:
    that raises ResolveError instead of returning a wrong address.
    """
    if address % PAGE_SIZE:
        raise ResolveError("pagemap lookups start on a page boundary", f"address {address:#x}")
    try:
        with open(pagemap, "rb", buffering=0) as f:
            raw = os.pread(f.fileno(), pages * PAGEMAP_ENTRY.size,
                           address // PAGE_SIZE * PAGEMAP_ENTRY.size)
    except OSError as exc:
        raise ResolveError(f"cannot read {pagemap}: {exc.strerror or exc}") from exc
    if len(raw) != pages * PAGEMAP_ENTRY.size:
        raise ResolveError(f"short read from {pagemap}", f"address {address:#x}")
    pfns: list[int | None] = []
    for (entry,) in PAGEMAP_ENTRY.iter_unpack(raw):
        if not entry & PM_PRESENT:
            pfns.append(None)
        elif not entry & PM_PFN_MASK:
            raise ResolveError("pagemap hides PFNs: resolving needs root (CAP_SYS_ADMIN)")
        else:
            pfns.append(entry & PM_PFN_MASK)
    return pfns


def pagemap_extents(address: int, length: int,
                    pagemap: Path = Path("/proc/self/pagemap")) -> list[Extent]:
    """Physical extents of the bytes [address, address + length) of this process.

    Every page must be present (touch it first: :func:`mktme_guest.dax.touch`);
    a page that is not raises ResolveError naming its address.  Byte-exact:
    an unaligned start gives an extent that starts inside its page.
    """
    if length <= 0:
        raise ResolveError(f"length {length} is not positive", f"address {address:#x}")
    first = address - address % PAGE_SIZE
    pages = -(-(address + length - first) // PAGE_SIZE)
    extents = []
    for index, pfn in enumerate(read_pfns(first, pages, pagemap)):
        page_va = first + index * PAGE_SIZE
        if pfn is None:
            raise ResolveError("page not present (not faulted in, or swapped out)",
                               f"address {page_va:#x}")
        lo, hi = max(page_va, address), min(page_va + PAGE_SIZE, address + length)
        extents.append(Extent(pfn * PAGE_SIZE + lo - page_va, hi - lo, lo - address))
    return merge_extents(extents)


# -- FIEMAP --------------------------------------------------------------------------------

@dataclass(frozen=True)
class FileExtent:
    """One FIEMAP extent: ``length`` bytes of the file at ``logical`` live at ``physical``
    bytes into the filesystem's block device."""

    logical: int
    physical: int
    length: int
    flags: int

    @property
    def unwritten(self) -> bool:
        """Allocated but never written (reads as zeros; DAX zeroes it at first fault)."""
        return bool(self.flags & FIEMAP_EXTENT_UNWRITTEN)


def fiemap(fd: int, start: int = 0, length: int | None = None, sync: bool = True) -> list[FileExtent]:
    """The extents of an open file (FS_IOC_FIEMAP), in file order.

    ``sync`` asks the filesystem to write back first, so delayed allocations
    get their blocks.  Raises ResolveError when the filesystem has no FIEMAP.
    """
    end = (1 << 64) - 1 if length is None else start + length
    found: list[FileExtent] = []
    pos = start
    while pos < end:
        batch = _fiemap_batch(fd, pos, end - pos, FIEMAP_FLAG_SYNC if sync else 0)
        if not batch:
            break
        found.extend(batch)
        if batch[-1].flags & FIEMAP_EXTENT_LAST:
            break
        pos = batch[-1].logical + batch[-1].length
    return found


def _fiemap_batch(fd: int, start: int, length: int, flags: int) -> list[FileExtent]:
    buf = bytearray(FIEMAP_HEADER.size + FIEMAP_BATCH * FIEMAP_EXTENT.size)
    FIEMAP_HEADER.pack_into(buf, 0, start, min(length, (1 << 64) - 1 - start), flags, 0, FIEMAP_BATCH, 0)
    try:
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
    except OSError as exc:
        raise ResolveError(f"FIEMAP failed: {exc.strerror or exc}") from exc
    mapped = FIEMAP_HEADER.unpack_from(buf)[3]
    return [FileExtent(*FIEMAP_EXTENT.unpack_from(buf, FIEMAP_HEADER.size + i * FIEMAP_EXTENT.size))
            for i in range(mapped)]


# -- block devices and their physical start --------------------------------------------------

@dataclass(frozen=True)
class BlockDevice:
    """A block device as sysfs sees it: ``disk`` (e.g. pmem0) and where a partition starts."""

    name: str  # pmem0 or pmem0p1
    disk: str  # pmem0
    disk_dir: Path  # /sys/block/pmem0 (resolved)
    partition_start: int = 0  # bytes

    @property
    def size_file(self) -> Path:
        return (self.disk_dir / self.name / "size") if self.name != self.disk else self.disk_dir / "size"


def block_device(major: int, minor: int, sysfs: Path = SYSFS) -> BlockDevice:
    """The block device with this number, found through /sys/dev/block/MAJ:MIN."""
    node = sysfs / "dev" / "block" / f"{major}:{minor}"
    try:
        real = node.resolve(strict=True)
    except OSError as exc:
        raise DeviceError(f"no block device {major}:{minor} in {node.parent}") from exc
    if (real / "partition").exists():
        start = read_sysfs_int(real / "start") * SECTOR
        return BlockDevice(real.name, real.parent.name, real.parent, start)
    return BlockDevice(real.name, real.name, real)


def block_device_of(path: str | os.PathLike[str], sysfs: Path = SYSFS) -> BlockDevice:
    """The block device holding a file (its filesystem's device) or, for a device node, itself."""
    st = os.stat(path)
    dev = st.st_rdev if stat.S_ISBLK(st.st_mode) else st.st_dev
    return block_device(os.major(dev), os.minor(dev), sysfs)


def pmem_data_start(dev: BlockDevice) -> int:
    """The PA of byte 0 of the block device (``<disk>/device/resource`` + partition start).

    Only pmem disks in fsdax or raw mode map their bytes linearly onto the
    NVDIMM; a BTT (sector mode) disk remaps blocks and has no usable PA.
    """
    if not dev.disk.startswith("pmem"):
        raise DeviceError(f"{dev.name} is not a persistent-memory disk (pmemN)")
    if dev.disk.endswith("s"):
        raise DeviceError(f"{dev.disk} is a BTT (sector mode) disk: blocks have no fixed address")
    resource = dev.disk_dir / "device" / "resource"
    if not resource.exists():
        raise DeviceError(f"{dev.disk} has no {resource} (not an fsdax or raw namespace?)")
    return read_sysfs_int(resource) + dev.partition_start


def device_size(dev: BlockDevice) -> int:
    """Bytes of the block device (or partition): sysfs ``size`` is in 512-byte sectors."""
    return read_sysfs_int(dev.size_file) * SECTOR


def file_extents(path: str | os.PathLike[str], sysfs: Path = SYSFS,
                 start: int = 0, length: int | None = None) -> list[Extent]:
    """Physical extents of a file on a filesystem on a pmem disk, in file order.

    Syncs the file first.  Raises ResolveError when a part of the file has no
    plain physical location (delalloc, inline, encoded, a hole), DeviceError
    when the filesystem is not on a pmem disk.
    """
    base = pmem_data_start(block_device_of(path, sysfs))
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        raw = fiemap(fd, start, length)
    finally:
        os.close(fd)
    end = size if length is None else min(size, start + length)
    return _extents_from_fiemap(raw, base, start, end, os.fspath(path))


def _extents_from_fiemap(raw: list[FileExtent], base: int, start: int, end: int,
                         where: str) -> list[Extent]:
    """Clip FIEMAP extents to [start, end), add the device's PA, refuse holes and odd extents."""
    extents, pos = [], start
    for fe in raw:
        lo, hi = max(fe.logical, start), min(fe.logical + fe.length, end)
        if hi <= lo:
            continue
        if lo > pos:
            raise ResolveError(f"hole at file offset {pos:#x}: allocate the file first", where)
        bad = [name for bit, name in FIEMAP_EXTENT_UNUSABLE.items() if fe.flags & bit]
        if bad:
            raise ResolveError(f"extent at {fe.logical:#x} is {'/'.join(bad)}: no fixed address", where)
        extents.append(Extent(base + fe.physical + lo - fe.logical, hi - lo, lo))
        pos = hi
    if pos < end:
        raise ResolveError(f"hole at file offset {pos:#x}: allocate the file first", where)
    return merge_extents(extents)


# -- devdax --------------------------------------------------------------------------------

@dataclass(frozen=True)
class DaxRange:
    """A piece of a devdax device: device pages from ``pgoff`` live at PA [start, end)."""

    start: int
    end: int  # exclusive
    pgoff: int

    @property
    def length(self) -> int:
        return self.end - self.start


def dax_name(device: str | os.PathLike[str]) -> str:
    """``/dev/dax0.0`` or ``dax0.0`` -> ``dax0.0``."""
    name = Path(device).name
    if not name.startswith("dax"):
        raise DeviceError(f"{device} is not a device-DAX node (/dev/daxX.Y)")
    return name


def dax_ranges(device: str | os.PathLike[str], sysfs: Path = SYSFS) -> list[DaxRange]:
    """The physical ranges of a devdax device, in device order.

    Uses the ``mappingN/{start,end,page_offset}`` directories when present
    (``end`` is inclusive there), else ``resource`` + ``size``.
    """
    top = sysfs / "bus" / "dax" / "devices" / dax_name(device)
    if not top.exists():
        raise DeviceError(f"no device-DAX device {dax_name(device)} in {top.parent}")
    mappings = sorted(top.glob("mapping*"), key=lambda p: int(p.name[len("mapping"):] or 0))
    ranges = [DaxRange(read_sysfs_int(m / "start"), read_sysfs_int(m / "end") + 1,
                       read_sysfs_int(m / "page_offset")) for m in mappings]
    if not ranges:
        ranges = [DaxRange(read_sysfs_int(top / "resource"),
                           read_sysfs_int(top / "resource") + read_sysfs_int(top / "size"), 0)]
    return sorted(ranges, key=lambda r: r.pgoff)


def dax_align(device: str | os.PathLike[str], sysfs: Path = SYSFS) -> int:
    """The device's mapping alignment (mmap offsets and lengths must be multiples of it)."""
    attr = sysfs / "bus" / "dax" / "devices" / dax_name(device) / "align"
    return read_sysfs_int(attr) if attr.exists() else PAGE_SIZE


def dax_extents(device: str | os.PathLike[str], offset: int, length: int,
                sysfs: Path = SYSFS) -> list[Extent]:
    """Physical extents of bytes [offset, offset + length) of a devdax device."""
    extents, pos, end = [], offset, offset + length
    for r in dax_ranges(device, sysfs):
        lo_dev = r.pgoff * PAGE_SIZE
        hi_dev = lo_dev + r.length
        lo, hi = max(pos, lo_dev), min(end, hi_dev)
        if hi <= lo:
            continue
        if lo != pos:
            break
        extents.append(Extent(r.start + lo - lo_dev, hi - lo, lo - offset))
        pos = hi
    if pos < end or length <= 0:
        raise ResolveError(f"range {offset:#x}+{length:#x} is not inside the device",
                           dax_name(device))
    return merge_extents(extents)
