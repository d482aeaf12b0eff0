"""The launcher's pure parts, without QEMU: status protocol, console filter, reset clock."""

from __future__ import annotations

import base64
import subprocess

import pytest
from mktme_emu.errors import VmError
from mktme_emu.vm.console import ConsoleFilter
from mktme_emu.vm.launcher import EXIT_BOOT_FAILURE, EXIT_PANIC, ResetClock, VmResult
from mktme_emu.vm.qemu import nvdimm_bases, nvdimm_id
from mktme_emu.vm.status import GuestPlan, RwDir, StatusProtocol


def _reply_lines(reply: bytes) -> list[str]:
    return reply.decode().splitlines()


def test_hello_gets_boot_number_command_and_rwdirs() -> None:
    plan = GuestPlan(command=("echo", "a b"), cwd="/tmp/x", rwdirs=(RwDir("rw0", "/r, s"),))
    proto = StatusProtocol(plan)  # type: ignore[arg-type]
    kind, reply = proto.feed(b"hello\n")
    lines = _reply_lines(reply)
    assert kind == "hello" and lines[0] == "boot 0" and lines[-1] == "go"
    script = base64.b64decode(lines[1].removeprefix("cmd ")).decode()
    out = subprocess.run(["sh", "-c", script.replace("exec ", "")], capture_output=True,
                         text=True, cwd="/")
    assert out.stdout == "a b\n"
    tag, path = lines[2].split()[1:]
    assert (lines[2].split()[0], tag, base64.b64decode(path)) == ("rw", "rw0", b"/r, s")
    assert _reply_lines(proto.feed("hello")[1])[0] == "boot 1"
    assert proto.state.boots == 2


def test_start_exit_and_init_error_are_recorded() -> None:
    proto = StatusProtocol(GuestPlan(interactive=True))
    assert "interactive" in _reply_lines(proto.feed("hello")[1])
    assert proto.feed("start\n") == ("start", b"")
    assert proto.state.started and not proto.state.finished
    assert proto.feed("exit 7\n") == ("exit", b"")
    assert proto.state.status == 7 and proto.state.finished
    other = StatusProtocol(GuestPlan())
    other.feed("init-error cannot mount the host root over 9p")
    assert other.state.init_error == "cannot mount the host root over 9p"


def test_malformed_lines_are_kept_not_fatal() -> None:
    proto = StatusProtocol(GuestPlan())
    assert proto.feed("exit lots\n")[0] == "ignored"
    assert proto.feed(b"\xff\xfegarbage\n")[0] == "ignored"
    assert proto.state.status is None and len(proto.state.malformed) == 2


def test_console_strips_cr_and_the_poweroff_line() -> None:
    con = ConsoleFilter()
    shown = con.feed(b"hello\r\n[    1.234] reboot: Pow")  # the kernel line is held
    assert shown == b"hello\n"
    assert con.feed(b"er down\r\n") == b""
    assert con.feed(b"$ ") == b"$ "  # a prompt is not held
    assert not con.panicked


def test_console_finds_a_panic_split_across_chunks() -> None:
    con = ConsoleFilter(capture=True)
    con.feed(b"x" * 5000 + b"Kernel pan")
    assert not con.panicked
    con.feed(b"ic - not syncing: sysrq triggered crash\n")
    assert con.panicked and "not syncing" in con.tail()
    assert con.captured().startswith("xxx")


def test_console_flush_returns_what_was_held() -> None:
    con = ConsoleFilter()
    assert con.feed(b"[    2.0] partial") == b""
    assert con.flush() == b"[    2.0] partial"


def test_nvdimm_ids_and_bases_from_qmp() -> None:
    devices = [{"type": "dimm", "data": {"id": "d", "addr": 1}},
               {"type": "nvdimm", "data": {"id": nvdimm_id(1), "addr": 0x2_0000_0000}},
               {"type": "nvdimm", "data": {"id": nvdimm_id(0), "addr": 0x1_0000_0000}}]
    assert nvdimm_bases(devices, 2) == [0x1_0000_0000, 0x2_0000_0000]
    with pytest.raises(VmError, match="nvdimm2"):
        nvdimm_bases(devices, 3)


def test_reset_clock_ignores_time_spent_stopped() -> None:
    clock = ResetClock()
    clock.resumed(100.0)  # first cont
    clock.hello()
    assert not clock.reset(105.0)  # `reboot` after init said hello
    # A 3 s power cycle: stop, cycle, cont at 108; SeaBIOS resets just after.
    clock.resumed(108.0)
    assert not clock.reset(108.05)
    clock.resumed(108.06)
    assert clock.reset(112.0)  # ran 4 s after the reset with no hello: a panic


def test_interactive_exit_codes() -> None:
    assert VmResult(interactive=True).exit_code == 0  # Ctrl-A X, poweroff
    assert VmResult(interactive=True, status=3, started=True).exit_code == 0  # `exit 3`
    assert VmResult(interactive=True, panicked=True).exit_code == EXIT_PANIC
    assert VmResult(interactive=True, init_error="x").exit_code == EXIT_BOOT_FAILURE
    assert not VmResult(interactive=True).failed
    assert VmResult().failed and VmResult(interrupted=15).exit_code == 143
