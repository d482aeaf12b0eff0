"""The controller's validated, frozen configuration."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from ..crypto import DEFAULT_UNIT, check_unit
from ..errors import ConfigError, CryptoError
from ..keytable import DEFAULT_KEYID_BITS, MAX_KEYID_BITS, MIN_KEYID_BITS, TmePolicy
from ..vocabulary import TweakMode  # re-exported: the wire and the guest share it

PAGE_SIZE = 4096
# QEMU places the NVDIMM label area at the end of the backing memory; the
# kernel wants namespaces aligned to 2 MiB for fsdax, so the data area is too.
SIZE_ALIGN = 2 * 1024 * 1024
DEFAULT_REWRITE_AT = 0.625


@dataclass(frozen=True)
class ControllerConfig:
    """Everything that defines one emulated NVDIMM.

    ``base`` None means "keep the base stored in the state directory" (0
    for a new device); the launcher sets the real one from QMP.

    ``rewrite_at`` tunes how write-backs reach the media, not the device
    (it is not stored): a write-back rewrites the media file instead of
    journaling once the pages it changes (projected from those found so far)
    reach this fraction of the pages holding data.  Journaling writes each
    changed page twice, a rewrite writes the whole media once (copying what
    did not change), so 0.625 picks whichever writes fewer bytes with a
    margin for the copy.  0 rewrites whenever anything changed; None never.
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
    rewrite_at: float | None = DEFAULT_REWRITE_AT

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
        if self.rewrite_at is not None and not self.rewrite_at >= 0:
            raise ConfigError(f"rewrite_at must be a fraction >= 0 or None, got {self.rewrite_at}")
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
