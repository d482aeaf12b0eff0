"""`status` answers while a long request holds the device, and says what it is doing."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from fault_io import FaultyIO
from mktme_emu.controller import ControllerConfig, open_controller
from mktme_emu.controller.media import REWRITE_FILE
from mktme_emu.fileio import FileIO
from mktme_emu.protocol import Client
from mktme_emu.service import Backend, ServiceConfig


class SlowMediaSync(FaultyIO):
    """The real OS, but every fdatasync of the media (or of a rewritten media file,
    see emulator/controller/media.py) takes ``delay`` seconds: a slow disk."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    def fdatasync(self, fd: int) -> None:
        path = self.path_of(fd)
        if path is not None and path.name in ("media", REWRITE_FILE):
            time.sleep(self.delay)
        super().fdatasync(fd)


def test_stats_answers_during_a_slow_flush_and_names_it(tmp_path: Path) -> None:
    io: FileIO = SlowMediaSync(1.5)
    controller = open_controller(ControllerConfig(state_dir=tmp_path / "state", size=4 << 20,
                                                  base=0x1_0000_0000, view_path=tmp_path / "view"),
                                 io=io)
    service = Backend(controller, ServiceConfig(admin_socket=tmp_path / "admin.sock",
                                                guest_socket=None))
    ready = threading.Event()
    loop = asyncio.new_event_loop()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(service.serve(ready.set, install_signals=False))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        assert ready.wait(10)
        controller.view.data[:4] = b"DIRT"
        with Client.connect(service.config.admin_socket) as flusher, \
                Client.connect(service.config.admin_socket) as watcher:
            assert watcher.stats().busy == ""
            flush = threading.Thread(target=flusher.flush)
            flush.start()
            time.sleep(0.5)
            started = time.monotonic()
            size = watcher.config().size  # what `mktme-emu status` asks first
            busy = watcher.stats().busy
            answered = time.monotonic() - started
            flush.join(30)
        assert size == 4 << 20
        assert str(busy).startswith("flush") and answered < 1.0  # did not wait for the flush
    finally:
        loop.call_soon_threadsafe(service.stop)
        thread.join(30)
    assert not thread.is_alive()
