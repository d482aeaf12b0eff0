"""The kernel a VM boots: Debian's cached one, or the user's own (``--kernel``).

A kernel developer points ``--kernel`` at a bzImage/vmlinuz or at a kernel
build tree (its ``arch/x86/boot/bzImage``, ``.config``, ``vmlinux`` and built
``.ko`` files), and optionally ``--modules`` at an ``INSTALL_MOD_PATH`` tree
or a modules directory.  Everything downstream (config check, initramfs,
gdb hint) works from one :class:`BootKernel`, whoever built the kernel.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mktme_emu.errors import ConfigError
from mktme_emu.vm.kconfig import KernelConfig, config_from_modules, read_config, require
from mktme_emu.vm.kernel import GuestKernel, fetch_kernel
from mktme_emu.vm.modules import builtin_modules, index_modules

#: bzImage setup header (Documentation/arch/x86/boot.rst): "HdrS" at 0x202,
#: and at 0x20E the offset (from 0x200) of the NUL-terminated version string.
_HDRS_OFFSET, _VERSION_PTR = 0x202, 0x20E
TREE_IMAGE = Path("arch/x86/boot/bzImage")
DEBUG_SYMBOLS = Path("/usr/lib/debug/boot")  # where Debian's -dbg package puts vmlinux-R


@dataclass(frozen=True)
class BootKernel:
    """A bootable kernel and what belongs to it."""

    image: Path  # what QEMU's -kernel gets
    release: str  # uname -r, from the image header
    identity: str  # changes when the image or its modules change (initramfs cache key)
    modules_dir: Path | None = None  # where its .ko files are (None: all built in)
    config: KernelConfig | None = None  # None: no .config found and no modules to infer from
    vmlinux: Path | None = None  # the unstripped image, for gdb
    debian_package: str | None = None  # linux-image-R when it is Debian's
    module_index: Mapping[str, Path] | None = field(default=None, compare=False, repr=False)

    def gdb_hint(self, port: int) -> str:
        """How to attach gdb to this kernel's stub, naming only symbol files that exist."""
        remote = f"-ex 'target remote 127.0.0.1:{port}'"
        if self.vmlinux is not None:
            return f"gdb {remote} {self.vmlinux}"
        if self.debian_package:
            return (f"gdb {remote} /usr/lib/debug/boot/vmlinux-{self.release}  (the symbols "
                    f"come from the {self.debian_package}-dbg package; vmlinuz has none)")
        return (f"gdb {remote} VMLINUX  (no vmlinux found next to {self.image}: "
                f"pass --kernel a build tree to get its symbols)")


def image_version(image: Path) -> str:
    """The version string of a bzImage's setup header ("6.1.0-56-amd64 (debian-kernel@...) #1 ...").

    Raises ConfigError when the file is not an x86 bzImage (QEMU could not boot it).
    """
    try:
        with image.open("rb") as f:
            head = f.read(0x10000)
    except OSError as exc:
        raise ConfigError(f"cannot read the kernel image {image}: {exc.strerror}") from exc
    if head[_HDRS_OFFSET:_HDRS_OFFSET + 4] != b"HdrS":
        raise ConfigError(f"{image} is not an x86 bzImage (no HdrS boot header)")
    (pointer,) = struct.unpack_from("<H", head, _VERSION_PTR)
    start = 0x200 + pointer
    end = head.find(b"\0", start)
    return head[start:end].decode(errors="replace") if 0 < start < end else ""


def _debian_package(version: str, release: str) -> str | None:
    """linux-image-R for a kernel Debian built (its builder address is in the version)."""
    return f"linux-image-{release}" if "debian-kernel@lists.debian.org" in version else None


def from_debian(kernel: GuestKernel) -> BootKernel:
    """Debian's cached package as a BootKernel (its /boot/config-R is in the package)."""
    config_path = kernel.root / "boot" / f"config-{kernel.release}"
    return BootKernel(
        image=kernel.vmlinuz, release=kernel.release, identity=kernel.sha256,
        modules_dir=kernel.modules_dir,
        config=read_config(config_path) if config_path.is_file() else None,
        vmlinux=_debug_vmlinux(kernel.release), debian_package=kernel.package)


def _debug_vmlinux(release: str) -> Path | None:
    candidate = DEBUG_SYMBOLS / f"vmlinux-{release}"
    return candidate if candidate.is_file() else None


def modules_root(directory: Path, release: str) -> Path:
    """The directory holding the modules of ``release`` under ``--modules DIR``.

    DIR may be an INSTALL_MOD_PATH tree (DIR/lib/modules/R), a lib/modules
    directory (DIR/R), or the modules directory itself.  ConfigError when it
    holds modules for other releases only: insmod would refuse every one.
    """
    if not directory.is_dir():
        raise ConfigError(f"--modules {directory}: not a directory")
    for parent in (directory / "lib" / "modules", directory):
        if (parent / release).is_dir():
            return parent / release
    if (directory / "lib" / "modules").is_dir():
        found = sorted(p.name for p in (directory / "lib" / "modules").iterdir() if p.is_dir())
        raise ConfigError(f"--modules {directory} has modules for {', '.join(found) or 'nothing'}, "
                          f"not for the kernel's release {release}")
    return directory


def _fingerprint(image: Path, index: Mapping[str, Path], extra: tuple[Path, ...]) -> str:
    """sha256 of the image plus size/mtime of every module and config file."""
    digest = hashlib.sha256()
    with image.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    for path in sorted({*index.values(), *extra}):
        with_stat = path.stat() if path.exists() else None
        if with_stat is not None:
            digest.update(f"{path}\0{with_stat.st_size}\0{with_stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _find_config(image: Path, release: str, modules_dir: Path | None) -> Path | None:
    """A .config for a bare image: config-R beside it (Debian's /boot), or a .config there."""
    candidates = [image.parent / f"config-{release}", image.parent / ".config"]
    if modules_dir is not None and modules_dir.parent.name == "modules":
        # INSTALL_MOD_PATH/lib/modules/R -> INSTALL_MOD_PATH/boot/config-R (an unpacked .deb)
        candidates.append(modules_dir.parents[2] / "boot" / f"config-{release}")
    return next((c for c in candidates if c.is_file()), None)


def user_kernel(path: Path, modules: Path | None = None) -> BootKernel:
    """The kernel at ``path`` (a bzImage or a build tree), with ``modules`` if given.

    Raises ConfigError (one line) for a path that is neither, or modules for
    another release.  Reads files only; builds nothing.
    """
    path = path.expanduser().resolve()
    tree = path if path.is_dir() else None
    image = path / TREE_IMAGE if tree else path
    if tree is not None and not image.is_file():
        raise ConfigError(f"{tree} is a directory but has no {TREE_IMAGE}: build it "
                          "(make bzImage) or pass the image itself")
    if not image.is_file():
        raise ConfigError(f"--kernel {path}: no such file or directory")
    version = image_version(image)
    release = version.split(" ", 1)[0]
    if tree is not None and (tree / "include/config/kernel.release").is_file():
        release = (tree / "include/config/kernel.release").read_text().strip() or release
    modules_dir = modules_root(modules.expanduser().resolve(), release) if modules else tree
    config_path = tree / ".config" if tree else _find_config(image, release, modules_dir)
    index = index_modules(modules_dir) if modules_dir is not None else {}
    config = _config(tree, config_path, modules_dir, index)
    vmlinux = tree / "vmlinux" if tree and (tree / "vmlinux").is_file() else None
    if vmlinux is None and (image.parent / "vmlinux").is_file():
        vmlinux = image.parent / "vmlinux"
    extras = tuple(p for p in (config_path,) if p is not None)
    return BootKernel(image=image, release=release,
                      identity=_fingerprint(image, index, extras), modules_dir=modules_dir,
                      config=config, vmlinux=vmlinux or _debug_vmlinux(release),
                      debian_package=_debian_package(version, release), module_index=index)


def _config(tree: Path | None, config_path: Path | None, modules_dir: Path | None,
            index: Mapping[str, Path]) -> KernelConfig | None:
    if config_path is not None and config_path.is_file():
        return read_config(config_path)
    if tree is not None:
        raise ConfigError(f"{tree} has no .config: is it a configured kernel build tree?")
    if modules_dir is not None:
        listed = (modules_dir / "modules.builtin").is_file()
        return config_from_modules(index, builtin_modules(modules_dir) if listed else None,
                                   f"inferred from the modules in {modules_dir}")
    return None


def select_kernel(path: Path | None, modules: Path | None, cache: Path, ns_mode: str | None,
                  progress: Callable[[str], None]) -> BootKernel:
    """The kernel to boot, checked: the user's (``--kernel``) or Debian's (fetched if needed).

    Raises ConfigError listing every option the emulator needs and the
    kernel's config lacks; warns (``progress``) about optional ones and about
    a kernel whose config cannot be found.
    """
    if path is None:
        if modules is not None:
            raise ConfigError("--modules needs --kernel (Debian's kernel brings its own modules)")
        kernel = from_debian(fetch_kernel(cache, progress=progress))
    else:
        kernel = user_kernel(path, modules)
    if kernel.config is None:
        progress(f"kernel: no config found for {kernel.image} (put config-{kernel.release} "
                 "beside it, or pass --modules): its options are not checked")
        return kernel
    result = require(str(kernel.image), kernel.config, ns_mode)
    for need in result.optional_missing:
        progress(f"kernel: without {need.describe()}")
    if result.unknown:
        progress(f"kernel: cannot check {', '.join(f'CONFIG_{o}' for o in result.unknown)} "
                 f"({kernel.config.source})")
    return kernel
