"""The guest initramfs: busybox-static, the needed kernel modules, and init.sh.

We write the cpio (newc) archive ourselves rather than calling cpio(1): the
device nodes the kernel wants before devtmpfs (/dev/console, /dev/null) can be
written into the archive without root or mknod, the output is byte-for-byte
deterministic (fixed mtimes and inode numbers), so its content hash is a valid
cache key, and no temporary tree is needed.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from mktme_emu.errors import VmError
from mktme_emu.vm.kernel import GuestKernel
from mktme_emu.vm.modules import ModuleInfo, read_module, resolve_in

#: The modules the guest needs, in load order of intent: pvpanic first so a
#: panic anywhere later is reported; then the virtio transport and the
#: console/9p that init needs; then NVDIMM, DAX and the filesystems.
GUEST_MODULES: tuple[str, ...] = (
    "pvpanic_pci",
    "virtio_pci", "virtio_console", "9pnet_virtio", "9p",
    "nfit", "nd_pmem", "nd_btt", "dax_pmem", "device_dax",
    "crc32c_generic", "ext4", "xfs",
    # fscrypt's software ciphers (scenario fscrypt-offload): AES-256-XTS contents,
    # AES-256-CTS filenames, HMAC-SHA512 for its HKDF (aes, cbc, hmac are built in).
    "ecb", "xts", "cts", "sha512_generic",
    "overlay",  # /tmp and /var/tmp: the host's copy with a tmpfs upper layer
)

BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
FORMAT_VERSION = b"mktme-initramfs-1"


@dataclass(frozen=True)
class Entry:
    """One cpio member; ``data`` is the file body or the symlink target."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def cpio_newc(entries: Iterable[Entry]) -> bytes:
    """Serialise entries as a cpio "newc" archive (the format the kernel unpacks)."""
    out = io.BytesIO()
    for ino, entry in enumerate([*entries, Entry("TRAILER!!!", 0)], start=1):
        name = entry.name.encode() + b"\0"
        fields = (ino, entry.mode, 0, 0, 1, 0, len(entry.data), 0, 0,
                  entry.rdev[0], entry.rdev[1], len(name), 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        out.write(header + name)
        out.write(b"\0" * (-(len(header) + len(name)) % 4))
        out.write(entry.data)
        out.write(b"\0" * (-len(entry.data) % 4))
    return out.getvalue()


def find_busybox() -> Path:
    """The host's static busybox (package busybox-static); a dynamic one would not run."""
    for candidate in BUSYBOX_CANDIDATES:
        path = Path(candidate)
        if path.is_file() and b"/lib64/ld-linux" not in path.read_bytes()[:4096]:
            return path
    raise VmError("static busybox not found: install busybox-static (make setup)")


def init_script() -> bytes:
    """The guest init shipped as package data next to this module."""
    return resources.files("mktme_emu.vm").joinpath("init.sh").read_bytes()


def build_entries(busybox: bytes, init: bytes, modules: Sequence[ModuleInfo]) -> list[Entry]:
    """The archive's members: a minimal tree, busybox, init, modules + their load order."""
    d, f, lnk = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o755, stat.S_IFLNK | 0o777
    entries = [Entry(name, d) for name in
               ("bin", "sbin", "dev", "proc", "sys", "tmp", "newroot", "lib", "lib/modules")]
    entries += [
        Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        Entry("dev/null", stat.S_IFCHR | 0o666, rdev=(1, 3)),
        Entry("bin/busybox", f, busybox),
        Entry("init", f, init),
    ]
    applets = ("sh", "mount", "insmod", "cat", "ln", "mkdir", "chroot", "poweroff", "sync",
               "sleep", "usleep", "ls", "grep", "base64", "setsid", "stty", "echo", "chmod", "printf", "tr")
    entries += [Entry(f"bin/{a}", lnk, b"busybox") for a in applets]
    order = []
    for mod in modules:
        flat = f"{mod.name}.ko"
        entries.append(Entry(f"lib/modules/{flat}", stat.S_IFREG | 0o644, read_module(mod.path)))
        order.append(flat)
    entries.append(Entry("lib/modules/order", stat.S_IFREG | 0o644,
                         ("\n".join(order) + "\n").encode()))
    return entries


def cache_key(kernel: GuestKernel, busybox: bytes, init: bytes,
              wanted: Sequence[str]) -> str:
    """Hash of everything that goes into the image, so a change rebuilds it."""
    digest = hashlib.sha256(FORMAT_VERSION)
    for part in (kernel.sha256.encode(), kernel.release.encode(),
                 hashlib.sha256(busybox).digest(), init, ",".join(wanted).encode()):
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()[:16]


def build_initramfs(kernel: GuestKernel, cache: Path,
                    wanted: Sequence[str] = GUEST_MODULES) -> Path:
    """Return the path of the gzip'd cpio for ``kernel``, building it if not cached.

    Raises VmError naming a module the kernel lacks, or when busybox-static is
    missing.  Writes atomically (temp file + rename), so concurrent runs are safe.
    """
    busybox = find_busybox().read_bytes()
    init = init_script()
    target = cache / f"initramfs-{kernel.release}-{cache_key(kernel, busybox, init, wanted)}.img"
    if target.is_file():
        return target
    modules = resolve_in(kernel.modules_dir, wanted)
    archive = cpio_newc(build_entries(busybox, init, modules))
    cache.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(gzip.compress(archive, compresslevel=6, mtime=0))
    tmp.replace(target)
    return target
