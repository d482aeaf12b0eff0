"""A real guest on the emulated MKTME NVDIMM: base from QMP, guest channel, reboot = power cycle."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest
from backend_helpers import xts_reference
from mktme_emu.protocol import Client
from mktme_emu.vm.boot import LaunchOptions, launch
from mktme_emu.vm.emulated import EmulatedNvdimm, EmulatorOptions
from mktme_emu.vm.kernel import cache_dir, load_kernel
from mktme_emu.vm.launcher import RunRequest

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(load_kernel(cache_dir()) is None,
                       reason="no guest kernel: run `mktme-emu kernel fetch`"),
]

KEY, TWEAK = bytes(range(16)), bytes(range(16, 32))
SECRET = b"mktme-emu secret page\n" * 186  # 4092 bytes, padded to a page below
PAGE = SECRET.ljust(4096, b"\n")

# Boot 0 programs KeyID 1, maps page 0 with it, writes the page through the
# pmem driver (straight into the view), and reboots (QMP RESET). Boot 1 reads
# page 0 back under KeyID 0: the key died with the power cycle, so it must see
# the raw ciphertext, not the secret.
GUEST = f"""
import mmap, os, sys
from mktme_emu.protocol import Client, FileTransport, KeyCommand, KeyStatus, key_program
port = os.open("/dev/virtio-ports/org.mktme.control", os.O_RDWR)
client = Client(FileTransport(port))
page = {PAGE!r}
if os.environ["MKTME_BOOT"] == "0":
    status = client.program_key(key_program(1, KeyCommand.SET_KEY_DIRECT, "aes-xts-128",
                                            {KEY.hex()!r}, {TWEAK.hex()!r}))
    assert status is KeyStatus.PROG_SUCCESS, status
    client.map(0, 4096, 1)
    fd = os.open("/dev/pmem0", os.O_RDWR | os.O_DIRECT)
    buf = mmap.mmap(-1, 4096)  # O_DIRECT wants an aligned buffer
    buf.write(page)
    os.pwritev(fd, [buf], 0)
    os.close(fd)
    assert client.flush(0, 4096).written == 1
    print("BOOT0 base", hex(client.config().base), flush=True)
    os.execvp("reboot", ["reboot"])
fd = os.open("/dev/pmem0", os.O_RDONLY | os.O_DIRECT)
buf = mmap.mmap(-1, 4096)
os.preadv(fd, [buf], 0)
print("BOOT1 secret-visible", bytes(buf) == page, flush=True)
sys.exit(0 if bytes(buf) != page else 9)
"""


def _xts(data: bytes, tweak: int) -> bytes:
    """Independent XTS of consecutive 64-byte units starting at ``tweak``."""
    return xts_reference(KEY + TWEAK, data, range(tweak, tweak + len(data), 64), 64)


def test_reboot_power_cycles_the_emulated_nvdimm(tmp_path: Path,
                                                 capfd: pytest.CaptureFixture[str]) -> None:
    backend = EmulatedNvdimm(EmulatorOptions(state_dir=tmp_path / "state", size=128 << 20))
    try:
        result = launch(LaunchOptions(nvdimm_size=128 << 20),
                        RunRequest(command=(sys.executable, "-c", GUEST), timeout=180), [backend])
        with Client.connect(backend.control_socket) as client:
            stats, config = client.stats(), client.config()
    finally:
        backend.close()
    out = capfd.readouterr().out
    assert result.exit_code == 0, out[-2000:]
    assert result.boots == 2
    base = result.bases[0]
    assert config.base == base and f"BOOT0 base {base:#x}" in out
    assert "BOOT1 secret-visible False" in out
    assert stats.power_cycles >= 2  # the reboot's RESET and the final SHUTDOWN
    media = (tmp_path / "state" / "media").read_bytes()[:4096]
    assert media == _xts(PAGE, base)  # spa tweak: the page's physical address
    assert not os.path.exists(backend.view_path)  # the view is removed at close


TWO_PORTS = """
import os
from mktme_emu.protocol import Client, FileTransport
for name in ("org.mktme.control", "org.mktme.control.1"):
    client = Client(FileTransport(os.open("/dev/virtio-ports/" + name, os.O_RDWR)))
    config = client.config()
    print("PORT", name, hex(config.base), config.size, flush=True)
"""


def test_two_emulated_nvdimms_each_with_its_base_and_port(tmp_path: Path,
                                                         capfd: pytest.CaptureFixture[str]) -> None:
    backends = [EmulatedNvdimm(EmulatorOptions(state_dir=tmp_path / f"nv{i}", size=size), i)
                for i, size in enumerate((64 << 20, 32 << 20))]
    try:
        result = launch(LaunchOptions(nvdimm_size=64 << 20, nvdimm_count=2),
                        RunRequest(command=(sys.executable, "-c", TWO_PORTS), timeout=180), backends)
        seen = []
        for backend in backends:
            with Client.connect(backend.control_socket) as client:
                seen.append(client.config().base)
    finally:
        for backend in backends:
            backend.close()
    out = capfd.readouterr().out
    assert result.exit_code == 0, out[-2000:]
    assert seen == result.bases and len(set(seen)) == 2
    assert f"PORT org.mktme.control {seen[0]:#x} {64 << 20}" in out
    assert f"PORT org.mktme.control.1 {seen[1]:#x} {32 << 20}" in out


# The guest keeps asking through its port while the host kills the backend
# and starts a new one on the same state: QEMU's chardev reconnects, the new
# backend re-attaches to the view, reports the user-key pages as locked (the
# key died with the process), and programming the key again unlocks them.
RESTART = f"""
import os, sys, time
from mktme_emu.errors import MktmeError
from mktme_emu.protocol import Client, FileTransport, KeyCommand, KeyStatus, key_program
PORT = "/dev/virtio-ports/org.mktme.control"
def client():
    return Client(FileTransport(os.open(PORT, os.O_RDWR), timeout=2))
def program(c):
    return c.program_key(key_program(1, KeyCommand.SET_KEY_DIRECT, "aes-xts-128",
                                     {KEY.hex()!r}, {TWEAK.hex()!r}))
c = client()
assert program(c) is KeyStatus.PROG_SUCCESS
c.map(0, 4096, 1)
fd = os.open("/dev/pmem0", os.O_RDWR | os.O_SYNC)
os.pwrite(fd, {PAGE!r}, 0)
assert c.flush(0, 4096).written == 1
c.transport.close()
print("GUEST flushed", flush=True)
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    try:
        c = client()
    except OSError:
        time.sleep(0.5)
        continue
    try:
        locked = c.config().locked_pages
    except (MktmeError, OSError):  # asked the old backend as it died: the reply never comes
        locked = 0
    if locked:
        break
    c.transport.close()  # a port opens once at a time: a leaked open is EBUSY for good
    time.sleep(0.5)
else:
    sys.exit(5)
print("GUEST reattached locked", locked, flush=True)
assert program(c) is KeyStatus.PROG_SUCCESS
print("GUEST unlocked", c.config().locked_pages, os.pread(fd, 4096, 0) == {PAGE!r}, flush=True)
"""


def test_restarted_backend_is_reattached_without_a_reboot(tmp_path: Path,
                                                         capfd: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    first = EmulatedNvdimm(EmulatorOptions(state_dir=state, size=64 << 20))
    outcome: dict[str, object] = {}

    def guest() -> None:
        outcome["result"] = launch(LaunchOptions(nvdimm_size=64 << 20),
                                   RunRequest(command=(sys.executable, "-c", RESTART), timeout=240),
                                   [first])

    thread = threading.Thread(target=guest)
    thread.start()
    second = None
    said: list[str] = []
    try:
        # Kill only once the guest has its FLUSH reply: a host counter (pages
        # written back) moves before the reply leaves, and a guest whose flush
        # died with the backend exits, and shuts down with no backend there.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and thread.is_alive():
            said.append(capfd.readouterr().out)
            if "GUEST flushed" in "".join(said):
                break
            time.sleep(0.2)
        first.kill()
        second = EmulatedNvdimm(EmulatorOptions(state_dir=state, size=64 << 20))
        thread.join(timeout=240)
    finally:
        if second is not None:
            second.close()
        first.close()
    out = "".join(said) + capfd.readouterr().out
    result = outcome.get("result")
    assert result is not None, out[-3000:]  # the launch raised: its traceback is a warning
    assert result.exit_code == 0, out[-2000:]  # type: ignore[attr-defined]
    assert result.boots == 1  # type: ignore[attr-defined]
    assert "GUEST reattached locked 1" in out
    assert "GUEST unlocked 0 True" in out


class SlowPowerCycle:
    """An NvdimmBackend whose power cycle takes ``delay`` seconds more (a big device's)."""

    def __init__(self, inner: EmulatedNvdimm, delay: float) -> None:
        self.inner, self.delay = inner, delay
        self.view_path, self.data_size = inner.view_path, inner.data_size
        self.label_size, self.guest_socket = inner.label_size, inner.guest_socket
        self.power_cycles = 0

    def attach(self, base: int) -> None:
        self.inner.attach(base)

    def power_cycle(self) -> None:
        time.sleep(self.delay)
        self.inner.power_cycle()
        self.power_cycles += 1

    def close(self) -> None:
        self.inner.close()


def test_slow_power_cycles_are_atomic_reboots_not_panics(tmp_path: Path) -> None:
    inner = EmulatedNvdimm(EmulatorOptions(state_dir=tmp_path / "state", size=64 << 20))
    slow = SlowPowerCycle(inner, delay=1.5)
    said: list[str] = []
    command = ("sh", "-c", 'case "$MKTME_BOOT" in 0|1) reboot -f ;; esac; exit 7')
    try:
        result = launch(LaunchOptions(nvdimm_size=64 << 20), RunRequest(command=command,
                        timeout=300), [slow], progress=said.append)
    finally:
        slow.close()
    assert (result.exit_code, result.boots, result.panicked) == (7, 3, False)
    assert slow.power_cycles >= 3  # two reboots and the final poweroff
    assert said.count("guest rebooted: NVDIMM power-cycled") == 2
