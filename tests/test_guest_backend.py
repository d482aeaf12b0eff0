"""The guest helpers against a real backend (`mktme-emu serve`) over its guest socket.

No VM: the channel is the backend's guest-role unix socket, and the phases
that need a devdax device get regions of the backend's view file instead (the
view *is* what the guest's DAX mappings see).  The VM tests run the same
phases on real /dev/dax0.0 and /dev/pmem0.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from backend_helpers import xts_reference
from mktme_emu.protocol import Client, Request, encode
from mktme_guest import channel, cli, dax, phase_keys, phases
from mktme_guest.phaselib import TEST_KEY, parse_result, program_user
from mktme_guest.physaddr import PAGE_SIZE, Extent

BASE, SIZE = 0x100000000, 64 << 20


@dataclass
class Served:
    state: Path
    view: Path

    @property
    def guest_socket(self) -> Path:
        return self.state / "guest.sock"

    @property
    def channel(self) -> str:
        return f"unix:{self.guest_socket}"

    def admin(self) -> Client:
        return Client.connect(self.state / "control.sock", timeout=30)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    """Start `mktme-emu serve` (64M at 4G) with extra options; stopped and removed at the end."""
    started: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(*options: str) -> Served:
        state = tmp_path / f"state{len(started)}"
        view = Path("/dev/shm") / f"mktme-guest-test-{os.getpid()}-{len(started)}.view"
        proc = subprocess.Popen(
            [sys.executable, "-m", "mktme_emu.cli.main", "serve", "--state-dir", str(state),
             "--size", str(SIZE), "--base", hex(BASE), "--view", str(view), *options],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        started.append((proc, view))
        deadline = time.monotonic() + 30
        while not (state / "guest.sock").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"serve did not start: {proc.stderr.read().decode() if proc.stderr else ''}")
            time.sleep(0.02)
        return Served(state, view)

    yield start
    for proc, view in started:
        proc.terminate()
        proc.wait(30)
        view.unlink(missing_ok=True)


def _guest(args: list[str], served: Served, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = cli.main(["--channel", served.channel, *args])
    out, err = capsys.readouterr()
    return status, out, err


# -- the command line -----------------------------------------------------------------------------

def test_status_and_keys(serve: Callable[..., Served], capsys: pytest.CaptureFixture[str]) -> None:
    served = serve()
    status, out, _ = _guest(["status", "--json"], served, capsys)
    info = json.loads(out)
    assert status == 0 and info["base"] == BASE and info["size"] == SIZE and info["role"] == 1
    assert "view" not in info
    for form in (["--user", TEST_KEY], ["--random"], ["--clear"], ["--no-encrypt"],
                 ["--user", TEST_KEY, "--alg", "aes-xts-128"],
                 ["--options", "type=cpu algorithm=aes-xts-256"]):
        assert _guest(["key", "--keyid", "2", *form], served, capsys)[:2] == (0, "PROG_SUCCESS\n")
    status, out, err = _guest(["key", "--keyid", "64", "--random"], served, capsys)
    assert (status, out) == (1, "INVALID_KEYID\n")
    assert err.count("\n") == 1 and "KeyID 64" in err
    status, _, err = _guest(["key", "--keyid", "2", "--options", "type=user key=00"], served, capsys)
    assert status == 1 and err.startswith("mktme-guest: ") and err.count("\n") == 1


def test_map_inspect_relocate_flush(serve: Callable[..., Served], capsys: pytest.CaptureFixture[str]) -> None:
    served = serve()
    _guest(["key", "--keyid", "3", "--user", TEST_KEY], served, capsys)
    status, out, _ = _guest(["map", "--pa", hex(BASE + 0x10000), "--length", "8K", "--keyid", "3",
                             "--json"], served, capsys)
    assert status == 0
    assert json.loads(out)["extents"] == [{"pa": BASE + 0x10000, "length": 0x2000, "logical": 0,
                                           "offset": 0x10000}]
    status, out, _ = _guest(["inspect", "--pa", hex(BASE + 0x10000), "--length", "12K", "--json"],
                            served, capsys)
    assert [(p["pa"], p["keyid"]) for p in json.loads(out)] == [
        (BASE + 0x10000, 3), (BASE + 0x11000, 3), (BASE + 0x12000, 0)]
    assert _guest(["relocate", "--src-pa", hex(BASE + 0x10000), "--dst-pa", hex(BASE + 0x20000),
                   "--length", "8K", "--mode", "keyed"], served, capsys)[0] == 0
    _, out, _ = _guest(["inspect", "--offset", "0x20000", "--json"], served, capsys)
    assert json.loads(out)[0]["keyid"] == 3
    assert _guest(["flush"], served, capsys)[:2] == (0, "0 pages written back\n")
    assert _guest(["flush", "--pa", hex(BASE), "--length", "4K"], served, capsys)[0] == 0


def test_refusals_are_one_line(serve: Callable[..., Served], capsys: pytest.CaptureFixture[str]) -> None:
    served = serve()
    for args, says in ((["map", "--pa", hex(BASE + 0x800), "--length", "4K", "--keyid", "1"], "4 KiB"),
                       (["map", "--pa", "0x1000", "--length", "4K", "--keyid", "1"], "not on the NVDIMM"),
                       (["map", "--pa", hex(BASE), "--length", "4K", "--keyid", "99"], "KeyID 99"),
                       (["relocate", "--src-pa", hex(BASE), "--dst-pa", hex(BASE + 0x1000),
                         "--length", "8K", "--mode", "raw"], "overlap"),
                       (["map", "--pa", hex(BASE), "--keyid", "1"], "--length is required")):
        status, _, err = _guest(args, served, capsys)
        assert status == 1 and err.count("\n") == 1 and says in err, (args, err)


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    commands = ["status", "key", "map", "flush", "relocate", "inspect", "namespace-key", "resolve",
                "phase", *(["phase", name] for name in phases.PHASES)]
    for command in commands:
        words = command if isinstance(command, list) else [command]
        with pytest.raises(SystemExit) as stop:
            cli.main([*words, "--help"])
        assert stop.value.code == 0
    assert "usage: mktme-guest" in capsys.readouterr().out


# -- the channel client ---------------------------------------------------------------------------

def test_guest_client_over_a_port_like_fd(serve: Callable[..., Served], tmp_path: Path) -> None:
    """The port client (PortTransport + locking) over a plain fd; a dead reader's reply is dropped."""
    served = serve()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(served.guest_socket))
    fd = os.dup(sock.fileno())
    sock.close()
    client = channel.GuestClient(channel.PortTransport(fd, timeout=10), lock_paths=(tmp_path / "lock",))
    with client:
        os.write(fd, encode(Request.GET_CONFIG, need_reply=True))  # a process that died waiting
        channel.select.select([fd], [], [], 10)
        time.sleep(0.1)
        assert client.features().role == 1
        assert client.config().base == BASE


def test_connect_from_the_environment(serve: Callable[..., Served], monkeypatch: pytest.MonkeyPatch) -> None:
    served = serve()
    monkeypatch.setenv(channel.ENV_CHANNEL, served.channel)
    with channel.connect() as client:
        assert client.config().size == SIZE


def test_map_extents_and_flush_for_real(serve: Callable[..., Served]) -> None:
    served = serve()
    secret = os.urandom(2 * PAGE_SIZE)
    with channel.connect(served.channel) as client:
        program_user(client, 2, TEST_KEY)
        done = dax.map_extents(client, [Extent(BASE + 0x3000, 0x2000, 0)], 2)
        assert done == [(0x3000, 0x2000)]
        assert [p.keyid for p in client.inspect(0x2000, 4)] == [0, 2, 2, 0]
        with open(served.view, "r+b") as view:  # the guest writes through its mapping
            view.seek(0x3000)
            view.write(secret)
        # A flush of a 10-byte extent covers its whole first page, and only it.
        assert dax.flush_extents(client, [Extent(BASE + 0x3000, 10)]).written == 1
        assert dax.flush_extents(client, [Extent(BASE + 0x3000, 0x2000)]).written == 1
        assert dax.flush_extents(client, [Extent(BASE + 0x3000, 0x2000)]) == (0, 0)
    key = bytes.fromhex(TEST_KEY.replace(":", ""))
    expected = xts_reference(key, secret, range(BASE + 0x3000, BASE + 0x5000, 64), 64)
    media = (served.state / "media").read_bytes()[0x3000:0x5000]
    assert media == expected and secret not in media


# -- phases on the view ---------------------------------------------------------------------------

@pytest.fixture
def view_regions(monkeypatch: pytest.MonkeyPatch) -> Callable[[Served], None]:
    """Make the key phases use regions of the view file instead of /dev/dax0.0."""

    def use(served: Served) -> None:
        def open_regions(client: Client, args: argparse.Namespace, count: int,
                         reconfigure: bool = True) -> tuple[dax.DaxMap, list[phase_keys.Region]]:
            fd = os.open(served.view, os.O_RDWR)
            mm = mmap.mmap(fd, SIZE)
            os.close(fd)
            m = dax.DaxMap(str(served.view), mm, 0, SIZE, False)
            length = args.pages * PAGE_SIZE
            return m, [phase_keys.Region(m, args.offset + i * length, args.offset + i * length, length)
                       for i in range(count)]

        monkeypatch.setattr(phase_keys, "_open_regions", open_regions)

    return use


@pytest.mark.parametrize("options", [(), ("--tweak", "logical"), ("--tweak", "dpa"),
                                     ("--tme", "ephemeral", "--tweak", "logical")])
def test_relocation_phase_matches_the_model(options: tuple[str, ...], serve: Callable[..., Served],
                                            view_regions: Callable[[Served], None],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    served = serve(*options)
    view_regions(served)
    status, out, _ = _guest(["phase", "relocation"], served, capsys)
    result = parse_result(out)
    outcomes = {row["case"]: row["outcome"] for row in result["cases"]}
    logical, bypass = "logical" in options, "ephemeral" not in options
    assert outcomes == {"raw": "intact" if logical else "garbage",
                        "copy-keyid0": "intact" if logical and bypass else "garbage",
                        "keyed": "intact"}
    assert status == 0 and result["ok"]


def test_lost_keys_phases_across_a_power_cycle(serve: Callable[..., Served],
                                               view_regions: Callable[[Served], None],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    served = serve()
    view_regions(served)
    status, out, _ = _guest(["phase", "lost-keys-before", "--json"], served, capsys)
    assert status == 0 and parse_result(out)["ok"]
    with served.admin() as admin:
        admin.power_cycle()
    status, out, _ = _guest(["phase", "lost-keys-after"], served, capsys)
    result = parse_result(out)
    assert status == 0, out
    assert result["keyids_after_boot"] == [0, 0]
    assert [row["outcome"] for row in result["cases"]] == ["garbage", "garbage", "intact"]


def test_lost_keys_after_without_a_power_cycle_is_unexpected(
        serve: Callable[..., Served], view_regions: Callable[[Served], None],
        capsys: pytest.CaptureFixture[str]) -> None:
    """The random key survives without a power cycle: the phase says so with exit status 3."""
    served = serve()
    view_regions(served)
    _guest(["phase", "lost-keys-before"], served, capsys)
    status, out, _ = _guest(["phase", "lost-keys-after"], served, capsys)
    assert status == 3 and not parse_result(out)["ok"]
