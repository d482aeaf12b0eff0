"""Start QEMU paused, hand the NVDIMM base to the backend, run the guest, report.

Lifecycle (all over QMP with qemu.qmp, QEMU started with -S):
  1. connect, ``query-memory-devices`` -> each backend's ``attach(base)``
     before the guest runs a single instruction, then ``cont``;
  2. RESET and SHUTDOWN events -> ``backend.power_cycle()``; GUEST_PANICKED
     (pvpanic) -> the run ends at once with status 255;
  3. the guest's init talks on the org.mktme.status port (see init.sh): we
     answer its "hello" with the boot number and the command, it reports
     "start", "exit RC" or "init-error MSG";
  4. the end: QEMU exits after the guest powers off; otherwise ``quit`` with a
     timeout, then kill.
Swapping the NVDIMM implementation is one line: pass another object that
satisfies :class:`NvdimmBackend` in ``backends``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import re
import shlex
import sys
import tempfile
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from mktme_emu.errors import BootFailure, VmError
from mktme_emu.vm import timeline
from mktme_emu.vm.qemu import NvdimmSpec, VmConfig, qemu_argv
from qemu.qmp import EventListener, QMPClient

#: Exit statuses of `run` that are not the command's own.
EXIT_PANIC = 255  # the guest kernel panicked
EXIT_BOOT_FAILURE = 254  # the command never started (init error, QEMU died, boot timeout)
EXIT_TIMEOUT = 253  # the command started but did not finish within --timeout
#: The kernel's last words at poweroff (KERN_EMERG, so `quiet` cannot hide it).
_POWER_DOWN = re.compile(rb"\[ *\d+\.\d+\] reboot: Power down\n")


class NvdimmBackend(Protocol):
    """What the launcher needs from whatever owns an NVDIMM."""

    view_path: Path  # file QEMU maps with memory-backend-file,share=on (data then label area)
    data_size: int  # bytes of the data area
    label_size: int  # 0 = no label area; QEMU nvdimm label-size=
    guest_socket: Path | None  # unix socket for the guest-role control channel, or None

    def attach(self, base: int) -> None: ...  # guest physical base, before `cont`
    def power_cycle(self) -> None: ...  # on QMP RESET and SHUTDOWN
    def close(self) -> None: ...


def spec_of(backend: NvdimmBackend) -> NvdimmSpec:
    """The QEMU-facing description of a backend."""
    return NvdimmSpec(backend.view_path, backend.data_size, backend.label_size,
                      backend.guest_socket)


class PlainNvdimm:
    """An unencrypted NVDIMM: a 0600 file in /dev/shm; records calls for tests."""

    def __init__(self, data_size: int, label_size: int = 0, directory: Path = Path("/dev/shm"),
                 guest_socket: Path | None = None) -> None:
        self.data_size = data_size
        self.label_size = label_size
        self.guest_socket = guest_socket
        fd, name = tempfile.mkstemp(prefix="mktme-plain-", suffix=".view", dir=directory)
        os.ftruncate(fd, data_size + label_size)
        os.close(fd)  # mkstemp already made it 0600
        self.view_path = Path(name)
        self.bases: list[int] = []
        self.power_cycles = 0

    def attach(self, base: int) -> None:
        self.bases.append(base)

    def power_cycle(self) -> None:
        self.power_cycles += 1

    def close(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.view_path.unlink()


@dataclass
class VmResult:
    """How a VM run ended.  ``exit_code`` is what `mktme-emu run` exits with."""

    status: int | None = None  # the command's exit status, when it reported one
    panicked: bool = False
    started: bool = False
    timed_out: bool = False
    init_error: str | None = None
    boots: int = 0  # how many times init started (1 + guest reboots)
    bases: list[int] = field(default_factory=list)
    console_tail: str = ""
    output: str = ""  # the whole console output, when the request asked to capture it
    phases: tuple[timeline.PhaseMark, ...] = ()  # when each phase was reached (bench)

    @property
    def exit_code(self) -> int:
        if self.panicked:
            return EXIT_PANIC
        if self.status is not None:
            return self.status
        return EXIT_TIMEOUT if self.started and self.timed_out else EXIT_BOOT_FAILURE

    def describe(self) -> str:
        """One line saying why the run ended, for stderr."""
        if self.panicked:
            return "guest kernel panicked"
        if self.status is not None:
            return f"guest command exited with status {self.status}"
        if self.init_error:
            return f"guest init failed: {self.init_error}"
        if self.timed_out:
            return "timed out " + ("running the command" if self.started else "booting")
        return "guest stopped before reporting a status"


def command_script(argv: Sequence[str], cwd: str | None = None) -> str:
    """The guest-side script for ``argv``: each word single-quoted, then exec'd.

    Quoting is shlex's POSIX quoting, so any bytes survive; the script travels
    base64-encoded on the status channel, never through a host shell.
    """
    lines = []
    if cwd:
        lines.append(f"cd -- {shlex.quote(cwd)} 2>/dev/null || cd /")
    lines.append("exec " + shlex.join(argv))
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class RunRequest:
    """What the guest should do at each boot."""

    command: tuple[str, ...] = ()  # empty = an interactive shell
    cwd: str | None = None
    interactive: bool = False
    timeout: float | None = 300.0  # whole run
    boot_timeout: float = 60.0  # until the command starts
    echo: bool = True  # stream the console to stdout (run mode)
    capture: bool = False  # keep the whole console output in VmResult.output


class _Session:
    """One QEMU process and the asyncio tasks around it."""

    def __init__(self, cfg: VmConfig, backends: Sequence[NvdimmBackend], req: RunRequest):
        self.cfg, self.backends, self.req = cfg, backends, req
        self.result = VmResult()
        self.tail: deque[bytes] = deque(maxlen=64)
        self.captured: list[bytes] = []
        self.started = asyncio.Event()
        self.finished = asyncio.Event()
        self.qmp = QMPClient("mktme-emu")
        self.proc: asyncio.subprocess.Process | None = None
        self.hello_this_boot = False
        self.last_reset = 0.0
        self.timer = timeline.PhaseTimer()

    # -- guest channels ------------------------------------------------------
    def _hello_reply(self) -> bytes:
        lines = [f"boot {self.result.boots}"]  # 0 = first boot
        if self.req.command:
            script = command_script(self.req.command, self.req.cwd).encode()
            lines.append("cmd " + base64.b64encode(script).decode())
        if self.req.interactive:
            lines.append("interactive")
        return ("\n".join([*lines, "go"]) + "\n").encode()

    async def _status(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve the guest init's status port for the whole VM lifetime (all boots)."""
        while line := await reader.readline():
            key, _, value = line.decode(errors="replace").strip().partition(" ")
            if key == "hello":
                self.timer.mark(timeline.INIT_HELLO, value)
                self.hello_this_boot = True
                writer.write(self._hello_reply())
                self.result.boots += 1
                await writer.drain()
            elif key == "start":
                self.timer.mark(timeline.COMMAND_START)
                self.result.started = True
                self.started.set()
            elif key == "exit":
                self.timer.mark(timeline.COMMAND_EXIT)
                self.result.status = int(value)
                self.finished.set()
            elif key == "init-error":
                self.result.init_error = value
                self.finished.set()

    async def _console(self, reader: asyncio.StreamReader, _: asyncio.StreamWriter) -> None:
        """Stream the serial console to stdout (minus the tty's \\r) and keep its tail.

        A partial line that may be a kernel message ("[  time] ...") is held
        until its newline, so the poweroff message can be dropped whole.
        """
        pending = b""
        while chunk := await reader.read(4096):
            self.tail.append(chunk)
            if self.req.capture:
                self.captured.append(chunk)
            if b"Kernel panic - not syncing" in b"".join(list(self.tail)[-2:]):
                self.result.panicked = True
                self.finished.set()
            if not self.req.echo:
                continue
            data = (pending + chunk).replace(b"\r\n", b"\n")
            cut = data.rfind(b"\n") + 1
            hold = data[cut:].startswith(b"[") and len(data) - cut < 256
            data, pending = (data[:cut], data[cut:]) if hold else (data, b"")
            sys.stdout.buffer.write(_POWER_DOWN.sub(b"", data))
            sys.stdout.buffer.flush()
        sys.stdout.buffer.write(pending)
        sys.stdout.buffer.flush()

    # -- QMP -----------------------------------------------------------------
    async def _connect_qmp(self) -> None:
        """Connect once QEMU has created its QMP socket; fail fast if QEMU died."""
        assert self.proc is not None
        for _ in range(200):
            if self.proc.returncode is not None:
                raise BootFailure(f"QEMU exited with status {self.proc.returncode} at start-up")
            if self.cfg.qmp_socket.exists():
                with contextlib.suppress(ConnectionError, OSError):
                    await self.qmp.connect(str(self.cfg.qmp_socket))
                    return
            await asyncio.sleep(0.05)
        raise BootFailure("QEMU's QMP socket did not come up within 10 s")

    async def _attach_backends(self) -> None:
        """Give each backend the base QEMU placed its NVDIMM at (never guessed)."""
        devices = await self.qmp.execute("query-memory-devices")
        assert isinstance(devices, list)
        bases = {d["data"]["id"]: d["data"]["addr"] for d in devices if d["type"] == "nvdimm"}
        for i, backend in enumerate(self.backends):
            base = bases.get(f"nvdimm{i}")
            if base is None:
                raise VmError(f"QEMU reports no NVDIMM nvdimm{i} (query-memory-devices)")
            backend.attach(base)
            self.result.bases.append(base)

    async def _events(self, listener: EventListener) -> None:
        """Power-cycle backends on RESET/SHUTDOWN; end the run on GUEST_PANICKED."""
        async for event in listener:
            name = event["event"]
            if name == "GUEST_PANICKED":
                self.result.panicked = True
                self.finished.set()
                continue
            for backend in self.backends:
                await asyncio.to_thread(backend.power_cycle)
            if name == "RESET":
                # A reset long after the last one with no hello from init in
                # between: a panic before pvpanic was loaded (panic=-1 resets at
                # once).  SeaBIOS resets once more right after a reboot: ignored.
                now = asyncio.get_running_loop().time()
                if not self.hello_this_boot and now - self.last_reset > 1.0:
                    self.result.panicked = True
                    self.finished.set()
                self.hello_this_boot = False
                self.last_reset = now

    async def _watch_qemu(self) -> None:
        assert self.proc is not None
        await self.proc.wait()
        self.finished.set()

    async def _wait_done(self) -> None:
        """Wait for the end of the run, applying the boot and total timeouts."""
        loop = asyncio.get_running_loop()
        deadline = None if self.req.timeout is None else loop.time() + self.req.timeout
        try:
            await asyncio.wait_for(self._first(self.started, self.finished),
                                   self.req.boot_timeout)
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            await asyncio.wait_for(self.finished.wait(), remaining)
        except TimeoutError:
            self.result.timed_out = True

    @staticmethod
    async def _first(*events: asyncio.Event) -> None:
        waits = [asyncio.ensure_future(e.wait()) for e in events]
        _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()

    async def _stop_qemu(self, grace: float = 5.0) -> None:
        """Let QEMU exit by itself, else `quit` over QMP, else kill it."""
        assert self.proc is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.proc.wait(), 1.0 if not self.result.panicked else 0)
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.qmp.execute("quit"), grace)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), grace)
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        with contextlib.suppress(Exception):
            await self.qmp.disconnect()

    async def run(self) -> VmResult:
        """Start QEMU, drive it to the end of the run, and always stop it."""
        qmp_log = logging.getLogger("qemu.qmp")
        if qmp_log.level == logging.NOTSET:  # its INFO lines (EOF at quit) are noise here
            qmp_log.setLevel(logging.WARNING)
        status = await asyncio.start_unix_server(self._status, path=self.cfg.status_socket)
        console = None
        if not self.cfg.interactive:
            console = await asyncio.start_unix_server(self._console, path=self.cfg.console_socket)
        stdio = None if self.cfg.interactive else asyncio.subprocess.DEVNULL
        try:
            self.proc = await asyncio.create_subprocess_exec(*qemu_argv(self.cfg), stdin=stdio,
                                                             pass_fds=self.cfg.pass_fds)
        except FileNotFoundError as exc:
            raise VmError(f"{self.cfg.qemu} not found: install qemu-system-x86") from exc
        self.timer.mark(timeline.QEMU_STARTED)
        tasks: list[asyncio.Task[None]] = []
        try:
            await self._connect_qmp()
            self.timer.mark(timeline.QMP_READY)
            listener = EventListener(("RESET", "SHUTDOWN", "GUEST_PANICKED"))
            self.qmp.register_listener(listener)
            tasks = [asyncio.create_task(c) for c in (self._events(listener), self._watch_qemu())]
            await self._attach_backends()
            self.last_reset = asyncio.get_running_loop().time()
            await self.qmp.execute("cont")
            self.timer.mark(timeline.GUEST_RUNNING)
            await self._wait_done()
        finally:
            await self._stop_qemu()
            for task in tasks:
                task.cancel()
            status.close()
            if console:
                console.close()
            self.timer.mark(timeline.TEARDOWN)
            self.result.phases = self.timer.marks()
        self.result.console_tail = b"".join(self.tail).decode(errors="replace")
        self.result.output = b"".join(self.captured).decode(errors="replace")
        if not self.result.console_tail and self.cfg.console_log.exists():
            self.result.console_tail = self.cfg.console_log.read_text(errors="replace")[-4096:]
        return self.result


def run_vm(cfg: VmConfig, backends: Sequence[NvdimmBackend], req: RunRequest) -> VmResult:
    """Boot ``cfg`` with ``backends`` as its NVDIMMs, do ``req``, return how it ended.

    Blocks until the guest powers off, panics, or a timeout passes (QEMU is
    then stopped: quit, then kill).  Raises VmError/BootFailure for host-side
    problems (QEMU missing or dying at start-up, no NVDIMM in QMP); guest-side
    outcomes (exit status, panic, init failure, timeout) are in the result.
    Does not close the backends: their owner does.
    """
    if len(cfg.nvdimms) != len(backends):
        raise VmError("VmConfig.nvdimms must describe the given backends (use spec_of)")
    return asyncio.run(_Session(cfg, backends, req).run())
