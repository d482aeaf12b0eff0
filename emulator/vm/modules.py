"""Kernel module dependency resolution without depmod.

The host has no kmod, and the guest kernel is not the host's, so we read each
``.ko``'s ``.modinfo`` ELF section (``depends=`` and ``name=``) with pyelftools
and order the closure of the requested modules so that every module comes after
its dependencies: the order busybox ``insmod`` (which does not resolve
anything itself) needs.
"""

from __future__ import annotations

import gzip
import lzma
import shutil
import subprocess
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from mktme_emu.errors import VmError

#: Suffixes a module file may carry (Debian 6.1 ships plain .ko; later ones .ko.xz;
#: ``make modules_install`` compresses as CONFIG_MODULE_COMPRESS_* says).
MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.gz", ".ko.zst")


def canonical(name: str) -> str:
    """Module names treat '-' and '_' alike (pvpanic-pci.ko is module pvpanic_pci)."""
    return name.replace("-", "_")


@dataclass(frozen=True)
class ModuleInfo:
    """One module file and the modules it needs loaded first."""

    name: str
    path: Path
    depends: tuple[str, ...]
    aliases: tuple[str, ...] = ()  # what request_module() may ask for (fs-ext4, crypto-crc32c)


def read_module(path: Path) -> bytes:
    """Return the ELF bytes of a module, decompressing .ko.xz/.ko.gz/.ko.zst.

    busybox insmod takes plain ELF only, so the initramfs holds them
    decompressed.  zstd has no module in Python 3.11's library: the zstd tool.
    """
    data = path.read_bytes()
    try:
        if path.name.endswith(".xz"):
            return lzma.decompress(data)
        if path.name.endswith(".gz"):
            return gzip.decompress(data)
        if path.name.endswith(".zst"):
            return _unzstd(path, data)
    except (lzma.LZMAError, OSError, EOFError, zlib.error) as exc:
        raise VmError(f"cannot decompress kernel module {path}: {exc}") from exc
    return data


def _unzstd(path: Path, data: bytes) -> bytes:
    if shutil.which("zstd") is None:
        raise VmError(f"{path} is zstd-compressed and the zstd tool is not installed "
                      "(apt install zstd, or build with CONFIG_MODULE_COMPRESS_NONE)")
    proc = subprocess.run(["zstd", "-dc"], input=data, capture_output=True, check=False)
    if proc.returncode:
        raise VmError(f"cannot decompress kernel module {path}: zstd exit {proc.returncode}")
    return proc.stdout


def parse_modinfo(data: bytes) -> dict[str, list[str]]:
    """Parse the NUL-separated ``key=value`` records of a module's .modinfo section."""
    try:
        elf = ELFFile(BytesIO(data))
        section = elf.get_section_by_name(".modinfo")
    except ELFError as exc:
        raise VmError(f"not a kernel module (bad ELF): {exc}") from exc
    info: dict[str, list[str]] = {}
    if section is None:
        return info
    for record in section.data().split(b"\0"):
        key, sep, value = record.decode("utf-8", "replace").partition("=")
        if sep:
            info.setdefault(key, []).append(value)
    return info


def module_info(path: Path) -> ModuleInfo:
    """Read one module's name and dependencies from its .modinfo section."""
    info = parse_modinfo(read_module(path))
    stem = path.name.split(".ko")[0]
    name = canonical(info.get("name", [stem])[0])
    deps = tuple(canonical(d) for d in ",".join(info.get("depends", [])).split(",") if d)
    return ModuleInfo(name=name, path=path, depends=deps, aliases=tuple(info.get("alias", [])))


def _module_name(filename: str) -> str | None:
    for suffix in MODULE_SUFFIXES:
        if filename.endswith(suffix):
            return canonical(filename[: -len(suffix)])
    return None


def _listed_modules(modules_dir: Path) -> dict[str, Path] | None:
    """The modules ``modules.order`` lists, when every one is there (else None).

    A kernel build tree is tens of thousands of files; its modules.order
    (written by kbuild, copied by modules_install) names the built modules
    without a walk.  Entries are ``dir/name.ko`` (``.o`` since 6.2); the
    installed file may carry a compression suffix.
    """
    order = modules_dir / "modules.order"
    if not order.is_file():
        return None
    index: dict[str, Path] = {}
    for line in order.read_text().split():
        stem = line.removesuffix(".o").removesuffix(".ko")
        found = next((modules_dir / f"{stem}{s}" for s in MODULE_SUFFIXES
                      if (modules_dir / f"{stem}{s}").is_file()), None)
        if found is None:
            return None
        index.setdefault(canonical(found.name.split(".ko")[0]), found)
    return index


def index_modules(modules_dir: Path) -> dict[str, Path]:
    """Map canonical module name -> file for every module under ``modules_dir``."""
    listed = _listed_modules(modules_dir)
    if listed is not None:
        return listed
    index: dict[str, Path] = {}
    for path in sorted(modules_dir.rglob("*.ko*")):
        name = _module_name(path.name)
        if name is not None and path.is_file():
            index.setdefault(name, path)
    return index


def builtin_modules(modules_dir: Path) -> frozenset[str]:
    """Names the kernel has built in (``modules.builtin``): always satisfied."""
    listing = modules_dir / "modules.builtin"
    if not listing.exists():
        return frozenset()
    names = set()
    for line in listing.read_text().splitlines():
        base = line.rsplit("/", 1)[-1]
        names.add(canonical(base.split(".ko")[0]))
    return frozenset(names)


def resolve(
    wanted: Iterable[str],
    index: Mapping[str, Path],
    builtin: frozenset[str] = frozenset(),
    loader=module_info,
) -> list[ModuleInfo]:
    """Return ``wanted`` plus all dependencies, each after everything it depends on.

    Raises VmError naming the first module that is neither a file nor built in,
    and the module that needed it.  ``loader`` reads one module (tests pass a
    fake).  The order is deterministic: a depth-first post-order that visits
    dependencies in the order .modinfo lists them.
    """
    order: list[ModuleInfo] = []
    state: dict[str, str] = {}  # name -> "visiting" | "done"

    def visit(name: str, needed_by: str | None) -> None:
        name = canonical(name)
        if state.get(name) == "done" or name in builtin:
            return
        if state.get(name) == "visiting":
            raise VmError(f"kernel module dependency cycle through {name}")
        path = index.get(name)
        if path is None:
            why = f" (needed by {needed_by})" if needed_by else ""
            raise VmError(f"kernel module {name} not found in the guest kernel{why}")
        state[name] = "visiting"
        info = loader(path)
        for dep in info.depends:
            visit(dep, name)
        state[name] = "done"
        order.append(info)

    for name in wanted:
        visit(name, None)
    return order


def resolve_in(modules_dir: Path, wanted: Iterable[str]) -> list[ModuleInfo]:
    """Resolve ``wanted`` against an unpacked ``lib/modules/<version>`` tree."""
    return resolve(wanted, index_modules(modules_dir), builtin_modules(modules_dir))
