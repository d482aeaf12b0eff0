"""``mktme-emu xts``: the backend's XTS engine on stdin -> stdout, streaming.

Kept apart from the device commands so that ``main`` can build its parser
without importing the controller and the service: the whole process stays
within a few tens of MiB whatever the input size.
"""

from __future__ import annotations

import argparse
import sys

from ..crypto import DEFAULT_UNIT
from ..errors import ConfigError
from ..hardening import harden_process
from ..usage import read_secret
from ..xts_stream import TweakStep, xts_stream
from . import args as types
from . import keyfiles

COMMAND = "xts"


def add_command(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    cmd = commands.add_parser(
        COMMAND, help="the backend's XTS engine on stdin -> stdout",
        description="Encrypt or decrypt stdin as consecutive data units, streaming (constant "
                    "memory, any input size). With --tweak-step address (the default) unit i "
                    "uses tweak TWEAK_BASE + i * UNIT, as the controller's spa, dpa and logical "
                    "modes do; with --tweak-step dun it uses TWEAK_BASE + i (a data unit "
                    "number: with --unit 4096, fscrypt's IV_INO_LBLK_64). Tweaks are 128-bit "
                    "little-endian. For computing expected ciphertext in your own tests.")
    direction = cmd.add_mutually_exclusive_group(required=True)
    direction.add_argument("--encrypt", action="store_true")
    direction.add_argument("--decrypt", action="store_true")
    key = cmd.add_mutually_exclusive_group(required=True)
    key.add_argument("--key", metavar="DATAKEY:TWEAKKEY",
                     help="hex, as DATAKEY:TWEAKKEY (16 or 32 bytes each) or both concatenated "
                          "(visible to other users in the process list: prefer --key-file)")
    key.add_argument("--key-file", metavar="FILE", help="the --key text read from FILE")
    cmd.add_argument("--tweak-base", required=True, type=types.integer)
    cmd.add_argument("--unit", type=types.size, default=DEFAULT_UNIT,
                     help=f"data unit in bytes, a power of two from 16 to 4096 ({DEFAULT_UNIT})")
    cmd.add_argument("--tweak-step", choices=[s.value for s in TweakStep],
                     default=TweakStep.ADDRESS.value,
                     help="address: unit i uses TWEAK_BASE + i*UNIT (default); "
                          "dun: unit i uses TWEAK_BASE + i")
    cmd.set_defaults(func=_xts)


def _xts(args: argparse.Namespace) -> int:
    """Stream stdin through the engine to stdout; a partial last unit is an error."""
    harden_process()
    if args.key_file == "-":
        raise ConfigError("--key-file - cannot read the key from stdin: stdin carries the data")
    text = read_secret(args.key_file, "--key-file") if args.key_file else args.key
    key = keyfiles.xts_key(text)
    try:
        with open(sys.stdin.fileno(), "rb", buffering=0, closefd=False) as src, \
                open(sys.stdout.fileno(), "wb", buffering=0, closefd=False) as dst:
            xts_stream(key, src, dst, args.tweak_base, encrypt=args.encrypt, unit=args.unit,
                       tweak_step=TweakStep(args.tweak_step))
    finally:
        key.wipe()
    return 0
