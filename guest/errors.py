"""Guest-side errors: subclasses of the one root, :class:`mktme_emu.errors.MktmeError`.

``mktme_emu.errors`` is the one host module besides the protocol that the
guest may import (the protocol re-uses it).  Each class carries the
context a one-line message needs; only ``mktme_guest.cli.main`` prints them.
"""

from __future__ import annotations

from mktme_emu.errors import MktmeError, ProtocolError, RemoteError

__all__ = ["ChannelError", "CommandFailed", "DeviceError", "GuestError", "KeyRefused", "MktmeError",
           "PhaseError", "ProtocolError", "RemoteError", "ResolveError", "UsageError"]


class GuestError(MktmeError):
    """Root of the errors raised by the guest helpers themselves."""


class ChannelError(GuestError):
    """The control port cannot be found, opened, or stops answering."""


class ResolveError(GuestError):
    """A virtual address or file block has no physical address we can use.

    ``where`` names what was being resolved (an address, a path), so the
    message says which page or file is at fault.
    """

    def __init__(self, message: str, where: str = "") -> None:
        super().__init__(f"{where}: {message}" if where else message)
        self.where = where


class DeviceError(GuestError):
    """An NVDIMM namespace, block device or DAX device is missing or unusable."""


class CommandFailed(GuestError):
    """A system tool (ndctl, mkfs, mount) exited with a failure status."""

    def __init__(self, argv: list[str], status: int, stderr: str) -> None:
        said = " ".join(line.strip() for line in stderr.splitlines() if line.strip())
        said = said[:240] or "no message"
        super().__init__(f"{argv[0]} exited with status {status}: {said}")
        self.argv = argv
        self.status = status
        self.stderr = stderr


class UsageError(GuestError):
    """Options that contradict each other or miss a part argparse cannot check."""


class PhaseError(GuestError):
    """A scenario phase cannot run (bad parameters, a missing precondition)."""


class KeyRefused(GuestError):
    """PCONFIG answered something other than PROG_SUCCESS; ``status`` is its KeyStatus.

    ``reason`` is the status explained in words (``KeyStatus.explain``), when known.
    """

    def __init__(self, keyid: int, status: object, reason: str = "") -> None:
        name = getattr(status, "name", str(status))
        super().__init__(f"programming KeyID {keyid} failed: {reason or name}")
        self.keyid = keyid
        self.status = status
