"""The guest path imports only what it needs (issue 10, item 6).

Under TCG every imported module costs the guest tens of milliseconds, so
``mktme-guest status`` must not drag in the scenario phases, the DAX helpers
(ctypes), logging, the host's numeric/crypto stacks or the VM tooling.  Each
case runs in a fresh interpreter and reports its ``sys.modules``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

#: Never on the guest's light paths: the host's heavy dependencies.
HEAVY = ("numpy", "cryptography", "elftools", "qemu", "asyncio")
#: Not needed by `status`: what the other commands import when they run.
NOT_FOR_STATUS = (*HEAVY, "mktme_guest.phases", "mktme_guest.dax", "ctypes", "logging",
                  "subprocess", "socket", "typing", "mktme_emu.vm", "mktme_emu.controller")


def imported_after(code: str) -> set[str]:
    """The top-level and dotted module names loaded once ``code`` has run."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, timeout=60)
    # json itself is imported by the probe's print: only the last line is ours
    return set(json.loads(out.stdout.splitlines()[-1]))


def loaded(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(n for n in names if n in modules or any(m.startswith(f"{n}.") for m in modules))


@pytest.mark.parametrize("module", ["mktme_emu", "mktme_emu.protocol", "mktme_emu.errors",
                                    "mktme_guest", "mktme_guest.cli"])
def test_guest_modules_import_nothing_heavy(module: str) -> None:
    assert loaded(imported_after(f"import {module}"), HEAVY) == []


def test_status_path_imports_only_what_status_needs() -> None:
    # A port device that does not exist (as in the guest, not a unix socket): the command
    # fails after its imports and its parsing.
    code = ("from mktme_guest import cli\n"
            "rc = cli.main(['--channel', '/nonexistent/vport0p2', 'status'])\n"
            "assert rc == cli.EXIT_ERROR, rc")
    assert loaded(imported_after(code), NOT_FOR_STATUS) == []


def test_phase_command_still_finds_its_phases() -> None:
    code = ("from mktme_guest import cli\n"
            "try:\n    cli.main(['phase', '--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "NAME" in out.stdout  # the phase names come from the full parser


def test_top_level_help_lists_phase() -> None:
    out = subprocess.run([sys.executable, "-m", "mktme_guest.cli", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "phase" in out.stdout and "status" in out.stdout
