"""The emulated MKTME NVDIMM as the launcher sees it: a `mktme-emu serve` process.

:class:`EmulatedNvdimm` satisfies the launcher's ``NvdimmBackend`` protocol:
it starts the backend (or attaches to one already running), tells it the
NVDIMM base QMP reported, and power-cycles it on RESET/SHUTDOWN.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import MktmeError, VmError
from ..protocol import Client
from .lifetime import WATCHDOG

STOP_TIMEOUT = 120.0  # a SIGTERM writes everything back: give large devices time
START_TIMEOUT = 60.0


@dataclass(frozen=True)
class EmulatorOptions:
    """How to get the backend: start one (these settings) or attach to ``attach_socket``."""

    state_dir: Path | None = None  # None: a temporary one, removed at close unless keep
    size: int = 256 << 20
    label_size: int = 0
    tme: str | None = None
    tweak: str | None = None
    unit: int | None = None
    keyid_bits: int | None = None
    attach_socket: Path | None = None
    keep: bool = False


class EmulatedNvdimm:
    """One emulated NVDIMM backed by a backend process. Not thread-safe."""

    def __init__(self, options: EmulatorOptions, index: int = 0) -> None:
        self.options = options
        self._proc: subprocess.Popen[bytes] | None = None
        self._temp_dir: Path | None = None
        self._guarded_view: Path | None = None
        try:  # a failed start leaves nothing behind: no process, no temporary folder
            if options.attach_socket is not None:
                self.control_socket = options.attach_socket
            else:
                self.control_socket = self._start(index)
            with self._client() as client:
                config = client.config()
        except BaseException:
            self.close()
            raise
        self.view_path = Path(str(config.view))
        self.data_size = config.size
        self.label_size = config.label_size
        self.guest_socket: Path | None = self.control_socket.parent / "guest.sock"
        self.state_dir = self.control_socket.parent
        if self._proc is not None and not options.keep:
            self._guarded_view = self.view_path  # ours to remove, even if we are SIGKILLed
            WATCHDOG.guard_path(self.view_path)

    def _start(self, index: int) -> Path:
        opts = self.options
        state = opts.state_dir
        if state is None:
            self._temp_dir = Path(tempfile.mkdtemp(prefix=f"mktme-nvdimm{index}-"))
            state = self._temp_dir
            if not opts.keep:
                WATCHDOG.guard_path(self._temp_dir)
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        argv = [sys.executable, "-m", "mktme_emu.cli.main", "serve", "--state-dir", str(state),
                "--size", str(opts.size), "--label-size", str(opts.label_size)]
        for flag, value in (("--tme", opts.tme), ("--tweak", opts.tweak), ("--unit", opts.unit),
                            ("--keyid-bits", opts.keyid_bits)):
            if value is not None:
                argv += [flag, str(value)]
        log = open(state / "backend.log", "ab")  # noqa: SIM115 (owned by the child)
        # A session of its own: a terminal's ^C or hangup reaches the launcher,
        # which stops the backend in order (SIGTERM = write back), not the backend.
        self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                      start_new_session=True)
        log.close()
        WATCHDOG.guard_pid(self._proc.pid, grace=STOP_TIMEOUT)
        socket = state / "control.sock"
        self._wait_ready(socket, state / "backend.log")
        return socket

    def _wait_ready(self, socket: Path, log: Path) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
                raise VmError(f"the emulator backend exited at start: {tail[0]}")
            if socket.exists():
                with contextlib.suppress(MktmeError), Client.connect(socket, timeout=5) as client:
                    client.features()
                    return
            time.sleep(0.05)
        raise VmError(f"the emulator backend did not answer on {socket} within {START_TIMEOUT:.0f}s")

    @property
    def pid(self) -> int | None:
        """The backend process we started (None when attached to a running one)."""
        return None if self._proc is None else self._proc.pid

    def _client(self) -> Client:
        return Client.connect(self.control_socket, timeout=STOP_TIMEOUT)

    def attach(self, base: int) -> None:
        """Give the backend the NVDIMM base that QMP reported (before the guest runs)."""
        with self._client() as client:
            client.set_base(base)

    def power_cycle(self) -> None:
        """QMP RESET/SHUTDOWN: the DIMM loses power (write back, forget keys, refill)."""
        with self._client() as client:
            client.power_cycle()

    def kill(self) -> None:
        """SIGKILL the backend we started (crash tests): nothing is written back."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def close(self) -> None:
        """Stop a backend we started (it writes back on SIGTERM); leave an attached one."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._proc is not None:
            WATCHDOG.release_pid(self._proc.pid)
        if self._guarded_view is not None:
            with contextlib.suppress(FileNotFoundError):
                self._guarded_view.unlink()
            WATCHDOG.release_path(self._guarded_view)
            self._guarded_view = None
        if self._temp_dir is not None and not self.options.keep:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            WATCHDOG.release_path(self._temp_dir)
            self._temp_dir = None
        self._proc = None
