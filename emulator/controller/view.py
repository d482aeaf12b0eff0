"""The CPU-visible view: a shared file QEMU maps as the NVDIMM (data, then label)."""

from __future__ import annotations

import logging
import mmap
import os
from pathlib import Path

from ..errors import StateError
from .lock import try_flock

log = logging.getLogger(__name__)


class View:
    """The view file mapped shared: data area first, then the label area.

    The file is created with mode 0600 and kept across backend restarts,
    so a restarted backend re-attaches to what the guest sees.  It is
    flocked for the backend's lifetime on a descriptor of its own (the one
    handed out over the socket is another open, so it never carries the lock).
    """

    def __init__(self, path: Path, size: int, label_size: int) -> None:
        self.path = path
        self.size = size
        self.label_size = label_size
        self.total = size + label_size
        self._lock_fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try_flock(self._lock_fd, f"view {path}")
            self._open(path)
        except BaseException:
            os.close(self._lock_fd)
            raise
        self.data = memoryview(self._map)[:size]
        self.label = memoryview(self._map)[size:]

    def _open(self, path: Path) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.fchmod(fd, 0o600)
            existing = os.fstat(fd).st_size
            if existing not in (0, self.total):
                raise StateError(f"{path} holds {existing} bytes, expected {self.total}: "
                                 "another device's view? remove it or pass --view")
            self.reattached = existing == self.total
            if not self.reattached:
                os.ftruncate(fd, self.total)
            info = os.fstat(fd)
            self.identity = [info.st_dev, info.st_ino]  # which file this is, for re-attaching
            self._map = mmap.mmap(fd, self.total, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self.fd = os.dup(fd)
        finally:
            os.close(fd)

    def check(self) -> None:
        """Refuse to touch the mapping if the file was truncated or deleted under us.

        A truncated view would kill the process with SIGBUS at the first access
        past its end; a deleted one is no longer what QEMU maps.  Raises
        StateError (and logs it).  Costs one fstat.
        """
        info = os.fstat(self.fd)
        problem = None
        if info.st_nlink == 0:
            problem = f"view {self.path} was deleted while in use"
        elif info.st_size != self.total:
            problem = (f"view {self.path} was truncated to {info.st_size} bytes while in use "
                       f"(expected {self.total})")
        if problem:
            log.error("%s; refusing to touch it (restart the backend and the VM)", problem)
            raise StateError(problem)

    def close(self) -> None:
        self.data.release()
        self.label.release()
        self._map.close()
        os.close(self.fd)
        os.close(self._lock_fd)
