"""A kernel's configuration, and the options the emulator's guest cannot do without.

A kernel developer boots their own kernel (``--kernel``); before QEMU starts we
check its ``.config`` against :data:`REQUIREMENTS`, one table with the reason
for every option, so a kernel that would hang at "mounting the host root" or
fail at "mount -o dax" is refused up front with one message naming every
missing option and why.

Where no ``.config`` is at hand (a bare bzImage with an installed modules
tree) the configuration is inferred from the modules: an option whose module
is a file is ``m``, one listed in ``modules.builtin`` is ``y``; options that
have no module (``FS_DAX``, ``NVDIMM_PFN``...) stay unknown and are not judged.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mktme_emu.errors import ConfigError

_SET = re.compile(r"^CONFIG_([A-Za-z0-9_]+)=(.*)$")
_UNSET = re.compile(r"^# CONFIG_([A-Za-z0-9_]+) is not set$")

#: The module that provides a tristate option, for options the guest may load.
#: Used both ways: an ``=m`` option means "load this module", and without a
#: .config a module file (or a modules.builtin line) tells the option's state.
OPTION_MODULES: Mapping[str, str] = {
    "VIRTIO_PCI": "virtio_pci", "VIRTIO_CONSOLE": "virtio_console",
    "NET_9P": "9pnet", "NET_9P_VIRTIO": "9pnet_virtio", "9P_FS": "9p",
    "OVERLAY_FS": "overlay", "ACPI_NFIT": "nfit", "LIBNVDIMM": "libnvdimm",
    "BLK_DEV_PMEM": "nd_pmem", "ND_BTT": "nd_btt", "DEV_DAX": "device_dax",
    "DEV_DAX_PMEM": "dax_pmem", "EXT4_FS": "ext4", "XFS_FS": "xfs",
    "CRYPTO_CRC32C": "crc32c_generic", "PVPANIC_PCI": "pvpanic_pci",
}


@dataclass(frozen=True)
class KernelConfig:
    """Option name (without ``CONFIG_``) -> value (``y``, ``m``, a number or string).

    ``complete`` is True for a real .config, where an absent option is not
    set; False for one inferred from a modules tree, where it is unknown.
    """

    options: Mapping[str, str]
    source: str
    complete: bool = True

    def enabled(self, option: str) -> bool | None:
        """True when built in or a module, False when off, None when unknown."""
        value = self.options.get(option)
        if value is not None:
            return value in ("y", "m")
        return False if self.complete else None

    def is_module(self, option: str) -> bool:
        return self.options.get(option) == "m"


def parse_config(text: str, source: str) -> KernelConfig:
    """Parse Kconfig output (``CONFIG_X=y``, ``# CONFIG_X is not set``); other lines are ignored."""
    options: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if match := _SET.match(line):
            options[match.group(1)] = match.group(2).strip('"')
        elif match := _UNSET.match(line):
            options[match.group(1)] = "n"
    return KernelConfig(options, source)


def read_config(path: Path) -> KernelConfig:
    """A .config file; ConfigError (one line) when it cannot be read or holds no option."""
    try:
        config = parse_config(path.read_text(errors="replace"), str(path))
    except OSError as exc:
        raise ConfigError(f"cannot read the kernel config {path}: {exc.strerror}") from exc
    if not config.options:
        raise ConfigError(f"{path} is not a kernel config (no CONFIG_ lines)")
    return config


def config_from_modules(available: Iterable[str], builtin: Iterable[str] | None,
                        source: str) -> KernelConfig:
    """What the module files (``m``) and ``modules.builtin`` (``y``) say about our options.

    With a ``modules.builtin`` list (``builtin`` not None) a tristate option
    whose module is neither a file nor listed is off (``n``); without one it
    stays unknown, as do options that have no module at all.
    """
    have, inside = set(available), set(builtin or ())
    options: dict[str, str] = {}
    for option, module in OPTION_MODULES.items():
        if module in inside:
            options[option] = "y"
        elif module in have:
            options[option] = "m"
        elif builtin is not None:
            options[option] = "n"
    return KernelConfig(options, source, complete=False)


@dataclass(frozen=True)
class Requirement:
    """Any one of ``options`` must be on (``y`` or ``m``), for ``reason``.

    ``modes``: the namespace modes (``--ns``) that need it; empty = always.
    ``optional``: missing it costs a feature, not the run (a warning).
    """

    options: tuple[str, ...]
    reason: str
    modes: tuple[str, ...] = ()
    optional: bool = False

    def applies(self, ns_mode: str | None) -> bool:
        return not self.modes or ns_mode in self.modes

    def describe(self) -> str:
        names = " or ".join(f"CONFIG_{o}" for o in self.options)
        return f"{names} ({self.reason})"


#: Everything the guest relies on, with why.  Keep in step with init.sh and
#: initramfs.GUEST_MODULES: a new dependency of either belongs here too.
REQUIREMENTS: tuple[Requirement, ...] = (
    Requirement(("64BIT",), "the guest runs the host's x86-64 python3, ndctl and mkfs"),
    Requirement(("BLK_DEV_INITRD",), "init, busybox and the modules come in an initramfs"),
    Requirement(("DEVTMPFS",), "there is no udev: device nodes come from devtmpfs"),
    Requirement(("TMPFS",), "/tmp, /run and /dev/shm in the guest are tmpfs"),
    Requirement(("UNIX98_PTYS",), "the guest's shells and tools want /dev/pts"),
    Requirement(("SERIAL_8250_CONSOLE",), "the console is ttyS0"),
    Requirement(("MAGIC_SYSRQ",), "the guest's poweroff and reboot use /proc/sysrq-trigger"),
    Requirement(("VIRTIO_PCI",), "QEMU's virtio-serial and 9p devices are PCI devices"),
    Requirement(("VIRTIO_CONSOLE",), "init's status line and the control channel are "
                "virtio-serial ports"),
    Requirement(("NET_9P",), "the guest's root is the host's, shared over 9p"),
    Requirement(("NET_9P_VIRTIO",), "9p reaches the host over virtio"),
    Requirement(("9P_FS",), "the guest mounts the host's root over 9p"),
    Requirement(("OVERLAY_FS",), "host directories are made writable in the guest as "
                "overlays with a tmpfs upper layer"),
    Requirement(("ACPI_NFIT",), "QEMU describes the NVDIMM in the ACPI NFIT table"),
    Requirement(("LIBNVDIMM",), "the NVDIMM bus, regions and namespaces ndctl manages"),
    Requirement(("BLK_DEV_PMEM",), "a namespace is a /dev/pmemN disk (raw and fsdax modes)"),
    Requirement(("NVDIMM_PFN",), "an fsdax namespace keeps its page map in a pfn info block",
                modes=("fsdax",)),
    Requirement(("FS_DAX",), "mount -o dax maps files straight onto the NVDIMM",
                modes=("fsdax",)),
    Requirement(("NVDIMM_DAX",), "a devdax namespace is claimed by a dax device",
                modes=("devdax",)),
    Requirement(("DEV_DAX_PMEM",), "a devdax namespace is a /dev/daxX.Y character device",
                modes=("devdax",)),
    Requirement(("EXT4_FS", "XFS_FS"), "a DAX-capable filesystem for the namespace"),
    Requirement(("PVPANIC_PCI",), "a guest panic reaches the host at once (QMP "
                "GUEST_PANICKED), not only through the console", optional=True),
)


@dataclass(frozen=True)
class CheckResult:
    """What a config lacks (refused), misses optionally (warned), or cannot tell (unknown)."""

    missing: tuple[Requirement, ...] = ()
    optional_missing: tuple[Requirement, ...] = ()
    unknown: tuple[str, ...] = field(default=())


def check_config(config: KernelConfig, ns_mode: str | None,
                 requirements: Iterable[Requirement] = REQUIREMENTS) -> CheckResult:
    """Judge ``config`` for a guest preparing namespaces in ``ns_mode`` (None = none)."""
    missing: list[Requirement] = []
    optional: list[Requirement] = []
    unknown: list[str] = []
    for need in requirements:
        if not need.applies(ns_mode):
            continue
        states = [config.enabled(o) for o in need.options]
        if any(states):
            continue
        if None in states:
            unknown += [o for o, s in zip(need.options, states, strict=True) if s is None]
            continue
        (optional if need.optional else missing).append(need)
    return CheckResult(tuple(missing), tuple(optional), tuple(unknown))


def refusal(kernel: str, config: KernelConfig, result: CheckResult) -> str:
    """The one message that refuses a kernel: every missing option with its reason."""
    items = "; ".join(need.describe() for need in result.missing)
    return (f"kernel {kernel} cannot run the emulator's guest: its config ({config.source}) "
            f"lacks {items}")


def require(kernel: str, config: KernelConfig, ns_mode: str | None) -> CheckResult:
    """Raise ConfigError listing every missing option; return the result (warnings) otherwise."""
    result = check_config(config, ns_mode)
    if result.missing:
        raise ConfigError(refusal(kernel, config, result))
    return result
