"""mktme_guest.channel without a backend: finding the port, timeouts, stale bytes, locking."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from mktme_guest import channel
from mktme_guest.errors import ChannelError


def _fake_ports(root: Path, names: dict[str, str]) -> tuple[Path, Path]:
    """/dev/vportNpM nodes and /sys/class/virtio-ports/vportNpM/name files."""
    dev, sysfs = root / "dev", root / "sys"
    dev.mkdir()
    for node, name in names.items():
        (dev / node).touch()
        (sysfs / "class" / "virtio-ports" / node).mkdir(parents=True)
        (sysfs / "class" / "virtio-ports" / node / "name").write_text(name + "\n")
    return dev, sysfs


def test_find_port_scans_sysfs(tmp_path: Path) -> None:
    dev, sysfs = _fake_ports(tmp_path, {"vport0p1": "org.mktme.status", "vport0p2": channel.PORT_NAME})
    assert channel.find_port(dev=dev, sysfs=sysfs) == dev / "vport0p2"


def test_find_port_prefers_the_named_symlink(tmp_path: Path) -> None:
    dev, sysfs = _fake_ports(tmp_path, {"vport0p2": channel.PORT_NAME, "vport1p1": "other"})
    (dev / "virtio-ports").mkdir()
    (dev / "virtio-ports" / channel.PORT_NAME).symlink_to(dev / "vport1p1")
    assert channel.find_port(dev=dev, sysfs=sysfs) == dev / "virtio-ports" / channel.PORT_NAME


def test_find_port_says_what_is_missing(tmp_path: Path) -> None:
    dev, sysfs = _fake_ports(tmp_path, {"vport0p1": "org.mktme.status"})
    with pytest.raises(ChannelError, match=r"no virtio-serial port named org\.mktme\.control"):
        channel.find_port(dev=dev, sysfs=sysfs)
    (sysfs / "class" / "virtio-ports" / "vport0p9").mkdir()
    (sysfs / "class" / "virtio-ports" / "vport0p9" / "name").write_text(channel.PORT_NAME)
    with pytest.raises(ChannelError, match="vport0p9 is missing"):
        channel.find_port(dev=dev, sysfs=sysfs)


def test_open_port_waits_while_busy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "port"
    target.touch()
    real_open, calls = os.open, []

    def busy_twice(path: object, flags: int, *rest: object) -> int:
        calls.append(path)
        if len(calls) <= 2:
            raise OSError(errno.EBUSY, "Device or resource busy")
        return real_open(path, flags, *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(channel.os, "open", busy_twice)
    monkeypatch.setattr(channel, "_BUSY_RETRY", 0.001)
    fd = channel.open_port(target, timeout=5)
    os.close(fd)
    assert len(calls) == 3
    with pytest.raises(ChannelError, match="cannot open"):
        channel.open_port(tmp_path / "absent", timeout=5)


def test_port_transport_times_out() -> None:
    a, b = socket.socketpair()
    transport = channel.PortTransport(os.dup(a.fileno()), timeout=0.1)
    try:
        with pytest.raises(ChannelError, match=r"did not answer within 0\.1 s"):
            transport.recv_exact(12)
        b.sendall(b"stale")
        assert transport.drain() == 5
        assert transport.drain() == 0
        b.sendall(b"abc")
        assert transport.recv_exact(3) == (b"abc", [])
    finally:
        transport.close()
        a.close()
        b.close()


def test_exclusive_excludes_other_processes(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    probe = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR)\n"
             "try: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
             "except BlockingIOError: sys.exit(7)\n")
    with channel.exclusive((lock,)):
        held = subprocess.run([sys.executable, "-c", probe, str(lock)], check=False)
    free = subprocess.run([sys.executable, "-c", probe, str(lock)], check=False)
    assert (held.returncode, free.returncode) == (7, 0)


def test_exclusive_without_a_lock_file_still_runs(tmp_path: Path) -> None:
    """No lock file can be made: the body runs anyway, creates nothing, and errors pass through."""
    missing = tmp_path / "no" / "such" / "dir" / "lock"
    ran: list[bool] = []
    with channel.exclusive((missing,)):
        ran.append(True)
    assert ran == [True]
    assert not (tmp_path / "no").exists()
    with pytest.raises(KeyError), channel.exclusive((missing,)):
        raise KeyError("from the body")


def test_exclusive_falls_back_to_the_next_lock_path(tmp_path: Path) -> None:
    missing, second = tmp_path / "absent" / "lock", tmp_path / "lock"
    probe = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR)\n"
             "try: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
             "except BlockingIOError: sys.exit(7)\n")
    with channel.exclusive((missing, second)):
        held = subprocess.run([sys.executable, "-c", probe, str(second)], check=False)
    assert held.returncode == 7


def test_exclusive_lock_is_per_call(tmp_path: Path) -> None:
    """Each call opens its own description, so a forked child sharing fds cannot slip in."""
    lock = tmp_path / "lock"
    with channel.exclusive((lock,)):
        fd = os.open(lock, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)


def test_timeout_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(channel.ENV_TIMEOUT, "2.5")
    assert channel.channel_timeout() == 2.5
    monkeypatch.setenv(channel.ENV_TIMEOUT, "soon")
    with pytest.raises(ChannelError, match="not a number"):
        channel.channel_timeout()


def test_connect_without_a_port(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(channel.ENV_CHANNEL, raising=False)
    with pytest.raises(ChannelError, match="cannot open"):
        channel.connect(tmp_path / "vport9p9", timeout=1)
