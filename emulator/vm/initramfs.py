"""The guest initramfs: busybox-static, the needed kernel modules, and init.sh.

We write the cpio (newc) archive ourselves rather than calling cpio(1): the
device nodes the kernel wants before devtmpfs (/dev/console, /dev/null) can be
written into the archive without root or mknod, the output is byte-for-byte
deterministic (fixed mtimes and inode numbers), so its content hash is a valid
cache key, and no temporary tree is needed.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import stat
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from mktme_emu.errors import ConfigError, VmError
from mktme_emu.vm.bootkernel import BootKernel
from mktme_emu.vm.kconfig import OPTION_MODULES, KernelConfig
from mktme_emu.vm.modules import ModuleInfo, builtin_modules, canonical, index_modules, read_module, resolve

#: The modules the guest needs, in load order of intent: pvpanic first so a
#: panic anywhere later is reported; then the virtio transport and the
#: console/9p that init needs; then NVDIMM, DAX and the filesystems.
GUEST_MODULES: tuple[str, ...] = (
    "pvpanic_pci",
    "virtio_pci", "virtio_console", "9pnet_virtio", "9p",
    "nfit", "nd_pmem", "nd_btt", "dax_pmem", "device_dax",
    "crc32c_generic", "ext4", "xfs", "overlay",
    # fscrypt's software ciphers (scenario fscrypt-offload): AES-256-XTS contents,
    # AES-256-CTS filenames, HMAC-SHA512 for its HKDF (aes, cbc, hmac are built in).
    "ecb", "xts", "cts", "sha512_generic",
    "overlay",  # /tmp and /var/tmp: the host's copy with a tmpfs upper layer
)

#: Loaded when the kernel first asks for them (a mount of that filesystem), not at
#: boot: together they are most of the initramfs (6.7 of 10.5 MB) and their
#: insmod most of init's time under TCG.  The kernel's request_module() runs
#: MODPROBE (init.sh points /proc/sys/kernel/modprobe at it), which loads the
#: chain ON_DEMAND_TABLE lists for the alias asked.
ON_DEMAND = frozenset({"crc32c_generic", "ext4", "xfs", "overlay"})
MODPROBE = "lib/modules/modprobe"
ON_DEMAND_TABLE = "lib/modules/on-demand"
_MODPROBE_SCRIPT = b"""#!/bin/sh
# request_module() helper of the mktme-emu initramfs: modprobe -q -- NAME
for arg; do name=$arg; done
while read -r alias mods; do
    [ "$alias" = "$name" ] || continue
    for mod in $mods; do insmod "/lib/modules/$mod" 2>/dev/null; done
    exit 0
done </lib/modules/on-demand
exit 1
"""

BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
FORMAT_VERSION = b"mktme-initramfs-2"


@dataclass(frozen=True)
class Entry:
    """One cpio member; ``data`` is the file body or the symlink target."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


# Cached initramfs images unused for this long are removed when a new one is built.
PRUNE_AFTER_DAYS = 14


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


def on_demand_table(chains: Sequence[Sequence[ModuleInfo]]) -> bytes:
    """``ALIAS MOD.ko...`` lines: each chain's last module by its name and aliases."""
    lines = []
    for chain in chains:
        if chain:
            files = " ".join(f"{m.name}.ko" for m in chain)
            lines += [f"{alias} {files}" for alias in (chain[-1].name, *chain[-1].aliases)]
    return ("\n".join(lines) + "\n").encode()


def build_entries(busybox: bytes, init: bytes, modules: Sequence[ModuleInfo],
                  on_demand: Sequence[Sequence[ModuleInfo]] = ()) -> list[Entry]:
    """The archive's members: a minimal tree, busybox, init, modules + their load order.

    ``on_demand``: chains (dependencies first) loaded by MODPROBE, not at boot.
    """
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
    packed: set[str] = set()
    for mod in [*modules, *(m for chain in on_demand for m in chain)]:
        if mod.name not in packed:
            packed.add(mod.name)
            entries.append(Entry(f"lib/modules/{mod.name}.ko", stat.S_IFREG | 0o644,
                                 read_module(mod.path)))
    order = [f"{mod.name}.ko" for mod in modules]
    entries.append(Entry("lib/modules/order", stat.S_IFREG | 0o644,
                         ("\n".join(order) + "\n").encode()))
    entries.append(Entry(ON_DEMAND_TABLE, stat.S_IFREG | 0o644, on_demand_table(on_demand)))
    entries.append(Entry(MODPROBE, f, _MODPROBE_SCRIPT))
    return entries


def cache_key(kernel: BootKernel, busybox: bytes, init: bytes,
              wanted: Sequence[str]) -> str:
    """Hash of everything that goes into the image, so a change rebuilds it."""
    digest = hashlib.sha256(FORMAT_VERSION)
    for part in (kernel.identity.encode(), kernel.release.encode(),
                 hashlib.sha256(busybox).digest(), init, ",".join(wanted).encode()):
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()[:16]


def modules_to_load(wanted: Sequence[str], config: KernelConfig | None) -> list[str]:
    """``wanted`` minus the modules whose option the config has off.

    Those are optional features (pvpanic) or one of two filesystems; a
    missing required option was already refused by the config check.
    Modules the table does not know are kept: resolving names what is missing.
    """
    if config is None:
        return list(wanted)
    option_of = {module: option for option, module in OPTION_MODULES.items()}
    return [m for m in wanted
            if m not in option_of or config.enabled(option_of[m]) is not False]


def builtin_names(kernel: BootKernel) -> frozenset[str]:
    """Modules the kernel has built in: modules.builtin plus the config's =y options."""
    names = set(builtin_modules(kernel.modules_dir)) if kernel.modules_dir else set()
    if kernel.config is not None:
        names |= {canonical(module) for option, module in OPTION_MODULES.items()
                  if kernel.config.options.get(option) == "y"}
    return frozenset(names)


def resolve_modules(kernel: BootKernel, wanted: Sequence[str]) -> list[ModuleInfo]:
    """The load order for ``wanted`` on ``kernel``; ConfigError naming a module it lacks."""
    if kernel.module_index is not None:
        index = kernel.module_index
    else:
        index = index_modules(kernel.modules_dir) if kernel.modules_dir else {}
    try:
        return resolve(wanted, index, builtin_names(kernel))
    except VmError as exc:
        where = f"in {kernel.modules_dir}" if kernel.modules_dir else "(no modules: pass --modules DIR)"
        raise ConfigError(f"{exc} {where}") from exc


def build_initramfs(kernel: BootKernel, cache: Path,
                    wanted: Sequence[str] = GUEST_MODULES) -> Path:
    """Return the path of the cpio for ``kernel``, building it if not cached.

    Raises ConfigError naming a module the kernel lacks, VmError when
    busybox-static is missing.  Writes atomically (temp file + rename), so
    concurrent runs are safe.
    """
    busybox = find_busybox().read_bytes()
    init = init_script()
    load = modules_to_load(wanted, kernel.config)
    target = cache / f"initramfs-{kernel.release}-{cache_key(kernel, busybox, init, load)}.img"
    if target.is_file():
        with contextlib.suppress(OSError):  # mark it used: pruning keeps what is in use
            os.utime(target)
        return target
    at_boot = resolve_modules(kernel, [m for m in load if m not in ON_DEMAND])
    loaded = {m.name for m in at_boot}
    chains = [[m for m in resolve_modules(kernel, [name]) if m.name not in loaded]
              for name in load if name in ON_DEMAND]
    archive = cpio_newc(build_entries(busybox, init, at_boot, chains))
    cache.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(gzip.compress(archive, compresslevel=6, mtime=0))
    tmp.replace(target)
    prune_initramfs(cache, keep=target)
    return target


def prune_initramfs(cache: Path, keep: Path, unused_days: float = PRUNE_AFTER_DAYS,
                    now: float | None = None) -> list[Path]:
    """Remove cached initramfs images not used for ``unused_days``; returns them.

    Every change of the init script, the module set or the kernel makes a
    new image (about 3 MB), so without this the cache only grows.  An image
    is touched each time it is used, so one a concurrent run may be about
    to boot is recent and stays.
    """
    limit = (time.time() if now is None else now) - unused_days * 86400
    removed = []
    for image in cache.glob("initramfs-*.img"):
        with contextlib.suppress(OSError):
            if image != keep and image.stat().st_mtime < limit:
                image.unlink()
                removed.append(image)
    return removed
