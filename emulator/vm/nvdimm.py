"""What the launcher needs from whatever owns an NVDIMM, and the plain one.

Swapping the NVDIMM implementation is passing another object that satisfies
:class:`NvdimmBackend` to ``run_vm``/``launch`` (the emulated one is
:class:`mktme_emu.vm.emulated.EmulatedNvdimm`; tests wrap it to inject faults).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Protocol

from mktme_emu.vm.qemu import NvdimmSpec


class NvdimmBackend(Protocol):
    """One NVDIMM as the launcher drives it."""

    view_path: Path  # file QEMU maps with memory-backend-file,share=on (data then label area)
    data_size: int  # bytes of the data area
    label_size: int  # 0 = no label area; QEMU nvdimm label-size=
    guest_socket: Path | None  # unix socket for the guest-role control channel, or None

    def attach(self, base: int) -> None: ...  # guest physical base, before the vCPUs run
    def power_cycle(self) -> None: ...  # on QMP RESET and SHUTDOWN, vCPUs stopped
    def close(self) -> None: ...


def spec_of(backend: NvdimmBackend) -> NvdimmSpec:
    """The QEMU-facing description of a backend."""
    return NvdimmSpec(backend.view_path, backend.data_size, backend.label_size,
                      backend.guest_socket)


class PlainNvdimm:
    """An unencrypted NVDIMM: a 0600 file in /dev/shm; records calls for tests."""

    def __init__(self, data_size: int, label_size: int = 0, directory: Path = Path("/dev/shm"),
                 guest_socket: Path | None = None) -> None:
        self.data_size = data_size
        self.label_size = label_size
        self.guest_socket = guest_socket
        fd, name = tempfile.mkstemp(prefix="mktme-plain-", suffix=".view", dir=directory)
        os.ftruncate(fd, data_size + label_size)
        os.close(fd)  # mkstemp already made it 0600
        self.view_path = Path(name)
        self.bases: list[int] = []
        self.power_cycles = 0

    def attach(self, base: int) -> None:
        self.bases.append(base)

    def power_cycle(self) -> None:
        self.power_cycles += 1

    def close(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.view_path.unlink()
