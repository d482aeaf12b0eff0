"""``mktme-emu``: the host command line (SPEC section 5).

Only :func:`main` turns an exception into an exit status and a one-line
message; every command is a function ``(args) -> int``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from .. import __version__
from ..errors import MktmeError
from ..usage import EXIT_USAGE, OneLineParser
from . import xts_command

EXIT_ERROR = 1
__all__ = ["EXIT_ERROR", "EXIT_USAGE", "build_parser", "main"]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; only ``xts``'s part when ``command`` is "xts".

    ``xts`` streams in constant memory: building the other commands' parsers
    would import the controller, the service and the VM code, tens of MiB
    it does not need.  Usage errors are one line that names a bad word by its
    position (see usage.py).
    """
    parser = OneLineParser(
        prog="mktme-emu",
        description="Emulate Intel TME-MK (MKTME) memory encryption on a QEMU NVDIMM.")
    parser.add_argument("--version", action="version", version=f"mktme-emu {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail to stderr")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    if command == xts_command.COMMAND:
        xts_command.add_command(commands)
        return parser
    from . import device, scenario_commands, vm_commands  # lazily: see the docstring

    device.add_commands(commands)
    vm_commands.add_vm_commands(commands)
    scenario_commands.add_commands(commands)
    return parser


def _command_word(argv: Sequence[str]) -> str | None:
    """The command named on the command line (the first word not an option), if any."""
    return next((word for word in argv if not word.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; the only place an exception becomes a message (one line) and a status.

    An error nobody anticipated is still one line (its type, never its
    text, which might quote input); ``-v`` shows the traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(_command_word(argv)).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="mktme-emu: %(message)s", stream=sys.stderr)
    try:
        return int(args.func(args))
    except MktmeError as exc:
        print(f"mktme-emu: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        pass
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"mktme-emu: {where}{exc.strerror or type(exc).__name__}", file=sys.stderr)
    except Exception as exc:
        if args.verbose:
            raise
        print(f"mktme-emu: internal error ({type(exc).__name__}); run with -v for the traceback",
              file=sys.stderr)
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
