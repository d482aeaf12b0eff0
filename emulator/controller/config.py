"""The controller's validated, frozen configuration."""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass
from pathlib import Path

from ..crypto import DEFAULT_UNIT, check_unit
from ..errors import ConfigError, CryptoError
from ..keytable import DEFAULT_KEYID_BITS, MAX_KEYID_BITS, MIN_KEYID_BITS, TmePolicy

PAGE_SIZE = 4096
# QEMU places the NVDIMM label area at the end of the backing memory; the
# kernel wants namespaces aligned to 2 MiB for fsdax, so the data area is too.
SIZE_ALIGN = 2 * 1024 * 1024


class TweakMode(enum.Enum):
    """Where a data unit's XTS tweak comes from (SPEC section 3)."""

    SPA = "spa"  # system physical address: base + offset
    DPA = "dpa"  # offset inside the DIMM
    LOGICAL = "logical"  # given by the guest per mapped page
    DUN = "dun"  # given per mapped page, one 4096-byte data unit per page (fscrypt's DUN)


@dataclass(frozen=True)
class ControllerConfig:
    """Everything that defines one emulated NVDIMM.

    ``base`` None means "keep the base stored in the state directory" (0
    for a new device); the launcher sets the real one from QMP.
    """

    state_dir: Path
    size: int = 256 * 1024 * 1024
    label_size: int = 0
    base: int | None = None
    unit: int = DEFAULT_UNIT
    tweak: TweakMode = TweakMode.SPA
    keyid_bits: int = DEFAULT_KEYID_BITS
    tme: TmePolicy = TmePolicy.BYPASS
    view_path: Path | None = None

    def __post_init__(self) -> None:
        if self.size <= 0 or self.size % SIZE_ALIGN:
            raise ConfigError(f"NVDIMM size must be a positive multiple of 2M, got {self.size}")
        if self.label_size < 0 or self.label_size % PAGE_SIZE:
            raise ConfigError(f"label size must be a multiple of 4K, got {self.label_size}")
        if self.label_size and self.label_size < 128 * 1024:
            raise ConfigError("QEMU needs a label area of at least 128K (or none)")
        if self.base is not None and (self.base < 0 or self.base % PAGE_SIZE):
            raise ConfigError(f"base must be a 4K-aligned physical address, got {self.base:#x}")
        try:
            check_unit(self.unit)
        except CryptoError as exc:
            raise ConfigError(str(exc)) from None
        if self.tweak is TweakMode.DUN and self.unit != PAGE_SIZE:
            raise ConfigError(f"dun tweak mode has one data unit per page: it needs unit {PAGE_SIZE}, "
                              f"got {self.unit}")
        if not MIN_KEYID_BITS <= self.keyid_bits <= MAX_KEYID_BITS:
            raise ConfigError(f"keyid bits must be {MIN_KEYID_BITS}..{MAX_KEYID_BITS}")

    @property
    def pages(self) -> int:
        return self.size // PAGE_SIZE

    @property
    def view(self) -> Path:
        return self.view_path or default_view_path(self.state_dir)


def default_view_path(state_dir: Path) -> Path:
    """A /dev/shm file name unique to the state directory."""
    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:12]
    return Path("/dev/shm") / f"mktme-emu-{digest}.view"
