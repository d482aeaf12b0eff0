"""The Python API for guest tests: DAX mmaps, files and devices under a KeyID.

The emulated ``encrypt_mprotect()``: find the physical pages behind what the
caller has (an mmap, a file, a devdax range), turn them into data-area
offsets with the NVDIMM base from ``config()``, and ask the backend to map
each contiguous extent with the KeyID.  As on hardware, what the pages held
reads as garbage through the new KeyID: initialise them afterwards.

Every function takes an optional ``client`` (from :func:`mktme_guest.channel.connect`);
without one it connects for the call and closes again.  They block on the
control channel and raise :class:`~mktme_guest.errors.ResolveError`,
:class:`~mktme_guest.errors.DeviceError`, ``RemoteError`` (the backend
refused: unaligned, out of range, bad KeyID) or ``ChannelError``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mktme_emu.protocol import Client, FlushReply

from . import physaddr
from .channel import connect
from .errors import DeviceError, ResolveError
from .physaddr import PAGE_SIZE, Extent

log = logging.getLogger("mktme_guest")

MAP_SHARED = 0x01
MAP_SHARED_VALIDATE = 0x03
MAP_SYNC = 0x80000

Target = mmap.mmap | int  # an mmap object, or a virtual address in this process


@contextlib.contextmanager
def _client(client: Client | None) -> Iterator[Client]:
    """The caller's client, or a fresh one closed on exit."""
    if client is not None:
        yield client
        return
    own = connect()
    try:
        yield own
    finally:
        own.close()


@dataclass(frozen=True)
class DataArea:
    """Where the NVDIMM's data area sits in the physical map (from GET_CONFIG)."""

    base: int
    size: int

    @classmethod
    def of(cls, client: Client) -> DataArea:
        cfg = client.config()
        return cls(cfg.base, cfg.size)

    def offset(self, ext: Extent) -> int:
        """The data-area offset of an extent; ResolveError when it is not on the NVDIMM."""
        if not (self.base <= ext.pa and ext.end <= self.base + self.size):
            raise ResolveError(f"physical range {ext.pa:#x}+{ext.length:#x} is not on the NVDIMM "
                               f"({self.base:#x}+{self.size:#x}): RAM, or the zero page of a hole?")
        return ext.pa - self.base


FILE_HINT = " (filesystem block size below 4096?)"


def page_extents(extents: list[Extent], round_tail: bool = False, hint: str = "") -> list[Extent]:
    """Check extents are whole pages (rounding the very last one up when ``round_tail``).

    A file's last block may be partly past EOF but still belongs to the file;
    anything else unaligned means blocks smaller than a page: ResolveError.
    """
    out = []
    for i, ext in enumerate(extents):
        length = ext.length
        if round_tail and i == len(extents) - 1:
            length = -(-length // PAGE_SIZE) * PAGE_SIZE
        if ext.pa % PAGE_SIZE or length % PAGE_SIZE or ext.logical % PAGE_SIZE:
            raise ResolveError(f"extent {ext.pa:#x}+{ext.length:#x} is not whole 4 KiB pages{hint}")
        out.append(Extent(ext.pa, length, ext.logical))
    return out


def map_extents(client: Client, extents: list[Extent], keyid: int,
                logical_tweak: int | None = None) -> list[tuple[int, int]]:
    """MAP each extent with ``keyid``; returns the (offset, length) pairs mapped.

    With ``logical_tweak`` T, the page at logical byte L gets page tweak
    T + L / 4096: the whole range reads as one run of pages T, T+1, ...
    wherever its pieces lie.
    """
    area = DataArea.of(client)
    # Every extent is checked before the first MAP: a bad one refuses the whole
    # call with no page re-keyed (encrypt_mprotect is all or nothing).
    planned = [(area.offset(ext), ext.length,
                None if logical_tweak is None else logical_tweak + ext.logical // PAGE_SIZE)
               for ext in page_extents(extents)]
    for offset, length, tweak in planned:
        client.map(offset, length, keyid, tweak)
    return [(offset, length) for offset, length, _ in planned]


def flush_extents(client: Client, extents: list[Extent]) -> FlushReply:
    """FLUSH the pages covering each extent (durable on return): the replies summed."""
    area = DataArea.of(client)
    written = unwritable = 0
    for ext in extents:
        start = ext.pa - ext.pa % PAGE_SIZE
        end = -(-ext.end // PAGE_SIZE) * PAGE_SIZE
        reply = client.flush(area.offset(Extent(start, end - start)), end - start)
        written, unwritable = written + reply.written, unwritable + reply.unwritable
    return FlushReply(written, unwritable)


# -- mmaps ------------------------------------------------------------------------------------

def address_of(target: Target) -> int:
    """The virtual address of an mmap object (or the address itself)."""
    return target if isinstance(target, int) else physaddr.mmap_address(target)


def touch(target: Target, length: int, write: bool = False) -> None:
    """Fault in every page of [target, target + length) so pagemap can see it.

    ``write`` rewrites one byte per page with itself: needed on a DAX file,
    where a read fault on a hole or unwritten extent maps the shared zero
    page instead of the file's block.  An address must be mapped in this
    process: an unmapped one crashes it, as it would crash a C caller.
    """
    address = address_of(target)
    first = address - address % PAGE_SIZE
    for page in range(first, address + length, PAGE_SIZE):
        cell = ctypes.c_char.from_address(max(page, address))
        value = cell.value
        if write:
            cell.value = value


def resolve_range(target: Target, length: int, write: bool = False) -> list[Extent]:
    """Touch then resolve an address range of this process to physical extents."""
    touch(target, length, write)
    return physaddr.pagemap_extents(address_of(target), length)


def encrypt_mprotect(target: Target, length: int, keyid: int, *, logical_tweak: int | None = None,
                     client: Client | None = None) -> list[Extent]:
    """Give the DAX pages behind [target, target + length) the KeyID ``keyid``.

    Like the MKTME patches' ``encrypt_mprotect(addr, len, prot, keyid)``:
    the start must be page-aligned, the length is rounded up to pages.
    Faults every page in (writing, so holes get real blocks), resolves PAs
    through pagemap, maps each contiguous extent.  Returns the extents.
    Raises ResolveError when a page is not on the NVDIMM.
    """
    address = address_of(target)
    if address % PAGE_SIZE:
        raise ResolveError("encrypt_mprotect needs a page-aligned start", f"address {address:#x}")
    length = -(-length // PAGE_SIZE) * PAGE_SIZE
    extents = resolve_range(address, length, write=True)
    with _client(client) as c:
        map_extents(c, extents, keyid, logical_tweak)
    return extents


def msync(mm: mmap.mmap) -> None:
    """msync() a shared mapping, tolerating device DAX (it has no fsync: EINVAL).

    On real hardware a devdax program flushes CPU caches itself (clwb); in
    the emulator the guest's stores are in the view as soon as they retire.
    """
    try:
        mm.flush()
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise


def flush_range(target: Target, length: int, *, client: Client | None = None) -> int:
    """Make [target, target + length) durable on the media; returns pages written back.

    msync()s an mmap object first (CPU caches to the DIMM, as a real program
    would), then asks the backend to write back the pages it covers.
    """
    if isinstance(target, mmap.mmap):
        start = address_of(target)
        msync(target)
        target = start
    extents = resolve_range(target, length)
    with _client(client) as c:
        return flush_extents(c, extents).written


@dataclass
class DaxMap:
    """A shared mapping of a DAX file or device, and whether MAP_SYNC took."""

    path: str
    mm: mmap.mmap = field(repr=False)
    offset: int
    length: int
    map_sync: bool

    @property
    def address(self) -> int:
        return address_of(self.mm)

    def at(self, offset: int) -> int:
        """The virtual address of byte ``offset`` of the file or device (inside the mapping)."""
        if not self.offset <= offset <= self.offset + self.length:
            raise ResolveError(f"offset {offset:#x} is outside this mapping", self.path)
        return self.address + offset - self.offset

    def read(self, offset: int, length: int) -> bytes:
        """Bytes [offset, offset + length) of the file or device, through the mapping."""
        rel = offset - self.offset
        return bytes(self.mm[rel:rel + length])

    def write(self, offset: int, data: bytes) -> None:
        """Store ``data`` at byte ``offset`` of the file or device, through the mapping."""
        rel = offset - self.offset
        self.mm[rel:rel + len(data)] = data

    def close(self) -> None:
        self.mm.close()

    def __enter__(self) -> DaxMap:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def mmap_dax(path: str | os.PathLike[str], length: int, offset: int = 0, *,
             sync: bool = True) -> DaxMap:
    """mmap ``length`` bytes of a DAX file or devdax device read-write, shared.

    With ``sync``, asks for MAP_SHARED_VALIDATE | MAP_SYNC (writes are
    durable once they leave the CPU, no fsync needed for metadata); a kernel
    or filesystem that refuses it (EOPNOTSUPP, or EINVAL from kernels that do
    not know MAP_SHARED_VALIDATE) gets plain MAP_SHARED, logged, and
    ``map_sync`` False in the result.
    """
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        if sync:
            try:
                return DaxMap(os.fspath(path), _mmap(fd, length, offset, MAP_SHARED_VALIDATE | MAP_SYNC),
                              offset, length, True)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise DeviceError(f"cannot mmap {path}: {exc.strerror}") from exc
                log.info("%s: MAP_SYNC refused (%s); using MAP_SHARED", path, exc.strerror)
        try:
            return DaxMap(os.fspath(path), _mmap(fd, length, offset, MAP_SHARED), offset, length, False)
        except (OSError, ValueError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else str(exc)
            raise DeviceError(f"cannot mmap {length:#x} bytes at {offset:#x} of {path}: {why}") from exc
    finally:
        os.close(fd)


def _mmap(fd: int, length: int, offset: int, flags: int) -> mmap.mmap:
    return mmap.mmap(fd, length, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)


def mmap_device(device: str | os.PathLike[str], offset: int, length: int, *,
                sync: bool = True) -> DaxMap:
    """mmap the devdax window covering [offset, offset + length), rounded out to the device's
    alignment (device DAX refuses anything else); use :meth:`DaxMap.at` for addresses."""
    align = physaddr.dax_align(device)
    start = offset - offset % align
    end = -(-(offset + length) // align) * align
    return mmap_dax(device, end - start, start, sync=sync)


# -- files and devices --------------------------------------------------------------------------

def map_file(path: str | os.PathLike[str], keyid: int, *, logical_tweak: int | None = None,
             client: Client | None = None) -> list[Extent]:
    """Give every block of a file on an fsdax filesystem the KeyID ``keyid`` (FIEMAP).

    The file must be fully allocated (written, or fallocated and synced);
    a hole raises ResolveError.  The tail block is mapped whole.  Returns
    the extents (physical, with file offsets as ``logical``).
    """
    extents = page_extents(physaddr.file_extents(path), round_tail=True, hint=FILE_HINT)
    with _client(client) as c:
        map_extents(c, extents, keyid, logical_tweak)
    return extents


def map_device_range(device: str | os.PathLike[str], offset: int, length: int, keyid: int, *,
                     logical_tweak: int | None = None, client: Client | None = None) -> list[Extent]:
    """Give bytes [offset, offset + length) of a devdax device the KeyID ``keyid`` (sysfs ranges)."""
    extents = physaddr.dax_extents(device, offset, length)
    with _client(client) as c:
        map_extents(c, extents, keyid, logical_tweak)
    return extents


def namespace_extents(device: str | os.PathLike[str]) -> list[Extent]:
    """The physical extents of everything a namespace's device exposes.

    ``/dev/pmemN`` (fsdax or raw): from ``device/resource`` for the disk's
    size; ``/dev/daxX.Y``: its ranges.  Not the namespace's info block or
    memmap reserve: those are the kernel's, and mapping them with a KeyID
    would feed the kernel garbage struct pages.
    """
    name = Path(device).name
    if name.startswith("dax"):
        return [Extent(r.start, r.length, r.pgoff * PAGE_SIZE) for r in physaddr.dax_ranges(device)]
    dev = physaddr.block_device_of(device)
    return [Extent(physaddr.pmem_data_start(dev), physaddr.device_size(dev))]


def map_namespace(device: str | os.PathLike[str], keyid: int, *,
                  client: Client | None = None) -> list[Extent]:
    """One key per namespace: map everything the device exposes with ``keyid``.

    The caller programs the key first and drops the block device's page
    cache afterwards (see :func:`mktme_guest.system.drop_caches`).
    """
    extents = namespace_extents(device)
    with _client(client) as c:
        map_extents(c, extents, keyid)
    return extents
