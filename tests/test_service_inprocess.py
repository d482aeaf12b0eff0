"""The service in-process, for what a separate process cannot stage: a busy device, shutdown."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mktme_emu.controller import ControllerConfig, open_controller
from mktme_emu.errors import ErrorCode, RemoteError
from mktme_emu.protocol import Client, KeyCommand, KeyStatus, key_program
from mktme_emu.service import Backend, ServiceConfig

BUSY_TIMEOUT = 0.3


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[Backend]:
    controller = open_controller(ControllerConfig(state_dir=tmp_path / "state", size=4 << 20,
                                                  base=0x1_0000_0000, view_path=tmp_path / "view"))
    service = Backend(controller, ServiceConfig(admin_socket=tmp_path / "admin.sock",
                                                guest_socket=None, busy_timeout=BUSY_TIMEOUT))
    ready = threading.Event()
    loop = asyncio.new_event_loop()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(service.serve(ready.set, install_signals=False))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(10)
    yield service
    loop.call_soon_threadsafe(service.stop)
    thread.join(30)
    assert not thread.is_alive()


def test_key_program_answers_device_busy_when_the_device_stays_held(backend: Backend) -> None:
    user = key_program(1, KeyCommand.SET_KEY_DIRECT, "aes-xts-128", "11" * 16, "22" * 16)
    with Client.connect(backend.config.admin_socket) as client:
        backend._lock.acquire()  # a long request holds the device
        try:
            started = time.monotonic()
            assert client.program_key(user) is KeyStatus.DEVICE_BUSY
            waited = time.monotonic() - started
        finally:
            backend._lock.release()
        assert BUSY_TIMEOUT * 0.8 <= waited < BUSY_TIMEOUT + 5
        assert backend.controller.keys.cipher(1) is None  # nothing changed
        assert client.program_key(user) is KeyStatus.PROG_SUCCESS


def test_requests_queued_at_shutdown_are_refused_not_run(backend: Backend) -> None:
    backend._close_controller()  # what the stop path does before the executor drains
    with Client.connect(backend.config.admin_socket) as client, \
            pytest.raises(RemoteError, match="shutting down") as info:
        client.flush()
    assert info.value.code == ErrorCode.STATE
