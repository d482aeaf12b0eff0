"""The org.mktme.status line protocol between the launcher and the guest's init.

Pure (no I/O, no QEMU), so every message and every reply can be unit-tested.
One line per message, over a virtio-serial port (see init.sh):

  guest -> host:  ``hello`` | ``start`` | ``exit RC`` | ``init-error MESSAGE``
  host -> guest:  ``boot N`` | ``cmd BASE64`` | ``interactive`` |
                  ``rw TAG BASE64PATH`` | ``go``  (the reply to each hello)

The command travels as a base64'd shell script (each word shlex-quoted), never
through a host shell; a read-write directory travels as its 9p mount tag and
its base64'd path, so paths with spaces or commas survive.
"""

from __future__ import annotations

import base64
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


def command_script(argv: Sequence[str], cwd: str | None = None) -> str:
    """The guest-side script for ``argv``: each word single-quoted, then exec'd.

    Quoting is shlex's POSIX quoting, so any bytes survive.
    """
    lines = []
    if cwd:
        lines.append(f"cd -- {shlex.quote(cwd)} 2>/dev/null || cd /")
    lines.append("exec " + shlex.join(argv))
    return "\n".join(lines) + "\n"


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@dataclass(frozen=True)
class RwDir:
    """A host directory exported read-write to the guest (``--rwdir``) at the same path."""

    tag: str  # the 9p mount tag (qemu.py's -virtfs mount_tag)
    path: Path


@dataclass(frozen=True)
class GuestPlan:
    """What init is told at each hello: the command, interactive or not, rw mounts."""

    command: tuple[str, ...] = ()
    cwd: str | None = None
    interactive: bool = False
    rwdirs: tuple[RwDir, ...] = ()

    def hello_reply(self, boot: int) -> bytes:
        """The lines that answer init's ``hello`` at boot number ``boot`` (0 = first)."""
        lines = [f"boot {boot}"]
        if self.command:
            lines.append("cmd " + _b64(command_script(self.command, self.cwd)))
        if self.interactive:
            lines.append("interactive")
        lines += [f"rw {rw.tag} {_b64(str(rw.path))}" for rw in self.rwdirs]
        return ("\n".join([*lines, "go"]) + "\n").encode()


@dataclass
class GuestStatus:
    """What init has reported so far, over all boots of one VM."""

    boots: int = 0  # hellos seen: 1 + guest reboots
    started: bool = False
    status: int | None = None  # the command's exit status
    init_error: str | None = None
    malformed: list[str] = field(default_factory=list)  # lines we could not read

    @property
    def finished(self) -> bool:
        return self.status is not None or self.init_error is not None


class StatusProtocol:
    """The host side of the channel: feed it the guest's lines, send back what it returns."""

    def __init__(self, plan: GuestPlan) -> None:
        self.plan = plan
        self.state = GuestStatus()

    def feed(self, line: bytes | str) -> tuple[str, bytes]:
        """Handle one line from the guest: (the message kind, the reply bytes or b"").

        The kind is ``hello``, ``start``, ``exit``, ``init-error``, or
        ``ignored`` for anything else (recorded in ``state.malformed``).
        """
        text = line.decode(errors="replace") if isinstance(line, bytes) else line
        key, _, value = text.strip().partition(" ")
        if key == "hello":
            reply = self.plan.hello_reply(self.state.boots)
            self.state.boots += 1
            return key, reply
        if key == "start":
            self.state.started = True
            return key, b""
        if key == "exit" and value.strip().lstrip("-").isdigit():
            self.state.status = int(value)
            return key, b""
        if key == "init-error":
            self.state.init_error = value
            return key, b""
        if text.strip():
            self.state.malformed.append(text.strip()[:200])
        return "ignored", b""
