"""The registry of scenario phases and ``mktme-guest phase NAME``.

A phase is data (a :class:`~mktme_guest.phaselib.Phase`: name, options, run
function) so the host can list them and run each in its own boot:

    mktme-emu run -- mktme-guest phase namespace-setup
    mktme-emu run -- mktme-guest phase namespace-check-without-key
    ...

Phases by scenario (SPEC section 6):

1. namespace key: ``namespace-setup``, (power cycle), ``namespace-check-without-key``,
   ``namespace-check-with-key``
2. key at mmap time: ``dax-file --fs ext4``, ``dax-file --fs xfs``, ``devdax``
3. relocation: ``relocation`` (boot the backend with ``--tweak logical`` for the
   logical-mode table)
4. lost keys: ``lost-keys-before``, (power cycle), ``lost-keys-after``
5. fscrypt offload: ``fscrypt-offload`` (boot the backend with ``--tweak dun --unit 4096``)

Exit status: 0 when every outcome is the model's, 3 when the phase ran but an
outcome differs, 1 when it could not run.
"""

from __future__ import annotations

import argparse

from mktme_emu.protocol import Client

from . import phase_dax, phase_fscrypt, phase_keys, phase_namespace
from .phaselib import EXIT_UNEXPECTED, Phase, Result, emit

PHASES: dict[str, Phase] = {p.name: p for p in (
    *phase_namespace.PHASES, *phase_dax.PHASES, *phase_keys.PHASES, *phase_fscrypt.PHASES)}


def add_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``phase NAME [options]``: one sub-parser per phase, each with its own --help."""
    cmd = commands.add_parser(
        "phase", help="run one guest-side step of a scenario (SPEC section 6)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = cmd.add_subparsers(dest="phase", metavar="NAME", required=True)
    for phase in PHASES.values():
        sub = names.add_parser(phase.name, help=phase.help, description=phase.help)
        sub.add_argument("--json", action="store_true", help="print only the result JSON")
        phase.add_arguments(sub)
        sub.set_defaults(phase_obj=phase)


def run(args: argparse.Namespace, client: Client) -> int:
    """Run the chosen phase, print its result; the exit status says whether it matched."""
    phase: Phase = args.phase_obj
    result: Result = phase.run(args, client)
    emit(result, args.json)
    return 0 if result.get("ok") else EXIT_UNEXPECTED
