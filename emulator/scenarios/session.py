"""One emulated NVDIMM that lives across boots, and the guest phases run on it."""

from __future__ import annotations

import hashlib
import os
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import MktmeError
from ..vm.boot import LaunchOptions, launch
from ..vm.emulated import EmulatedNvdimm, EmulatorOptions
from ..vm.launcher import RunRequest
from ..vocabulary import phase_results

BOOT_TIMEOUT = 900.0
Progress = Callable[[str], None]


class ScenarioError(MktmeError):
    """A scenario could not run (as opposed to an outcome that differs).

    ``console_tail`` holds the end of the guest console, for the user.
    """

    def __init__(self, message: str, console_tail: str = "") -> None:
        super().__init__(message)
        self.console_tail = console_tail


def guest_pattern(seed: int, length: int) -> bytes:
    """The data guest phases write (their documented contract, recomputed here)."""
    return hashlib.shake_256(b"mktme-emu pattern %d" % seed).digest(length)


@dataclass(frozen=True)
class SessionOptions:
    """What every scenario boot shares."""

    workdir: Path
    accel: str = "auto"
    nvdimm_size: int = 256 << 20
    progress: Progress = lambda _message: None


class Dimm:
    """An emulated NVDIMM in its own state directory; each boot on it follows a power cycle.

    ``user_key`` is a fresh test key per DIMM, handed to the phases in a file
    (:meth:`secret_file`, never on a command line), so the host can compute
    the expected ciphertext.
    """

    def __init__(self, options: SessionOptions, name: str, *, tweak: str = "spa",
                 tme: str = "bypass", unit: int | None = None) -> None:
        self.options = options
        self.name = name
        self.tweak = tweak
        self.tme = tme
        self.unit = unit  # XTS data unit; None: the backend's default
        self.state_dir = options.workdir / name
        self.user_key = os.urandom(16).hex() + ":" + os.urandom(16).hex()
        self.base: int | None = None
        self.boots = 0

    @property
    def key_bytes(self) -> bytes:
        """Data key || tweak key, as the XTS engine takes it."""
        return bytes.fromhex(self.user_key.replace(":", ""))

    def secret_file(self, label: str, text: str) -> str:
        """Write ``text`` to a 0600 file beside the state directory; its path, for a phase.

        The guest reads it through its view of the host's files: keys never
        travel on the guest's command lines.
        """
        self.options.workdir.mkdir(parents=True, exist_ok=True)
        path = self.options.workdir / f"{self.name}.{label}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return str(path)

    def user_key_file(self) -> str:
        """The file holding ``user_key``, for ``--user-file``."""
        return self.secret_file("user-key", self.user_key)

    def media(self) -> bytes:
        return (self.state_dir / "media").read_bytes()

    def boot(self, phases: Sequence[Sequence[str]], ns_mode: str | None = None) -> list[dict[str, object]]:
        """Boot once, run each phase (``mktme-guest phase ...`` words), return their results.

        Blocks for the whole boot.  Raises ScenarioError when the VM fails or
        a phase reports no result (the console tail says why).
        """
        self.boots += 1
        names = ", ".join(p[0] for p in phases)
        self.options.progress(f"{self.name}: boot {self.boots}: {names}")
        script = "\n".join(shlex.join(["mktme-guest", "phase", *p]) for p in phases)
        backend = EmulatedNvdimm(EmulatorOptions(state_dir=self.state_dir, size=self.options.nvdimm_size,
                                                 tweak=self.tweak, tme=self.tme, unit=self.unit))
        try:
            result = launch(LaunchOptions(accel=self.options.accel, ns_mode=ns_mode,
                                          nvdimm_size=self.options.nvdimm_size),
                            RunRequest(command=("sh", "-c", script), echo=False, capture=True,
                                       timeout=BOOT_TIMEOUT), [backend])
        finally:
            backend.close()
        if result.bases:
            self.base = result.bases[0]
        found = phase_results(result.output)
        if result.panicked or result.init_error or len(found) != len(phases):
            raise ScenarioError(f"{self.name}: boot {self.boots} ({names}): {result.describe()}, "
                                f"{len(found)} of {len(phases)} phases reported a result",
                                result.console_tail[-3000:])
        return found


