"""What the controller's requests answer: typed, frozen where they cross a layer."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class RelocateMode(enum.Enum):
    RAW = "raw"  # copy media as it is (a KeyID-unaware mover)
    KEYED = "keyed"  # decrypt at src, encrypt at dst; carries KeyID and tweak


@dataclass(frozen=True)
class FlushResult:
    """What a flush did: durable on return.

    ``written``: pages whose media changed.  ``unwritable``: pages in the
    range mapped with a KeyID whose key was lost in a backend restart; what
    the guest wrote there could not be written back (SPEC 3: never with a
    wrong key) and stays only in the view until the key is programmed again.
    """

    written: int
    unwritable: int = 0


@dataclass(frozen=True)
class PageInfo:
    """What ``inspect`` reports for one page; never key material."""

    offset: int
    keyid: int
    kind: str
    locked: bool  # mapped with a KeyID whose key this backend no longer has
    logical_tweak: int
    view_head: bytes
    media_head: bytes
    consistent: bool | None  # media == write-back(view)? None when locked


@dataclass
class Stats:
    """Counters since the backend started."""

    pages_filled: int = 0
    pages_written_back: int = 0
    bytes_encrypted: int = 0
    bytes_decrypted: int = 0
    flushes: int = 0
    flush_seconds_total: float = 0.0
    flush_seconds_max: float = 0.0
    power_cycles: int = 0
    key_programs: int = 0

    def as_dict(self) -> dict[str, float | int]:
        return dict(vars(self))

    def account_flush(self, seconds: float) -> None:
        self.flushes += 1
        self.flush_seconds_total += seconds
        self.flush_seconds_max = max(self.flush_seconds_max, seconds)
