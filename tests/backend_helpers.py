"""Run ``mktme-emu serve`` as a real process for the backend integration tests.

Not a test module: the backend test files import it (pytest's default
``importmode=prepend`` puts ``tests/`` on ``sys.path``).  Each test file
defines its own small fixture around :class:`Backends`::

    @pytest.fixture
    def backends(tmp_path):
        with Backends(tmp_path) as pool:
            yield pool

A :class:`Backend` owns one state directory and one view file inside the
test's tmp dir; it can be stopped (SIGTERM, exit status 0 asserted), killed
(SIGKILL) and started again on the same state directory, and it maps the
view file so a test can play the guest CPU.

The module also holds an *independent* AES-XTS (IEEE 1619) built only on
``cryptography``'s primitives, never on ``mktme_emu.crypto``: a slow
reference (``modes.XTS``, one call per data unit) and a fast numpy version
(AES-ECB + GF(2^128) doubling), checked against each other in
``test_backend_ciphertext.py``.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from mktme_emu import protocol as p
from mktme_emu.errors import MktmeError, RemoteError

PAGE = 4096
MIB = 1 << 20
DEFAULT_BASE = 0x1_0000_0000
START_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0

__all__ = [
    "DEFAULT_BASE", "MIB", "PAGE", "Backend", "Backends", "RemoteError", "cli", "mktme_emu_command",
    "program", "program_user", "remote_error", "user_program", "xts_fast", "xts_reference",
]


def mktme_emu_command() -> list[str]:
    """The ``mktme-emu`` entry point of the interpreter running the tests."""
    script = Path(sys.executable).parent / "mktme-emu"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "mktme_emu.cli.main"]


def cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run one ``mktme-emu`` command; never raises on a non-zero exit."""
    return subprocess.run([*mktme_emu_command(), *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def _size_arg(value: int | str) -> str:
    return str(value) if isinstance(value, str) else str(int(value))


def _parse_size(value: int | str) -> int:
    if isinstance(value, int):
        return value
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if value[-1] in scale:
        return int(value[:-1], 0) * scale[value[-1]]
    return int(value, 0)


class Backend:
    """One emulated NVDIMM: a state directory, a view file and (when running) a process."""

    def __init__(self, root: Path, *, size: int | str = "8M", base: int | None = DEFAULT_BASE,
                 tweak: str | None = None, tme: str | None = None, unit: int | None = None,
                 label_size: int | str | None = None, keyid_bits: int | None = None,
                 verbose: bool = True, rewrite_at: str | None = None) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.state_dir = root / "state"
        self.view_path = root / "view"
        self.options: dict[str, object] = {
            "size": size, "base": base, "tweak": tweak, "tme": tme, "unit": unit,
            "label_size": label_size, "keyid_bits": keyid_bits, "rewrite_at": rewrite_at}
        self.verbose = verbose
        self.size = _parse_size(size)
        self.label_size = _parse_size(label_size) if label_size is not None else 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []
        self.exit_codes: list[int] = []
        self._clients: list[p.Client] = []
        self._map: mmap.mmap | None = None

    # -- paths ------------------------------------------------------------------

    @property
    def admin_socket(self) -> Path:
        return self.state_dir / "control.sock"

    @property
    def guest_socket(self) -> Path:
        return self.state_dir / "guest.sock"

    @property
    def media_path(self) -> Path:
        return self.state_dir / "media"

    @property
    def metadata_path(self) -> Path:
        return self.state_dir / "metadata"

    # -- process life -------------------------------------------------------------

    def command(self) -> list[str]:
        o = self.options
        cmd = [*mktme_emu_command(), *(["-v"] if self.verbose else []), "serve",
               "--state-dir", str(self.state_dir), "--view", str(self.view_path)]
        if o["size"] is not None:
            cmd += ["--size", _size_arg(o["size"])]  # type: ignore[arg-type]
        if o["base"] is not None:
            cmd += ["--base", hex(int(o["base"]))]  # type: ignore[call-overload]
        for name, flag in (("tweak", "--tweak"), ("tme", "--tme"), ("unit", "--unit"),
                           ("label_size", "--label-size"), ("keyid_bits", "--keyid-bits"),
                           ("rewrite_at", "--rewrite-at")):
            if o[name] is not None:
                cmd += [flag, str(o[name])]
        return cmd

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = START_TIMEOUT, preexec: Callable[[], None] | None = None,
              **overrides: object) -> Backend:
        """Start ``serve`` (the same state dir as before) and wait until it answers.

        ``preexec`` runs in the child before exec (say, to set a resource limit).
        """
        assert not self.running, "backend already running"
        self.options.update(overrides)
        log = self.root / f"backend-{len(self.logs)}.log"
        self.logs.append(log)
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, preexec_fn=preexec)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited with {self.proc.returncode} while starting:\n"
                                     + log.read_text(errors="replace"))
            with contextlib.suppress(MktmeError, OSError):
                with p.Client.connect(self.admin_socket, timeout=5) as probe:
                    probe.features()
                return self
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"serve did not answer within {timeout} s:\n"
                                     + log.read_text(errors="replace"))
            time.sleep(0.02)

    def _close_clients(self) -> None:
        for client in self._clients:
            with contextlib.suppress(Exception):
                client.close()
        self._clients.clear()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT,
             expect: int | None = 0) -> int:
        """SIGTERM (or SIGINT) and wait; asserts the exit status ``expect`` (None: any)."""
        assert self.proc is not None and self.running, "backend not running"
        self._close_clients()
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"serve did not exit within {timeout} s of signal {sig}") from None
        self.exit_codes.append(code)
        assert expect is None or code == expect, \
            f"serve exited {code} after signal {sig}:\n{self.log_text()}"
        return code

    def kill(self) -> None:
        """SIGKILL: the crash."""
        self._close_clients()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.exit_codes.append(self.proc.wait())

    def restart(self, **overrides: object) -> Backend:
        self.stop()
        self.options.update(overrides)
        return self.start()

    def close(self) -> None:
        """Teardown: stop a running backend (status 0 asserted), unmap the view.

        Also asserts that the backend never logged a traceback: a request
        that crashed a handler is a bug even when the daemon survived it.
        """
        try:
            if self.running:
                self.stop()
            assert "Traceback" not in self.log_text(), f"the backend logged a traceback:\n{self.log_text()}"
        finally:
            self.kill()
            if self._map is not None:
                with contextlib.suppress(BufferError):
                    self._map.close()
                self._map = None

    def log_text(self) -> str:
        return "".join(log.read_text(errors="replace") for log in self.logs if log.exists())

    # -- talking to it ------------------------------------------------------------

    def client(self, guest: bool = False, timeout: float | None = 120.0) -> p.Client:
        """A new connection (closed when the backend stops)."""
        client = p.Client.connect(self.guest_socket if guest else self.admin_socket, timeout)
        self._clients.append(client)
        return client

    # -- the guest CPU and the DIMM cells -----------------------------------------------

    @property
    def view(self) -> mmap.mmap:
        """The view file mapped shared (data area, then label area)."""
        if self._map is None:
            fd = os.open(self.view_path, os.O_RDWR)
            try:
                total = os.fstat(fd).st_size
                assert total == self.size + self.label_size, (total, self.size, self.label_size)
                self._map = mmap.mmap(fd, total, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                os.close(fd)
        return self._map

    def forget_view(self) -> None:
        """Unmap and delete the view file (a host reboot that loses /dev/shm)."""
        if self._map is not None:
            self._map.close()
            self._map = None
        self.view_path.unlink()

    def write(self, offset: int, data: bytes) -> None:
        self.view[offset:offset + len(data)] = data

    def read(self, offset: int, length: int) -> bytes:
        return self.view[offset:offset + length]

    def media(self, offset: int = 0, length: int | None = None) -> bytes:
        """Raw bytes of the media file (byte i = data offset i)."""
        with open(self.media_path, "rb") as f:
            f.seek(offset)
            return f.read(self.size - offset if length is None else length)

    def state_files(self) -> dict[str, bytes]:
        """Every regular file of the state directory with its contents, but the lock file
        (it holds the pid of the last process that took the lock, nothing of the device)."""
        return {f.name: f.read_bytes() for f in sorted(self.state_dir.iterdir())
                if f.is_file() and f.name != "lock"}


class Backends:
    """Creates backends inside one tmp dir and tears all of them down."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.created: list[Backend] = []

    def __call__(self, name: str | None = None, *, start: bool = True, **options: object) -> Backend:
        backend = Backend(self.tmp_path / (name or f"dev{len(self.created)}"), **options)  # type: ignore[arg-type]
        self.created.append(backend)
        if start:
            backend.start()
        return backend

    def __enter__(self) -> Backends:
        return self

    def __exit__(self, *exc: object) -> None:
        errors = []
        for backend in self.created:
            try:
                backend.close()
            except AssertionError as err:
                errors.append(err)
        if errors and exc[0] is None:
            raise errors[0]


# -- keys --------------------------------------------------------------------------------

def user_program(keyid: int, key: bytes, tweak: bytes) -> p.KeyProgram:
    """SET_KEY_DIRECT with data key ``key`` and tweak key ``tweak`` (16 or 32 bytes each)."""
    alg = {16: "aes-xts-128", 32: "aes-xts-256"}[len(key)]
    return p.key_program(keyid, p.KeyCommand.SET_KEY_DIRECT, alg, key.hex(), tweak.hex())


def program_user(client: p.Client, keyid: int, key: bytes, tweak: bytes) -> None:
    status = client.program_key(user_program(keyid, key, tweak))
    assert status is p.KeyStatus.PROG_SUCCESS, status


def program(client: p.Client, keyid: int, command: p.KeyCommand, alg: str = "aes-xts-128") -> None:
    status = client.program_key(p.key_program(keyid, command, alg))
    assert status is p.KeyStatus.PROG_SUCCESS, status


@contextlib.contextmanager
def remote_error(code: int) -> Iterator[None]:
    """Expect the request inside to be refused with this ErrorCode."""
    try:
        yield
    except RemoteError as err:
        assert err.code == code, f"refused with code {err.code}, expected {code}: {err}"
    else:
        raise AssertionError(f"request was not refused (expected code {code})")


# -- an independent AES-XTS ----------------------------------------------------------------

def xts_reference(key: bytes, data: bytes, tweaks: Iterable[int], unit: int,
                  decrypt: bool = False) -> bytes:
    """AES-XTS with ``cryptography``'s ``modes.XTS``, one call per data unit.

    ``key`` is data key || tweak key; unit i uses tweak ``tweaks[i]`` as a
    16-byte little-endian integer.
    """
    out = bytearray()
    tweak_list = list(tweaks)
    assert len(tweak_list) * unit == len(data)
    for i, tweak in enumerate(tweak_list):
        cipher = Cipher(algorithms.AES(key), modes.XTS(tweak.to_bytes(16, "little")))
        ctx = cipher.decryptor() if decrypt else cipher.encryptor()
        out += ctx.update(data[i * unit:(i + 1) * unit]) + ctx.finalize()
    return bytes(out)


_MASK64 = (1 << 64) - 1


def xts_fast(key: bytes, data: bytes, tweak_base: int, unit: int, decrypt: bool = False) -> bytes:
    """AES-XTS over consecutive units, unit i with tweak ``tweak_base + i * unit``.

    Written from IEEE 1619 for these tests: the tweak blocks are encrypted
    with AES-ECB under the tweak key, multiplied by alpha (x in GF(2^128),
    little-endian, reduction 0x87) along the unit, and the data goes through
    one large AES-ECB pass under the data key.
    """
    half = len(key) // 2
    data_key, tweak_key = key[:half], key[half:]
    n_units, blocks = len(data) // unit, unit // 16
    assert n_units * unit == len(data) and blocks * 16 == unit
    if tweak_base + n_units * unit <= _MASK64:  # the common case: 64-bit tweaks, vectorised
        lo = np.arange(n_units, dtype=np.uint64) * np.uint64(unit) + np.uint64(tweak_base)
        hi = np.zeros(n_units, dtype=np.uint64)
    else:
        tweaks = [tweak_base + i * unit for i in range(n_units)]
        lo = np.array([t & _MASK64 for t in tweaks], dtype=np.uint64)
        hi = np.array([t >> 64 for t in tweaks], dtype=np.uint64)
    raw = np.empty((n_units, 2), dtype="<u8")
    raw[:, 0], raw[:, 1] = lo, hi
    enc = Cipher(algorithms.AES(tweak_key), modes.ECB()).encryptor()
    t = np.frombuffer(enc.update(raw.tobytes()) + enc.finalize(), dtype="<u8").reshape(n_units, 2)
    t_lo, t_hi = t[:, 0].astype(np.uint64), t[:, 1].astype(np.uint64)
    masks = np.empty((n_units, blocks, 2), dtype=np.uint64)
    for j in range(blocks):
        masks[:, j, 0], masks[:, j, 1] = t_lo, t_hi
        carry = t_hi >> np.uint64(63)
        t_hi = (t_hi << np.uint64(1)) | (t_lo >> np.uint64(63))
        t_lo = (t_lo << np.uint64(1)) ^ (carry * np.uint64(0x87))
    words = np.frombuffer(data, dtype="<u8").reshape(n_units, blocks, 2) ^ masks
    cipher = Cipher(algorithms.AES(data_key), modes.ECB())
    ctx = cipher.decryptor() if decrypt else cipher.encryptor()
    done = np.frombuffer(ctx.update(words.astype("<u8").tobytes()) + ctx.finalize(), dtype="<u8")
    return (done.reshape(n_units, blocks, 2) ^ masks).astype("<u8").tobytes()
