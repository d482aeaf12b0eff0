"""The guest path imports only what it needs (issue 10, item 6).

Under TCG every imported module costs the guest tens of milliseconds, so
``mktme-guest status`` must not drag in the scenario phases, the DAX helpers
(ctypes), logging, the host's numeric/crypto stacks or the VM tooling.  Each
case runs in a fresh interpreter and reports its ``sys.modules``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

#: Never on the guest's light paths: the host's heavy dependencies.
HEAVY = ("numpy", "cryptography", "elftools", "qemu", "asyncio")
#: Not needed by `status`: what the other commands import when they run, and what the
#: protocol and the parser used to drag in (each measured at 10..120 ms under TCG).
NOT_FOR_STATUS = (*HEAVY, "mktme_guest.phases", "mktme_guest.dax", "ctypes", "logging",
                  "subprocess", "socket", "typing", "mktme_emu.vm", "mktme_emu.controller",
                  "dataclasses", "inspect", "mktme_emu.pconfig", "mktme_guest.physaddr", "json",
                  "threading", "shutil", "array")


def imported_after(code: str) -> set[str]:
    """The top-level and dotted module names loaded once ``code`` has run."""
    probe = f"{code}\nimport sys\nprint('MODULES', *sorted(sys.modules))"  # no json: it is pinned
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, timeout=60)
    last = out.stdout.splitlines()[-1].split()
    assert last[0] == "MODULES", out.stdout
    return set(last[1:])


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


def test_the_protocol_package_loads_its_modules_on_first_use() -> None:
    code = "import mktme_emu.protocol"
    modules = imported_after(code)
    assert not {m for m in modules if m.startswith("mktme_emu.protocol.")}
    assert "mktme_emu.pconfig" not in modules
    modules = imported_after("from mktme_emu.protocol import Client")
    assert "mktme_emu.protocol.client" in modules and "mktme_emu.pconfig" not in modules


def test_every_public_protocol_name_is_its_home_modules_object() -> None:
    from mktme_emu import errors, pconfig, protocol
    from mktme_emu.protocol import client, framing, messages

    homes = (errors, pconfig, client, framing, messages)
    for name in protocol.__all__:
        value = getattr(protocol, name)
        assert any(getattr(home, name, None) is value for home in homes), name
    assert set(protocol.__all__) <= set(dir(protocol))
    with pytest.raises(AttributeError):
        protocol.NoSuchName  # noqa: B018
    # the first use stored the name: no second import, the same object
    assert protocol.__dict__["Client"] is client.Client


@pytest.mark.parametrize(("words", "command"), [
    (["status"], "status"),
    (["-v", "--channel", "/dev/vport0p2", "--timeout", "5", "status", "--json"], "status"),
    (["--channel=unix:/s", "key", "--keyid", "1", "--random"], "key"),
    (["--chan", "status", "map"], None),  # an abbreviation: the whole parser decides
    (["--help"], None), (["bogus"], None), ([], None), (["--channel"], None),
    (["phase", "devdax"], "phase"),
])
def test_command_word_is_only_trusted_after_exact_global_options(words: list[str],
                                                                 command: str | None) -> None:
    from mktme_guest import cli
    assert cli.command_word(words) == command


@pytest.mark.parametrize("words", [
    ["--channel", "/x", "status", "--json"],
    ["-v", "key", "--keyid", "3", "--clear"],
    ["--timeout", "2", "inspect", "--pa", "0x1000", "--length", "8K"],
    ["map", "--pa", "4K", "--length", "4K", "--keyid", "2"],
])
def test_one_command_parser_parses_as_the_whole_parser(words: list[str]) -> None:
    from mktme_guest import cli
    whole = cli.build_parser(with_phases=False).parse_args(words)
    alone = cli.build_parser(command=cli.command_word(words)).parse_args(words)
    assert vars(alone) == vars(whole)


def test_help_wraps_at_the_terminal_width_as_argparse_does(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from mktme_emu.usage import OneLineParser, terminal_columns
    monkeypatch.setenv("COLUMNS", "52")
    assert terminal_columns() == 52
    texts = []
    for cls in (argparse.ArgumentParser, OneLineParser):
        parser = cls(prog="tool", description="word " * 30)
        parser.add_argument("--option", help="a help text long enough to wrap " * 3)
        texts.append(parser.format_help())
    assert texts[0] == texts[1] and max(map(len, texts[1].splitlines())) <= 50
    # no number in $COLUMNS and no terminal on stdout: the fallback
    probe = "from mktme_emu.usage import terminal_columns; print(terminal_columns(fallback=77))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env={**os.environ, "COLUMNS": "not a number"}, timeout=60)
    assert out.stdout.strip() == "77"
