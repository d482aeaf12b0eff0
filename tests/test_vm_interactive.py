"""Leaving an interactive `boot` is not an error (VMs, driven through a pty).

exit, poweroff and Ctrl-A X all end `mktme-emu boot` with status 0 and no
console dump.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time

import pytest
from mktme_emu.vm.kernel import cache_dir, load_kernel

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(load_kernel(cache_dir()) is None,
                       reason="no guest kernel: run `mktme-emu kernel fetch`"),
]

MARK = "SHELL-IS-READY"


class Terminal:
    """`mktme-emu boot` on a pty we type into and read from."""

    def __init__(self) -> None:
        self.master, slave = os.openpty()
        argv = [sys.executable, "-m", "mktme_emu.cli.main", "boot", "--plain",
                "--nvdimm-size", "64M", "--boot-timeout", "120"]
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave,
                                     start_new_session=True)
        os.close(slave)
        self.seen = b""

    def read_until(self, wanted: bytes, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while wanted not in self.seen:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                pytest.fail(f"no {wanted!r} on the console: {self.seen[-2000:]!r}")
            ready, _, _ = select.select([self.master], [], [], 0.5)
            if ready:
                self._read()

    def _read(self) -> bool:
        try:
            chunk = os.read(self.master, 4096)
        except OSError:  # EIO: the other side is closed
            return False
        self.seen += chunk
        return bool(chunk)

    def type(self, text: bytes) -> None:
        os.write(self.master, text)

    def wait(self, timeout: float = 120) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            ready, _, _ = select.select([self.master], [], [], 0.5)
            if ready and not self._read():
                break
        status = self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        os.close(self.master)
        return status


@pytest.mark.parametrize("how", [b"exit\r", b"poweroff\r", b"\x01x"],
                         ids=["exit", "poweroff", "ctrl-a-x"])
def test_leaving_the_shell_ends_boot_with_status_0(how: bytes) -> None:
    term = Terminal()
    try:
        term.read_until(b"Ctrl-A X quits")
        # Wait for a live shell: echo a marker built so its echo differs from its output.
        deadline = time.monotonic() + 180
        while b"SHELL-IS-" + b"READY" not in term.seen.replace(b"echo SHELL-IS-''READY", b""):
            term.type(b"echo SHELL-IS-''READY\r")
            try:
                term.read_until(MARK.encode(), timeout=5)
            except pytest.fail.Exception:
                if time.monotonic() > deadline or term.proc.poll() is not None:
                    raise
        term.type(how)
        status = term.wait()
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
            term.proc.wait()
    assert status == 0, term.seen[-2000:]
    assert b"console tail" not in term.seen
    assert b"guest stopped before reporting" not in term.seen
