"""The CPU-visible view: a shared file QEMU maps as the NVDIMM (data, then label)."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

from ..errors import StateError


class View:
    """The view file mapped shared: data area first, then the label area.

    The file is created with mode 0600 and kept across backend restarts,
    so a restarted backend re-attaches to what the guest sees.
    """

    def __init__(self, path: Path, size: int, label_size: int) -> None:
        self.path = path
        self.size = size
        self.label_size = label_size
        total = size + label_size
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.fchmod(fd, 0o600)
            existing = os.fstat(fd).st_size
            if existing not in (0, total):
                raise StateError(f"{path} holds {existing} bytes, expected {total}: "
                                 "another device's view? remove it or pass --view")
            self.reattached = existing == total
            if not self.reattached:
                os.ftruncate(fd, total)
            info = os.fstat(fd)
            self.identity = [info.st_dev, info.st_ino]  # which file this is, for re-attaching
            self._map = mmap.mmap(fd, total, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self.fd = os.dup(fd)
        finally:
            os.close(fd)
        self.data = memoryview(self._map)[:size]
        self.label = memoryview(self._map)[size:]

    def close(self) -> None:
        self.data.release()
        self.label.release()
        self._map.close()
        os.close(self.fd)
