"""QEMU's QMP socket closing at the end of a run is not an error (launcher.QuietTeardown).

Every `mktme-emu run` used to end with "Task.Reader: ConnectionResetError" on
stderr: qemu.qmp's reader task dying when QEMU exits.  That line is dropped
once QEMU is meant to exit; the same line while the guest still runs, and any
other QMP error, is still shown.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from mktme_emu.vm.kernel import cache_dir, load_kernel
from mktme_emu.vm.launcher import QuietTeardown

RESET = "ConnectionResetError: [Errno 104] Connection reset by peer"


def _record(msg: str, *args: object, level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord("qemu.qmp.protocol.mktme-emu", level, __file__, 1, msg, args, None)


@pytest.mark.parametrize("summary", [RESET, "BrokenPipeError: [Errno 32] Broken pipe",
                                     "EOFError", "ConnectionAbortedError: aborted"])
def test_a_disconnect_is_dropped_only_once_qemu_is_meant_to_exit(summary: str) -> None:
    ending = False
    quiet = QuietTeardown(lambda: ending)
    assert quiet.filter(_record("Task.%s: %s", "Reader", summary))  # QEMU died mid-run: shown
    ending = True
    assert not quiet.filter(_record("Task.%s: %s", "Reader", summary))
    assert not quiet.filter(_record("%s: %s", "Failed to flush the writer", summary))


def test_other_qmp_errors_are_always_shown() -> None:
    quiet = QuietTeardown(lambda: True)
    assert quiet.filter(_record("Task.%s: %s", "Reader",
                                "qemu.qmp.protocol.ProtocolError: malformed message"))
    assert quiet.filter(_record("QMP said: %s", "something went wrong"))
    assert quiet.filter(_record("no arguments at all"))
    assert quiet.filter(_record("Task.%s: %s", "Reader", RESET, level=logging.DEBUG))


def test_the_filter_works_on_a_logger() -> None:
    logger = logging.getLogger("qemu.qmp.protocol.test-quiet-teardown")
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Keep()
    logger.addHandler(handler)
    logger.propagate = False
    quiet = QuietTeardown(lambda: True)
    logger.addFilter(quiet)
    try:
        logger.error("Task.%s: %s", "Reader", RESET)
        logger.error("Task.%s: %s", "Reader", "ValueError: bad JSON")
    finally:
        logger.removeFilter(quiet)
        logger.removeHandler(handler)
    assert seen == ["Task.Reader: ValueError: bad JSON"]


@pytest.mark.vm
@pytest.mark.skipif(load_kernel(cache_dir()) is None,
                    reason="no guest kernel: run `mktme-emu kernel fetch`")
def test_run_true_says_nothing_but_its_info_lines(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "mktme_emu.cli.main", "run", "--nvdimm-size", "64M",
                          "--timeout", "240", "--", "true"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stderr.splitlines()
    assert all(line.startswith(("mktme-emu: kernel:", "mktme-emu: accel:", "mktme-emu: vm:"))
               for line in lines), lines


async def _qmp_peer_exits(sock: Path, quiet: QuietTeardown) -> list[str]:
    """What a real QMPClient logs at WARNING and above when its peer exits as QEMU does.

    The fake QEMU greets, negotiates, then exits without reading the next
    command (as QEMU does with our `stop` after the guest's SHUTDOWN): the
    kernel resets the connection, and qemu.qmp's reader task dies of it.
    """
    import asyncio

    from qemu.qmp import QMPClient

    async def qemu(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, '
                     b'"package": ""}, "capabilities": []}}\r\n')
        await reader.read(4096)  # qmp_capabilities (no newline: QMP is a JSON stream)
        writer.transport.pause_reading()  # what comes next stays in the kernel, unread
        writer.write(b'{"return": {}}\r\n')
        await writer.drain()
        await asyncio.sleep(0.2)  # the client's `stop` arrives
        writer.transport.abort()  # closing with unread data resets the connection

    server = await asyncio.start_unix_server(qemu, path=sock)
    client = QMPClient("test-quiet-teardown")
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Keep(logging.WARNING)
    client.logger.addHandler(handler)
    client.logger.addFilter(quiet)
    try:
        await client.connect(str(sock))
        with pytest.raises(Exception):  # noqa: B017 (the command is cut off: any error)
            await asyncio.wait_for(client.execute("stop"), 5)
        with contextlib.suppress(Exception):  # as the launcher's _stop_qemu
            await client.disconnect()
    finally:
        client.logger.removeFilter(quiet)
        client.logger.removeHandler(handler)
        server.close()
    return seen


def test_a_real_qmp_client_reports_the_reset_and_the_filter_drops_it(tmp_path: Path) -> None:
    import asyncio

    # Without the filter's consent (QEMU not meant to exit) the line is there, as it was on
    # every run before: this is the library's record the filter must recognise.
    shown = asyncio.run(_qmp_peer_exits(tmp_path / "a.sock", QuietTeardown(lambda: False)))
    assert any(line.startswith("Task.Reader: ConnectionResetError") for line in shown), shown
    assert asyncio.run(_qmp_peer_exits(tmp_path / "b.sock", QuietTeardown(lambda: True))) == []
