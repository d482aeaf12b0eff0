"""Two guest processes mapping and flushing at once over the real virtio-serial port,
while a third keeps giving up on slow requests and leaves their replies behind.

Each worker maps its pages away from KeyID 1 and back, writes a pattern
through /dev/pmem0 (straight into the view) and flushes, every request on a
connection of its own as `mktme-guest` commands make them.  The impatient
process sends large MAPs with a 5 ms timeout, so their replies arrive while a
worker waits for its own.  Before replies carried the request's tag, a worker
could take such a reply for its own MAP, write before its pages had KeyID 1,
and read garbage back (or leave the media wrong); now every read-back and the
media, decrypted on the host, must be the worker's data.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from backend_helpers import xts_reference
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
ROUNDS, PAGES, WORKERS = 12, 4, 2
REGION = PAGES * 4096
NVDIMM = 128 << 20


def worker_data(worker: int, round_: int) -> bytes:
    return bytes([0x40 + worker, round_ % 256]) * (REGION // 2)


WORKER = f"""
import mmap, os, sys
from mktme_guest.channel import connect
w = int(sys.argv[1]); off = w << 20; n = {REGION}
fd = os.open("/dev/pmem0", os.O_RDWR | os.O_DIRECT)
buf, back = mmap.mmap(-1, n), mmap.mmap(-1, n)
for i in range({ROUNDS}):
    for keyid in (0, 1):
        with connect() as c:
            c.map(off, n, keyid)
    buf.seek(0)
    buf.write(bytes([0x40 + w, i % 256]) * (n // 2))
    os.pwritev(fd, [buf], off)
    with connect() as c:
        flushed = c.flush(off, n)
    os.preadv(fd, [back], off)
    if bytes(back) != bytes(buf) or flushed.unwritable:
        print("WORKER", w, "round", i, "wrong:", flushed, flush=True)
        sys.exit(3)
print("WORKER", w, "done", flush=True)
"""

IMPATIENT = """
import os, time
from mktme_guest.channel import connect
from mktme_guest.errors import ChannelError
gave_up = 0
while not os.path.exists("/tmp/workers-done"):
    for keyid in (2, 0):
        try:
            with connect(timeout=0.005) as c:
                c.map(32 << 20, 64 << 20, keyid)
        except ChannelError:
            gave_up += 1
print("IMPATIENT gave up", gave_up, "times", flush=True)
"""

GUEST = f"""
import subprocess, sys
from mktme_guest.channel import connect
from mktme_emu.protocol import KeyCommand, KeyStatus, key_program
with connect() as c:
    for keyid, command in ((1, KeyCommand.SET_KEY_DIRECT), (2, KeyCommand.SET_KEY_RANDOM)):
        key, tweak = ({KEY.hex()!r}, {TWEAK.hex()!r}) if keyid == 1 else (None, None)
        assert c.program_key(key_program(keyid, command, "aes-xts-128", key, tweak)) is KeyStatus.PROG_SUCCESS
impatient = subprocess.Popen([sys.executable, "-c", {IMPATIENT!r}])
workers = [subprocess.Popen([sys.executable, "-c", {WORKER!r}, str(w)]) for w in range({WORKERS})]
codes = [w.wait() for w in workers]
open("/tmp/workers-done", "w").close()
impatient.wait()
print("GUEST worker exit codes", codes, flush=True)
sys.exit(max(codes))
"""


def test_concurrent_guest_processes_get_only_their_own_replies(tmp_path: Path,
                                                               capfd: pytest.CaptureFixture[str]) -> None:
    backend = EmulatedNvdimm(EmulatorOptions(state_dir=tmp_path / "state", size=NVDIMM))
    try:
        result = launch(LaunchOptions(nvdimm_size=NVDIMM),
                        RunRequest(command=(sys.executable, "-c", GUEST), timeout=600), [backend])
    finally:
        backend.close()
    out = capfd.readouterr().out
    assert result.exit_code == 0, out[-3000:]
    assert "GUEST worker exit codes [0, 0]" in out
    gave_up = re.search(r"IMPATIENT gave up (\d+) times", out)
    assert gave_up and int(gave_up.group(1)) > 0, "no reply was left behind: the test tested nothing"
    base = result.bases[0]
    with open(tmp_path / "state" / "media", "rb") as media:
        for w in range(WORKERS):
            media.seek(w << 20)
            cipher = media.read(REGION)
            tweaks = range(base + (w << 20), base + (w << 20) + REGION, 64)
            assert xts_reference(KEY + TWEAK, cipher, tweaks, 64, decrypt=True) == worker_data(w, ROUNDS - 1)
