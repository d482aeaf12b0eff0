"""The service in-process, for what a separate process cannot stage: a busy device, shutdown,
a failing controller, sockets that belong to someone else."""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from pathlib import Path

import pytest
from inprocess_backend import new_controller, served
from mktme_emu.controller import MemoryController
from mktme_emu.errors import ErrorCode, RemoteError, StateError
from mktme_emu.protocol import Client, KeyCommand, KeyStatus, key_program

BUSY_TIMEOUT = 0.3


def test_key_program_answers_device_busy_when_the_device_stays_held(tmp_path: Path) -> None:
    user = key_program(1, KeyCommand.SET_KEY_DIRECT, "aes-xts-128", "11" * 16, "22" * 16)
    with served(new_controller(tmp_path), tmp_path, busy_timeout=BUSY_TIMEOUT) as backend, \
            Client.connect(backend.config.admin_socket) as client:
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


def test_requests_queued_at_shutdown_are_refused_not_run(tmp_path: Path) -> None:
    with served(new_controller(tmp_path), tmp_path) as backend:
        backend._close_controller()  # what the stop path does before the executor drains
        with Client.connect(backend.config.admin_socket) as client, \
                pytest.raises(RemoteError, match="shutting down") as info:
            client.flush()
        assert info.value.code == ErrorCode.STATE


# -- errors to the guest name no host path ------------------------------------------------------

class FailingFlush:
    """The real controller, but flush fails as a full disk makes it fail (with a host path)."""

    def __init__(self, inner: MemoryController, error: Exception) -> None:
        self._inner, self._error = inner, error

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    def flush(self, *args: int) -> int:
        raise self._error


def _disk_full(path: Path, wrapped: bool) -> Exception:
    cause = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    if not wrapped:
        return cause
    try:
        raise StateError(f"cannot write {path}: {cause.strerror}") from cause
    except StateError as exc:
        return exc


@pytest.mark.parametrize("wrapped", [False, True])
def test_an_io_error_reaches_the_guest_without_host_paths(tmp_path: Path, wrapped: bool,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    tmp_file = tmp_path / "state" / "metadata.tmp"
    controller = FailingFlush(new_controller(tmp_path), _disk_full(tmp_file, wrapped))
    with served(controller, tmp_path) as backend, caplog.at_level(logging.ERROR):
        assert backend.config.guest_socket is not None
        with Client.connect(backend.config.guest_socket, 30) as guest, pytest.raises(RemoteError) as info:
            guest.flush()
        assert info.value.code == ErrorCode.INTERNAL
        assert str(tmp_path) not in str(info.value) and "metadata.tmp" not in str(info.value)
        assert "No space left on device" in str(info.value)
        with Client.connect(backend.config.admin_socket, 30) as admin, pytest.raises(RemoteError) as host:
            admin.flush()
        assert "metadata.tmp" in str(host.value)  # the host's own tools may see it
    assert "metadata.tmp" in caplog.text  # and the log keeps the detail


# -- sockets: only its own are unlinked ----------------------------------------------------------

def test_a_second_backend_on_the_same_sockets_is_refused_and_unlinks_nothing(tmp_path: Path) -> None:
    with served(new_controller(tmp_path / "one"), tmp_path) as first:
        inode = os.stat(first.config.admin_socket).st_ino
        with pytest.raises(StateError, match="another backend is serving"), \
                served(new_controller(tmp_path / "two"), tmp_path):
            pass
        assert os.stat(first.config.admin_socket).st_ino == inode
        with Client.connect(first.config.admin_socket, 30) as client:
            assert client.features().role == 0


def test_a_stale_socket_is_replaced_and_a_foreign_one_outlives_the_stop(tmp_path: Path) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "admin.sock"))
    stale.close()  # a crashed backend's leftover: nobody listens
    foreign = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with served(new_controller(tmp_path), tmp_path) as backend:
            with Client.connect(backend.config.admin_socket, 30) as client:
                assert client.features().role == 0
            backend.config.admin_socket.unlink()  # someone else takes the path meanwhile
            foreign.bind(str(backend.config.admin_socket))
            foreign.listen()
            foreign_inode = os.stat(backend.config.admin_socket).st_ino
        assert os.stat(tmp_path / "admin.sock").st_ino == foreign_inode
        assert not (tmp_path / "guest.sock").exists()  # its own socket is removed
    finally:
        foreign.close()


def test_a_file_in_the_way_of_a_socket_is_not_replaced(tmp_path: Path) -> None:
    (tmp_path / "guest.sock").write_text("not a socket")
    with pytest.raises(StateError, match="not a socket"), served(new_controller(tmp_path), tmp_path):
        pass
    assert (tmp_path / "guest.sock").read_text() == "not a socket"
