"""What a VM run is asked to do and how it ended: the vm layer's public result types.

``VmResult.exit_code`` is the contract of `mktme-emu run` and `boot` exit
statuses (README "Ending"); it lives here, apart from the QEMU driving, so it
can be read and tested on its own.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field

from mktme_emu.vm.timeline import PhaseMark

#: Exit statuses of `run` that are not the command's own.
EXIT_PANIC = 255  # the guest kernel panicked
EXIT_BOOT_FAILURE = 254  # the command never started (init error, QEMU died, boot timeout)
EXIT_TIMEOUT = 253  # the command started but did not finish within --timeout

@dataclass
class VmResult:
    """How a VM run ended.  ``exit_code`` is what `mktme-emu run`/`boot` exits with."""

    status: int | None = None  # the command's exit status, when it reported one
    panicked: bool = False
    started: bool = False
    timed_out: bool = False
    init_error: str | None = None
    interactive: bool = False  # boot: leaving the shell by any means is success
    interrupted: int | None = None  # the signal that ended the run on the host
    boots: int = 0  # how many times init started (1 + guest reboots)
    bases: list[int] = field(default_factory=list)
    console_tail: str = ""
    output: str = ""  # the whole console output, when the request asked to capture it
    phases: tuple[PhaseMark, ...] = ()  # when each phase of the run was reached (make bench)

    @property
    def exit_code(self) -> int:
        if self.panicked:
            return EXIT_PANIC
        if self.interrupted is not None:
            return 128 + self.interrupted
        if self.init_error is not None or (self.timed_out and not self.started):
            return EXIT_BOOT_FAILURE
        if self.interactive:
            return 0  # exit, poweroff, Ctrl-A X: the user is done
        if self.status is not None:
            return self.status
        return EXIT_TIMEOUT if self.started and self.timed_out else EXIT_BOOT_FAILURE

    @property
    def failed(self) -> bool:
        """The run ended for a reason that is worth the console's tail."""
        return self.exit_code in (EXIT_PANIC, EXIT_BOOT_FAILURE, EXIT_TIMEOUT) and \
            self.status is None and self.interrupted is None

    def describe(self) -> str:
        """One line saying why the run ended, for stderr."""
        if self.panicked:
            return "guest kernel panicked"
        if self.interrupted is not None:
            return f"stopped by {signal.Signals(self.interrupted).name}"
        if self.init_error:
            return f"guest init failed: {self.init_error}"
        if self.status is not None:
            return f"guest command exited with status {self.status}"
        if self.timed_out:
            return "timed out " + ("running the command" if self.started else "booting")
        if self.interactive:
            return "VM stopped"
        return "guest stopped before reporting a status"


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
