"""The exception hierarchy: one root, subclasses that carry their context.

Every layer raises a subclass of :class:`MktmeError`; only the CLI's
``main()`` turns one into an exit code and a one-line message.  Messages
never contain key material: they name KeyIDs, offsets and sizes only.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.IntEnum):
    """Why a request was refused; the same numbers travel on the wire."""

    OK = 0
    INVALID = 1  # a malformed or contradictory argument
    RANGE = 2  # unaligned, out of the data area, or overlapping
    NO_KEY = 3  # the operation needs a key that is not programmed
    DENIED = 4  # the connection's role may not make this request
    BUSY = 5  # the device is busy; try again
    UNSUPPORTED = 6  # unknown request or feature
    INTERNAL = 7  # an I/O or internal failure; the request may be retried
    STATE = 8  # the state directory or device is in a state that forbids it


class MktmeError(Exception):
    """Root of every error mktme-emu raises on purpose."""


class ConfigError(MktmeError):
    """A command-line option, profile or state file is invalid."""


class CryptoError(MktmeError):
    """Bad parameters for the XTS engine (unit size, key length, buffer shape)."""


class KeyProgramError(MktmeError):
    """A key-service option string that cannot become a MKTME_KEY_PROGRAM_STRUCT."""


class ControllerError(MktmeError):
    """A memory-controller request that was refused; nothing was changed.

    ``code`` is the :class:`ErrorCode` the protocol answers with, so the
    service never has to parse text.
    """

    def __init__(self, message: str, code: ErrorCode = ErrorCode.INVALID) -> None:
        super().__init__(message)
        self.code = code


class StateError(MktmeError):
    """The state directory is missing, damaged or belongs to another configuration."""


class ProtocolError(MktmeError):
    """A malformed message on the control socket."""


class ReplyTimeout(ProtocolError):
    """The backend did not answer within the transport's timeout."""


class BackendUnreachable(ProtocolError):
    """Nothing accepts connections on the backend's socket (it exited, or is restarting)."""


class RemoteError(MktmeError):
    """The backend refused a request; ``code`` is its protocol error code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class VmError(MktmeError):
    """Building the guest environment or running QEMU failed."""


class GuestPanic(VmError):
    """The guest kernel panicked."""


class BootFailure(VmError):
    """The guest did not reach its command (init failure, timeout, QEMU died)."""
