"""Start QEMU paused, hand the NVDIMM base to the backends, run the guest, report.

This module owns the QEMU process and its QMP connection; the pure parts live
beside it: what a run is asked and how it ended in :mod:`.outcome`, the
status-line protocol in :mod:`.status`, the console filter and
panic scanner in :mod:`.console`, the backend protocol in :mod:`.nvdimm`, the
``nvdimm{i}`` id contract in :mod:`.qemu`, cleanup after a crash in
:mod:`.lifetime`.

Lifecycle (QEMU started with -S):
  1. connect QMP, ``query-memory-devices`` -> each backend's ``attach(base)``
     before the guest runs a single instruction, then ``cont``;
  2. RESET and SHUTDOWN -> ``stop``, every backend's ``power_cycle()``, then
     ``cont`` (after RESET): the guest never runs during a power cycle.
     GUEST_PANICKED (pvpanic) -> the run ends at once with status 255;
  3. init's status port (:mod:`.status`): hello, start, exit RC, init-error;
  4. the end: QEMU exits after the guest powers off; otherwise ``quit`` with a
     timeout, then kill.  SIGINT/SIGTERM/SIGHUP end the run the same way.
Phase events (``PhaseHook``) mark the way for a boot timer: qemu-started, qmp-connected,
guest-running, init-hello, command-start, command-end, teardown-done.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from mktme_emu.errors import BackendUnreachable, BootFailure, MktmeError, VmError
from mktme_emu.vm import timeline
from mktme_emu.vm.console import ConsoleFilter
from mktme_emu.vm.lifetime import WATCHDOG, die_with_parent
from mktme_emu.vm.nvdimm import NvdimmBackend, PlainNvdimm, spec_of
from mktme_emu.vm.outcome import (
    EXIT_BOOT_FAILURE,
    EXIT_PANIC,
    EXIT_TIMEOUT,
    RunRequest,
    VmResult,
)
from mktme_emu.vm.qemu import VmConfig, nvdimm_bases, qemu_argv
from mktme_emu.vm.status import GuestPlan, StatusProtocol, command_script
from qemu.qmp import EventListener, QMPClient

__all__ = ["EXIT_BOOT_FAILURE", "EXIT_PANIC", "EXIT_TIMEOUT", "NvdimmBackend", "PhaseHook",
           "PlainNvdimm", "RunRequest", "VmResult", "command_script", "run_vm", "spec_of"]

#: A RESET after the guest ran this long without init saying hello is a panic
#: (panic=-1 resets at once, before pvpanic can be loaded); SeaBIOS's own
#: second RESET right after a reboot comes within milliseconds of running.
PANIC_RESET_AFTER = 1.0
# How long a power cycle waits for a backend whose socket refuses (restarted
# by hand, or by a test) to answer again; the vCPUs stay stopped meanwhile.
BACKEND_RETURN_TIMEOUT = 30.0
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

#: Called with a phase name as the run passes it (see the module docstring).
PhaseHook = Callable[[str], None]
Progress = Callable[[str], None]


def _ignore(_: str) -> None:
    """The default hook: nobody is listening."""


def _event_time(event: Mapping[str, Any]) -> float:
    """A QMP event's own timestamp (QEMU's clock when it happened, not when we read it)."""
    stamp = event.get("timestamp") or {}
    return float(stamp.get("seconds", 0)) + float(stamp.get("microseconds", 0)) / 1e6


class ResetClock:
    """Tells a panic's RESET from a reboot's, by QEMU's own event timestamps.

    A RESET is a panic when init did not say hello since the last reset and
    the guest *ran* long enough to have said it.  Time spent stopped (a power
    cycle of a big device) does not count: we measure from the later of the
    last RESET and the last RESUME (our ``cont``), never by our own clock.
    """

    def __init__(self) -> None:
        self.hello_this_boot = False
        self.last_reset = 0.0
        self.running_since = 0.0

    def hello(self) -> None:
        self.hello_this_boot = True

    def resumed(self, when: float) -> None:
        self.running_since = when

    def reset(self, when: float) -> bool:
        """Record a RESET at ``when``; True if it is a panic."""
        ran = when - max(self.last_reset, self.running_since)
        panic = not self.hello_this_boot and ran > PANIC_RESET_AFTER
        self.hello_this_boot = False
        self.last_reset = when
        return panic


#: What qemu.qmp's reader or writer task died of when QEMU closed the QMP socket.
_DISCONNECTS = frozenset(cls.__name__ for cls in (ConnectionResetError, ConnectionAbortedError,
                                                   BrokenPipeError, EOFError))


class QuietTeardown(logging.Filter):
    """Drops qemu.qmp's error line for its connection ending, once QEMU is meant to exit.

    When QEMU exits (the guest powered off, or we sent ``quit``) the QMP
    reader task may die of ECONNRESET instead of reading EOF, and qemu.qmp
    logs that at ERROR ("Task.Reader: ConnectionResetError: ...") on every
    run.  That is the expected end, not a failure: dropped while ``ending()``
    says so.  Anything else it logs, and a disconnect while the guest still
    runs (QEMU died), is kept.  The library gives only text: the record's last
    argument is its summary of the exception, "Type: message".
    """

    def __init__(self, ending: Callable[[], bool]) -> None:
        super().__init__("mktme-emu-teardown")
        self.ending = ending

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        summary = str(args[-1]) if args else ""
        disconnect = summary.partition(":")[0] in _DISCONNECTS
        return not (disconnect and record.levelno >= logging.ERROR and self.ending())


async def power_cycle_waiting(power_cycle: Callable[[], None], progress: Callable[[str], None],
                              timeout: float = BACKEND_RETURN_TIMEOUT) -> None:
    """Run a backend's ``power_cycle``; while its socket refuses, retry for up to ``timeout`` s.

    A backend restarted on its state directory comes back on the same
    socket (QEMU's chardev reconnects to it too): a reboot in that window
    waits for it, said once, instead of ending the run.  Any other error,
    or one still refusing after ``timeout``, is raised.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    told = False
    while True:
        try:
            await asyncio.to_thread(power_cycle)
            return
        except BackendUnreachable as exc:
            if loop.time() >= deadline:
                raise
            if not told:
                progress(f"power cycle: {exc}; waiting up to {timeout:.0f} s for it to come back")
                told = True
            await asyncio.sleep(0.2)


class _Session:
    """One QEMU process, its QMP connection, and the tasks around it."""

    def __init__(self, cfg: VmConfig, backends: Sequence[NvdimmBackend], req: RunRequest,
                 progress: Progress, phase: PhaseHook) -> None:
        self.cfg, self.backends, self.req = cfg, backends, req
        self.progress, self.phase_hook = progress, phase
        self.timer = timeline.PhaseTimer()
        self.result = VmResult(interactive=req.interactive)
        self.protocol = StatusProtocol(GuestPlan(req.command, req.cwd, req.interactive,
                                                 cfg.rwdirs))
        self.console = ConsoleFilter(capture=req.capture)
        self.started = asyncio.Event()
        self.finished = asyncio.Event()
        self.qmp = QMPClient("mktme-emu")
        self.proc: asyncio.subprocess.Process | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.failures: list[BaseException] = []
        self.clock = ResetClock()
        self.qemu_exiting = False  # a SHUTDOWN came: QEMU exits next (-no-shutdown is not used)

    def ending(self) -> bool:
        """Whether QEMU is meant to go away now: the run is over, or the guest shut down."""
        return self.qemu_exiting or self.finished.is_set()

    def phase(self, name: str, detail: str = "") -> None:
        """Record a phase of the run (VmResult.phases) and tell the caller's hook."""
        self.timer.mark(name, detail)
        self.phase_hook(name)

    # -- supervision: no exception is lost -----------------------------------
    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(self._guarded(coro))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _guarded(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro``; an exception ends the run and is raised by :meth:`run`."""
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # kept, re-raised by run()
            self.failures.append(exc)
            self.finished.set()

    # -- guest channels ------------------------------------------------------
    async def _status(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve init's status port for the whole VM lifetime (all boots)."""
        await self._guarded(self._serve_status(reader, writer))

    async def _serve_status(self, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            kind, reply = self.protocol.feed(line)
            if reply:
                writer.write(reply)
                await writer.drain()
            state = self.protocol.state
            self.result.boots, self.result.started = state.boots, state.started
            self.result.status, self.result.init_error = state.status, state.init_error
            if kind == "hello":
                self.clock.hello()
                uptime = line.decode(errors="replace").strip().partition(" ")[2]
                self.phase("init-hello", uptime)  # init says its kernel's uptime
                if state.boots > 1:
                    self.progress("guest rebooted: NVDIMM power-cycled" if self.backends
                                  else "guest rebooted")
            elif kind == "start":
                self.phase("command-start")
                self.started.set()
            elif state.finished:
                self.phase("command-end")
                self.finished.set()

    async def _console(self, reader: asyncio.StreamReader, _: asyncio.StreamWriter) -> None:
        await self._guarded(self._serve_console(reader))

    async def _serve_console(self, reader: asyncio.StreamReader) -> None:
        """Stream the serial console to stdout through the filter; end the run on a panic."""
        while chunk := await reader.read(4096):
            shown = self.console.feed(chunk)
            if self.console.panicked and not self.result.panicked:
                self.result.panicked = True
                self.finished.set()
            if self.req.echo and shown:
                sys.stdout.buffer.write(shown)
                sys.stdout.buffer.flush()
        if self.req.echo:
            sys.stdout.buffer.write(self.console.flush())
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
        for backend, base in zip(self.backends, nvdimm_bases(devices, len(self.backends)),
                                 strict=True):
            await asyncio.to_thread(backend.attach, base)
            self.result.bases.append(base)

    async def _events(self, listener: EventListener) -> None:
        """Power-cycle backends on RESET/SHUTDOWN; end the run on a panic."""
        async for event in listener:
            name, when = event["event"], _event_time(event)
            if name == "GUEST_PANICKED":
                self.result.panicked = True
                self.finished.set()
            elif name == "RESUME":
                self.clock.resumed(when)
            elif name in ("RESET", "SHUTDOWN"):
                self.qemu_exiting |= name == "SHUTDOWN"
                if name == "RESET" and self.clock.reset(when):
                    self.result.panicked = True
                    self.finished.set()
                await self._power_cycle(resume=name == "RESET" and not self.result.panicked)

    async def _power_cycle(self, resume: bool) -> None:
        """Stop the vCPUs, power-cycle every backend, resume: atomic for the guest."""
        stopped = False
        with contextlib.suppress(Exception):  # QEMU may be exiting (SHUTDOWN)
            await self.qmp.execute("stop")
            stopped = True
        for backend in self.backends:
            await power_cycle_waiting(backend.power_cycle, self.progress)
        if resume and stopped:
            await self.qmp.execute("cont")

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

    # -- start and teardown --------------------------------------------------
    async def _start_qemu(self) -> None:
        """QEMU, dying with us: PDEATHSIG, and the watchdog if we are SIGKILLed."""
        interactive = self.cfg.interactive
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *qemu_argv(self.cfg), stdin=None if interactive else asyncio.subprocess.DEVNULL,
                preexec_fn=die_with_parent, pass_fds=self.cfg.pass_fds,
                # run: a terminal's ^C reaches only us, and we stop QEMU in order.
                # boot: QEMU must stay in the terminal's foreground group to read it.
                start_new_session=not interactive)
        except FileNotFoundError as exc:
            raise VmError(f"{self.cfg.qemu} not found: install qemu-system-x86") from exc
        WATCHDOG.guard_pid(self.proc.pid, grace=5.0)
        self.phase("qemu-started")
        self._write_run_info()

    def _write_run_info(self) -> None:
        """run.json in the run directory: what this run started, for tools and tests."""
        assert self.proc is not None
        info = {"qemu_pid": self.proc.pid, "watchdog_pid": WATCHDOG.pid,
                "backend_pids": [getattr(b, "pid", None) for b in self.backends],
                "views": [str(b.view_path) for b in self.backends]}
        path = self.cfg.run_dir / "run.json"
        path.write_text(json.dumps(info))

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
        WATCHDOG.release_pid(self.proc.pid)
        with contextlib.suppress(Exception):
            await self.qmp.disconnect()

    def _interrupt(self, signum: int) -> None:
        if self.result.interrupted is None:
            self.result.interrupted = signum
        self.finished.set()

    @contextlib.contextmanager
    def _signals_end_the_run(self) -> Iterator[None]:
        """SIGINT/SIGTERM/SIGHUP end the run in order (main thread only), then restore."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        loop = asyncio.get_running_loop()
        saved = {sig: signal.getsignal(sig) for sig in _SIGNALS}
        for sig in _SIGNALS:
            loop.add_signal_handler(sig, self._interrupt, sig)
        try:
            yield
        finally:
            for sig, handler in saved.items():
                loop.remove_signal_handler(sig)
                signal.signal(sig, handler)

    async def _drive(self) -> None:
        """From QEMU started (paused) to the end of the run."""
        await self._connect_qmp()
        self.phase(timeline.QMP_READY)
        listener = EventListener(("RESET", "SHUTDOWN", "GUEST_PANICKED", "RESUME"))
        self.qmp.register_listener(listener)
        self._spawn(self._events(listener))
        self._spawn(self._watch_qemu())
        await self._attach_backends()
        await self.qmp.execute("cont")
        self.phase("guest-running")
        await self._wait_done()

    @staticmethod
    async def _listen(serve: Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                      Coroutine[Any, Any, None]], path: Path) -> asyncio.Server:
        try:
            return await asyncio.start_unix_server(serve, path=path)
        except OSError as exc:
            raise VmError(f"cannot listen on {path}: {exc.strerror or exc}") from exc

    async def run(self) -> VmResult:
        """Start QEMU, drive it to the end of the run, always stop it; raise task failures."""
        qmp_log = logging.getLogger("qemu.qmp")
        if qmp_log.level == logging.NOTSET:  # its INFO lines (EOF at quit) are noise here
            qmp_log.setLevel(logging.WARNING)
        servers = [await self._listen(self._status, self.cfg.status_socket)]
        if not self.cfg.interactive:
            servers.append(await self._listen(self._console, self.cfg.console_socket))
        quiet = QuietTeardown(self.ending)
        self.qmp.logger.addFilter(quiet)  # this connection's own logger
        try:
            with self._signals_end_the_run():
                await self._start_qemu()
                try:
                    await self._drive()
                finally:
                    await self._stop_qemu()
        finally:
            for task in list(self.tasks):
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            for server in servers:
                server.close()
            self.qmp.logger.removeFilter(quiet)
            self.phase("teardown-done")
            self.result.phases = self.timer.marks()
        self._collect_console()
        if self.failures:
            failure = self.failures[0]
            if isinstance(failure, MktmeError):
                raise failure
            raise VmError(f"the launcher failed: {type(failure).__name__}: {failure}") \
                from failure
        return self.result

    def _collect_console(self) -> None:
        self.result.console_tail = self.console.tail()
        self.result.output = self.console.captured()
        if not self.result.console_tail and self.cfg.console_log.exists():
            self.result.console_tail = self.cfg.console_log.read_text(errors="replace")[-4096:]


def run_vm(cfg: VmConfig, backends: Sequence[NvdimmBackend], req: RunRequest,
           progress: Progress = _ignore, phase: PhaseHook = _ignore) -> VmResult:
    """Boot ``cfg`` with ``backends`` as its NVDIMMs, do ``req``, return how it ended.

    Blocks until the guest powers off, panics, a timeout passes or a signal
    (SIGINT/SIGTERM/SIGHUP) arrives; QEMU is then stopped: quit, then kill.
    Raises VmError/BootFailure for host-side problems (QEMU missing or dying
    at start-up, no NVDIMM in QMP, a backend failing a power cycle);
    guest-side outcomes (exit status, panic, init failure, timeout) are in the
    result.  Does not close the backends: their owner does.
    """
    if len(cfg.nvdimms) != len(backends):
        raise VmError("VmConfig.nvdimms must describe the given backends (use spec_of)")
    return asyncio.run(_Session(cfg, backends, req, progress, phase).run())
