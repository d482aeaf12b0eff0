"""Kernel module dependency resolution without depmod.

The host has no kmod, and the guest kernel is not the host's, so we read each
``.ko``'s ``.modinfo`` ELF section (``depends=`` and ``name=``) with pyelftools
and order the closure of the requested modules so that every module comes after
its dependencies: the order busybox ``insmod`` (which does not resolve
anything itself) needs.
"""

from __future__ import annotations

import lzma
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from mktme_emu.errors import VmError

#: Suffixes a module file may carry (Debian 6.1 ships plain .ko; later ones .ko.xz).
MODULE_SUFFIXES = (".ko", ".ko.xz")


def canonical(name: str) -> str:
    """Module names treat '-' and '_' alike (pvpanic-pci.ko is module pvpanic_pci)."""
    return name.replace("-", "_")


@dataclass(frozen=True)
class ModuleInfo:
    """One module file and the modules it needs loaded first."""

    name: str
    path: Path
    depends: tuple[str, ...]


def read_module(path: Path) -> bytes:
    """Return the ELF bytes of a module, decompressing ``.ko.xz`` with lzma."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        try:
            data = lzma.decompress(data)
        except lzma.LZMAError as exc:
            raise VmError(f"cannot decompress kernel module {path}: {exc}") from exc
    return data


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
    return ModuleInfo(name=name, path=path, depends=deps)


def index_modules(modules_dir: Path) -> dict[str, Path]:
    """Map canonical module name -> file for every module under ``modules_dir``."""
    index: dict[str, Path] = {}
    for suffix in MODULE_SUFFIXES:
        for path in modules_dir.rglob(f"*{suffix}"):
            index.setdefault(canonical(path.name[: -len(suffix)]), path)
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
