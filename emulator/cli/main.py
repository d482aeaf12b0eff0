"""``mktme-emu``: the host command line (SPEC section 5).

Only :func:`main` turns an exception into an exit status and a one-line
message; every command is a function ``(args) -> int``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

from .. import __version__
from ..errors import MktmeError
from . import device, scenario_commands, vm_commands

EXIT_ERROR = 1
EXIT_USAGE = 2


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line (SPEC 5: one clear line on stderr), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="mktme-emu",
        description="Emulate Intel TME-MK (MKTME) memory encryption on a QEMU NVDIMM.")
    parser.add_argument("--version", action="version", version=f"mktme-emu {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail to stderr")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    device.add_commands(commands)
    _add_vm_commands(commands)
    scenario_commands.add_commands(commands)
    return parser


def _add_vm_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """The VM commands (kernel, boot, run, monitor) live in their own module."""
    vm_commands.add_vm_commands(commands)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="mktme-emu: %(message)s", stream=sys.stderr)
    try:
        return int(args.func(args))
    except MktmeError as exc:
        print(f"mktme-emu: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
