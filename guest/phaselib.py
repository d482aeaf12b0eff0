"""What every scenario phase shares: the Phase record, data patterns, outcomes, keys, output.

A phase is one guest-side step of a SPEC section 6 scenario, run in one boot
by ``mktme-guest phase NAME``.  The host runs phases in fresh boots on the
same media and parses their result: the last line of stdout is
``MKTME-RESULT {json}`` (or, with ``--json``, stdout is just the JSON).

Data written by phases is reproducible on the host without this package:
``pattern(seed, n)`` is ``hashlib.shake_256(b"mktme-emu pattern %d" % seed).digest(n)``.
Outcomes compare what the guest reads back with that pattern, page by page:
``intact`` (every page), ``garbage`` (no page), ``partial`` (a bug signal).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from mktme_emu.protocol import Client, KeyCommand, KeyStatus, key_program
from mktme_emu.usage import read_secret
from mktme_emu.vocabulary import phase_result_line, phase_results

from .argtypes import integer
from .errors import KeyRefused, MktmeError
from .physaddr import PAGE_SIZE, Extent

# Test keys (XTS-128: data key : tweak key). Not secrets: the host needs them to
# compute expected ciphertext, and phases in later boots must program them again.
TEST_KEY = "000102030405060708090a0b0c0d0e0f:101112131415161718191a1b1c1d1e1f"
OTHER_KEY = "f0e0d0c0b0a090807060504030201000:1f1e1d1c1b1a19181716151413121110"
EXIT_UNEXPECTED = 3  # the phase ran, but an outcome differs from the model

Result = dict[str, Any]


@dataclass(frozen=True)
class Phase:
    """A named guest step: its options and the function that runs it."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, Client], Result]


def pattern(seed: int, length: int) -> bytes:
    """The reproducible bytes phases write (see the module docstring)."""
    return hashlib.shake_256(b"mktme-emu pattern %d" % seed).digest(length)


def pattern_spec(seed: int) -> str:
    """How the host recomputes :func:`pattern`, for the result JSON."""
    return f"shake_256(b'mktme-emu pattern {seed}').digest(length)"


def classify(actual: bytes, expected: bytes, unit: int = PAGE_SIZE) -> str:
    """``intact`` / ``garbage`` / ``partial``: how many ``unit``-sized pieces match."""
    if len(actual) != len(expected):
        raise ValueError(f"compared {len(actual)} bytes with {len(expected)}")
    pieces = range(0, len(expected), unit)
    same = sum(actual[i:i + unit] == expected[i:i + unit] for i in pieces)
    if same == len(pieces):
        return "intact"
    return "garbage" if same == 0 else "partial"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- keys -----------------------------------------------------------------------------------

def key_file(path: str) -> str:
    """The key text held in a file (what the host hands a phase, never on argv).

    The error names neither the file's contents nor, in case a key was typed
    where the path belongs, the path.
    """
    try:
        return read_secret(path, "key file")
    except MktmeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_key_arguments(parser: argparse.ArgumentParser, keyid: int, *, key: str = TEST_KEY,
                      prefix: str = "") -> None:
    """``--keyid`` and ``--user KEY:TWEAK`` (a documented test key by default) and ``--alg``."""
    dest = prefix.replace("-", "_")
    parser.add_argument(f"--{prefix}keyid", dest=f"{dest}keyid", type=integer,
                        default=keyid, help=f"KeyID to use (default {keyid})")
    parser.add_argument(f"--{prefix}user", dest=f"{dest}user", metavar="KEYHEX:TWEAKHEX",
                        default=key, help="user key to program (default: the test key in "
                        "mktme_guest.phaselib)")
    parser.add_argument(f"--{prefix}user-file", dest=f"{dest}user", metavar="FILE", type=key_file,
                        help="read the user key from FILE instead: keys stay off the command line")
    if not prefix:
        parser.add_argument("--alg", default="aes-xts-128", choices=["aes-xts-128", "aes-xts-256"])


def program(client: Client, keyid: int, command: KeyCommand, alg: str = "aes-xts-128",
            user: str | None = None) -> None:
    """Program a KeyID; KeyRefused unless PCONFIG says PROG_SUCCESS."""
    key_hex = tweak_hex = None
    if user is not None:
        key_hex, _, tweak_hex = user.partition(":")
    status = client.program_key(key_program(keyid, command, alg, key_hex, tweak_hex))
    if status is not KeyStatus.PROG_SUCCESS:
        raise KeyRefused(keyid, status)


def program_user(client: Client, keyid: int, user: str, alg: str = "aes-xts-128") -> None:
    program(client, keyid, KeyCommand.SET_KEY_DIRECT, alg, user)


# -- results ----------------------------------------------------------------------------------

def extents_json(extents: list[Extent], base: int) -> list[dict[str, int]]:
    """Extents with their data-area offsets, for the host to find them on the media."""
    return [{**e.as_dict(), "offset": e.pa - base} for e in extents]


def outcome_rows(rows: list[dict[str, Any]]) -> bool:
    """True when every row's outcome is its expected one (rows without expectation pass)."""
    return all(r.get("expected") in (None, r["outcome"]) for r in rows)


def emit(result: Result, as_json: bool, out: TextIO | None = None) -> None:
    """Print a phase result: a short human summary then the MKTME-RESULT line, or JSON only."""
    out = out or sys.stdout
    if as_json:
        print(json.dumps(result, indent=2, sort_keys=True), file=out)
        return
    print(f"phase {result.get('phase')}: {'ok' if result.get('ok') else 'UNEXPECTED'}", file=out)
    for row in result.get("cases", []):
        expected = row.get("expected")
        mark = "" if expected in (None, row["outcome"]) else f"   (expected {expected})"
        print(f"  {row['case']:34} {row['outcome']}{mark}", file=out)
    print(phase_result_line(result), file=out)
    out.flush()


def parse_result(stdout: str) -> Result:
    """The result of a phase from its stdout (either form); for host-side callers and tests."""
    found = phase_results(stdout)
    return found[-1] if found else dict(json.loads(stdout))
