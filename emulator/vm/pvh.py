"""Boot the kernel's ELF image through its PVH entry point instead of the bzImage.

Under TCG a bzImage boot spends seconds before the kernel's clock starts:
SeaBIOS loads the image and the kernel's own decompressor unpacks it (Debian's
is XZ), all emulated instruction by instruction (measured: 4.4-5.0 s of a
7-11 s boot).  A kernel built with CONFIG_PVH carries an ELF note
(XEN_ELFNOTE_PHYS32_ENTRY) that lets QEMU load the uncompressed ELF itself
and jump straight to it: that part drops to well under a second.

So we decompress the bzImage's payload once on the host (Python's lzma, gzip
and bz2; zstd through the zstd tool), keep the ELF in the cache keyed by the
kernel's identity, and give QEMU that.  A kernel without the note, or with a
payload we cannot unpack, boots as before from its bzImage.
"""

from __future__ import annotations

import bz2
import contextlib
import lzma
import os
import shutil
import struct
import subprocess
import zlib
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

XEN_ELFNOTE_PHYS32_ENTRY = 18
KEEP = 4  # cached ELF images (tens of MB each): a kernel developer rebuilds often
#: Where the compressed payload starts, by the magic of each format the kernel supports.
_MAGICS: tuple[tuple[bytes, str], ...] = (
    (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"), (b"\x1f\x8b\x08", "gzip"),
    (b"BZh", "bzip2"), (b"\x5d\x00\x00", "lzma"),
)


def _unzstd(data: bytes) -> bytes:
    if shutil.which("zstd") is None:
        raise OSError("zstd tool not installed")
    proc = subprocess.run(["zstd", "-dcq"], input=data, capture_output=True, check=False)
    if not proc.stdout.startswith(b"\x7fELF"):
        raise OSError(f"zstd exit {proc.returncode}")
    return proc.stdout


def _first_stream(fmt: str, data: bytes) -> bytes:
    """Decompress the stream at the start of ``data``, ignoring what follows it."""
    if fmt in ("xz", "lzma"):
        kind = lzma.FORMAT_XZ if fmt == "xz" else lzma.FORMAT_ALONE
        return lzma.LZMADecompressor(format=kind).decompress(data)
    if fmt == "gzip":
        return zlib.decompressobj(wbits=31).decompress(data)
    if fmt == "bzip2":
        return bz2.BZ2Decompressor().decompress(data)
    return _unzstd(data)


def extract_elf(image: bytes) -> bytes | None:
    """The uncompressed ELF kernel inside a bzImage, or None when no known payload unpacks."""
    if len(image) < 0x200:
        return None
    setup_sects = image[0x1F1] or 4
    start = (setup_sects + 1) * 512  # the protected-mode part, where the payload lives
    for magic, fmt in _MAGICS:
        offset = image.find(magic, start)
        while offset != -1:
            try:
                elf = _first_stream(fmt, image[offset:])
            except (lzma.LZMAError, OSError, EOFError, ValueError, zlib.error):
                elf = b""
            if elf.startswith(b"\x7fELF"):
                return elf
            offset = image.find(magic, offset + 1)
    return None


def has_pvh_entry(elf: bytes) -> bool:
    """True when the ELF carries a Xen PHYS32_ENTRY note: QEMU can boot it directly."""
    try:
        segments = list(ELFFile(BytesIO(elf)).iter_segments("PT_NOTE"))
    except ELFError:
        return False
    for segment in segments:
        data, pos = segment.data(), 0
        while pos + 12 <= len(data):
            namesz, descsz, kind = struct.unpack_from("<III", data, pos)
            name = data[pos + 12:pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and kind == XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def direct_boot_image(image: Path, identity: str, cache: Path,
                      progress: Callable[[str], None]) -> Path | None:
    """The cached PVH-bootable ELF of ``image`` (made on first use), or None to boot the bzImage.

    Blocks about a second the first time for a Debian kernel (XZ); writes
    atomically, so concurrent runs are safe.
    """
    target = cache / f"vmlinux-pvh-{identity[:16]}"
    if target.is_file():
        with contextlib.suppress(OSError):
            target.touch()  # recently used: kept by _prune
        return target
    if (cache / f"{target.name}.none").exists():
        return None
    elf = extract_elf(image.read_bytes())
    cache.mkdir(parents=True, exist_ok=True)
    if elf is None or not has_pvh_entry(elf):
        progress(f"kernel: {image.name} has no PVH entry (CONFIG_PVH): booting the bzImage")
        (cache / f"{target.name}.none").touch()
        return None
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(elf)
    tmp.replace(target)
    _prune(cache)
    return target


def _prune(cache: Path) -> None:
    """Keep the KEEP most recently used images; a run using an older one has it open."""
    names = [p for p in cache.glob("vmlinux-pvh-*") if len(p.name) == len("vmlinux-pvh-") + 16]
    images = sorted(names, key=lambda p: p.stat().st_mtime, reverse=True)
    for old in images[KEEP:]:
        with contextlib.suppress(OSError):
            old.unlink()

