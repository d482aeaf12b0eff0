"""Bad command lines to ``mktme-emu`` and ``mktme-guest``: one line, a non-zero exit, no echo.

A bounded fuzz over the argument surface of every subcommand (bad numbers,
out-of-range KeyIDs, bad hex, missing files, unknown options, a key typed in
the wrong place, missing or clashing options) asserts for each case: a
non-zero exit, exactly one line on stderr, no traceback, and none of the
key-like text on stdout or stderr.  The cases run in one child interpreter
(the commands harden their process: not the test runner's), through each
CLI's ``main``; commands that would boot a VM only parse.  A few cases also
run as real processes.  ``MKTME_CLI_FUZZ_CASES`` raises the bound.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from backend_helpers import cli, mktme_emu_command

CASES = int(os.environ.get("MKTME_CLI_FUZZ_CASES", "300"))
SOCK = "/nonexistent/mktme-fuzz/control.sock"
CHANNEL = "unix:/nonexistent/mktme-fuzz/guest.sock"
MISSING = "/nonexistent/mktme-fuzz/key"

RUNNER = r"""
import contextlib, io, json, logging, sys, traceback
from mktme_emu.cli.main import build_parser, main as host_main, _command_word
from mktme_guest.cli import build_parser as guest_parser, main as guest_main

cases = json.load(open(sys.argv[1]))
results = []
for tool, argv, parse_only in cases:
    out, err = io.StringIO(), io.StringIO()
    logging.root.handlers.clear()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            if parse_only:
                parser = build_parser(_command_word(argv)) if tool == "host" else guest_parser()
                parser.parse_args(argv)
                code = 0
            else:
                code = (host_main if tool == "host" else guest_main)(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            err.write("uncaught: " + traceback.format_exc())
            code = -1
    results.append({"code": code, "out": out.getvalue(), "err": err.getvalue()})
json.dump(results, open(sys.argv[2], "w"))
"""


def secret(rng: random.Random) -> str:
    """Key-like text: 32 or 64 hex digits, sometimes as KEY:TWEAK."""
    text = rng.randbytes(rng.choice((16, 32))).hex()
    return f"{text}:{rng.randbytes(16).hex()}" if rng.random() < 0.3 else text


BAD_NUMBERS = ("12x", "0xZZ", "", "-", "1.5.2", "one", "0x", "4K4", "0b2", "--")
# (value, options it is out of range for): refused by the command, not by argparse.
OUT_OF_RANGE = {
    "--keyid": ("99999", "-1", "65536", str(1 << 70), "64", "0"),
    "--size": ("3M", "0", "1K"),
    "--unit": ("48", "8192", "0"),
    "--keyid-bits": ("0", "99"),
    "--base": ("0x1001",),
    "--label-size": ("3",),
}


# Options whose values argparse or the command checks: the only ones mutated in
# command lines that must not run when valid (serve would serve, boot would boot).
CHECKED = {"--size", "--unit", "--keyid-bits", "--base", "--label-size", "--tme", "--tweak",
           "--accel", "--nvdimm-size", "--cpus", "--memory", "--timeout", "--ns", "--pages",
           "--seed", "--alg", "--offset"}
# Options naming a file or socket: their errors say which path failed, so a key
# typed there is echoed; only the key-file options hide their path.
PATH_OPTIONS = {"--channel", "--file", "--state-dir", "--view", "--package", "--socket"}
# Commands whose trailing words are the guest command (argparse.REMAINDER): a stray word is valid.
TAKES_COMMAND = {"boot", "run"}


def templates(tmp: Path) -> list[tuple[str, list[str], bool, bool]]:
    """(tool, a command line, parse only, safe to run when valid) per subcommand form."""
    k = "000102030405060708090a0b0c0d0e0f"
    t = "101112131415161718191a1b1c1d1e1f"
    host = [
        ["status", "-s", SOCK, "--json"],
        ["key", "-s", SOCK, "--keyid", "1", "--random"],
        ["key", "-s", SOCK, "--keyid", "1", "--user", f"{k}:{t}"],
        ["key", "-s", SOCK, "--keyid", "1", "--user-file", MISSING],
        ["key", "-s", SOCK, "--keyid", "2", "--options", f"type=user key={k} tweak={t}"],
        ["key", "-s", SOCK, "--keyid", "2", "--options-file", MISSING, "--alg", "aes-xts-128"],
        ["map", "-s", SOCK, "--offset", "0", "--length", "2M", "--keyid", "1"],
        ["flush", "-s", SOCK, "--offset", "0", "--length", "4K"],
        ["relocate", "-s", SOCK, "--src", "0", "--dst", "4K", "--length", "4K", "--mode", "raw"],
        ["inspect", "-s", SOCK, "--offset", "0", "--length", "8K", "--json"],
        ["power-cycle", "-s", SOCK],
        ["xts", "--encrypt", "--key-file", MISSING, "--tweak-base", "0", "--unit", "64"],
        ["xts", "--decrypt", "--key", f"{k}:{t}", "--tweak-base", "0x10", "--unit", "4K",
         "--tweak-step", "dun"],
    ]
    serve = ["serve", "--state-dir", str(tmp / "state"), "--view", str(tmp / "view"),
             "--size", "4M", "--unit", "64", "--keyid-bits", "6", "--base", "0x100000000",
             "--label-size", "0", "--tme", "bypass", "--tweak", "spa"]
    vm = [
        ["boot", "--accel", "tcg", "--nvdimm-size", "128M", "--cpus", "1", "--ns", "fsdax"],
        ["run", "--accel", "tcg", "--memory", "512M", "--timeout", "5", "--tme", "bypass", "--",
         "true"],
        ["scenario", "relocation", "--accel", "tcg", "--nvdimm-size", "256M"],
        ["kernel", "fetch", "--package", "x"],
        ["monitor", "--socket", SOCK],
    ]
    guest = [
        ["--channel", CHANNEL, "status", "--json"],
        ["--channel", CHANNEL, "key", "--keyid", "1", "--random"],
        ["--channel", CHANNEL, "key", "--keyid", "1", "--user-file", MISSING],
        ["--channel", CHANNEL, "namespace-key", "--keyid", "1", "--options", f"type=user key={k} "
         f"tweak={t}"],
        ["--channel", CHANNEL, "map", "--pa", "0x100000000", "--length", "4K", "--keyid", "1"],
        ["--channel", CHANNEL, "flush", "--file", MISSING],
        ["--channel", CHANNEL, "relocate", "--src-pa", "0", "--dst-pa", "4K", "--length", "4K",
         "--mode", "keyed"],
        ["--channel", CHANNEL, "inspect", "--pa", "0x100000000", "--length", "4K"],
        ["--channel", CHANNEL, "resolve", "--file", MISSING, "--json"],
    ]
    phases = [  # they run mkfs, mount and the like: parse only
        ["phase", "devdax", "--pages", "16", "--seed", "3", "--offset", "4M", "--alg", "aes-xts-128"],
        ["phase", "relocation", "--pages", "4"],
    ]
    return ([("host", argv, False, True) for argv in host]
            + [("host", serve, False, False)]
            + [("host", argv, True, False) for argv in vm]
            + [("guest", argv, False, True) for argv in guest]
            + [("guest", argv, True, False) for argv in phases])


def _value_positions(argv: list[str], runnable: bool) -> list[int]:
    """Indices of option values (a word after an option that is not itself an option)."""
    return [i for i in range(1, len(argv))
            if argv[i - 1].startswith("--") and not argv[i].startswith("-") and argv[i - 1] != "--"
            and (runnable or argv[i - 1] in CHECKED)]


def mutate(rng: random.Random, argv: list[str], runnable: bool) -> tuple[list[str], str | None]:
    """One defect in a command line; the key-like text it carries, if any."""
    argv = list(argv)
    values = _value_positions(argv, runnable)
    stop = argv.index("--") if "--" in argv else len(argv)
    kinds = ["unknown-option", "bad-number", "out-of-range", "key-as-value", "missing-value"]
    if not TAKES_COMMAND & set(argv):
        kinds.append("stray-key")
    if runnable:
        kinds += ["drop-option", "bad-hex"]
    kind = rng.choice(kinds)
    key = secret(rng)
    if kind == "unknown-option" or not values:
        argv.insert(rng.randint(1, stop), f"--{key}" if rng.random() < 0.5 else f"--x={key}")
        return argv, key
    if kind == "stray-key":
        argv.insert(rng.randint(1, stop), key)
        return argv, key
    if kind == "out-of-range":
        ranged = [i for i in values if argv[i - 1] in OUT_OF_RANGE]
        if ranged:
            i = rng.choice(ranged)
            argv[i] = rng.choice(OUT_OF_RANGE[argv[i - 1]])
            return argv, None
        kind = "bad-number"
    i = rng.choice(values)
    if kind == "bad-number":
        argv[i] = rng.choice(BAD_NUMBERS) + ("q" + key[:8] if rng.random() < 0.5 else "")
        return argv, None
    if kind == "key-as-value":
        argv[i] = key
        return argv, None if argv[i - 1] in PATH_OPTIONS else key
    if kind == "missing-value":
        del argv[i]
        return argv, None
    if kind == "bad-hex":
        hexy = [j for j in values if argv[j - 1] in ("--user", "--key", "--options")]
        if hexy:
            j = rng.choice(hexy)
            argv[j] = argv[j].replace("0f", "zz" + key[:6], 1)
            return argv, key[:6] if len(key) >= 6 else None
    del argv[i - 1:i + 1]  # drop an option and its value
    return argv, None


def build_cases(tmp: Path, count: int, seed: int) -> list[tuple[str, list[str], bool, str | None]]:
    rng = random.Random(seed)
    forms = templates(tmp)
    cases = []
    for n in range(count):
        tool, argv, parse_only, runnable = forms[n % len(forms)]
        mutated, key = mutate(rng, argv, runnable)
        cases.append((tool, mutated, parse_only, key))
    return cases


def run_cases(tmp_path: Path, cases: list[tuple[str, list[str], bool, str | None]]) -> list[dict]:
    case_file, result_file = tmp_path / "cases.json", tmp_path / "results.json"
    case_file.write_text(json.dumps([(tool, argv, parse_only) for tool, argv, parse_only, _ in cases]))
    subprocess.run([sys.executable, "-c", RUNNER, str(case_file), str(result_file)],
                   stdin=subprocess.DEVNULL, timeout=600, check=True, cwd=tmp_path)
    return json.loads(result_file.read_text())


def assert_one_line_refusal(result: dict, key: str | None, what: object) -> None:
    lines = [line for line in result["err"].splitlines() if line.strip()]
    assert result["code"] not in (0, -1), (what, result)
    assert len(lines) == 1, (what, result["err"])
    assert "Traceback" not in result["err"] and "internal error" not in result["err"], (what, result)
    if key:
        said = (result["out"] + result["err"]).lower()
        for start in range(0, max(1, len(key) - 12 + 1), 2):
            assert key[start:start + 12].lower() not in said, (what, result["err"])


def test_fuzzed_command_lines_are_refused_in_one_line(tmp_path: Path) -> None:
    cases = build_cases(tmp_path, CASES, seed=int(os.environ.get("MKTME_CLI_FUZZ_SEED", "8")))
    results = run_cases(tmp_path, cases)
    assert len(results) == len(cases)
    for (tool, argv, _, key), result in zip(cases, results, strict=True):
        assert_one_line_refusal(result, key, (tool, argv))
    assert not (tmp_path / "view").exists(), "a refused serve left a view behind"


def test_a_key_typed_in_the_wrong_place_is_named_by_position(tmp_path: Path) -> None:
    key = "00112233445566778899aabbccddeeff:ffeeddccbbaa99887766554433221100"
    cases = [
        ("host", ["key", "-s", SOCK, "--keyid", "1", "--random", key], False, key),
        ("host", [key, "key"], False, key),
        ("host", ["relocate", "-s", SOCK, "--src", "0", "--dst", "0", "--length", "4K",
                  "--mode", key], False, key),
        ("host", ["map", "-s", SOCK, "--offset", key, "--length", "4K", "--keyid", "1"], False, key),
        ("host", ["key", "-s", SOCK, "--keyid", "1", "--random=" + key], False, key),
        ("guest", ["--channel", CHANNEL, "key", "--keyid", "1", "--random", key], False, key),
        ("guest", ["--channel", CHANNEL, "key", "--keyid", key, "--random"], False, key),
    ]
    results = run_cases(tmp_path, cases)
    # A value the parser rejects without repeating it may be named by its option instead.
    expected = ["#7", "#1", "#11", "--offset", "#6", "#7", "--keyid"]
    for (_tool, argv, _, _), result, position in zip(cases, results, expected, strict=True):
        assert_one_line_refusal(result, key, argv)
        assert f"argument {position}" in result["err"], (argv, result["err"])


@pytest.mark.parametrize(("argv", "says"), [
    (["key", "-s", SOCK, "--keyid", "99999", "--random"], "KeyID 99999 is out of range"),
    (["key", "-s", SOCK, "--keyid", "1", "--user-file", MISSING], "--user-file: cannot read the"),
    (["xts", "--encrypt", "--key", "00" * 16 + ":" + "00" * 16, "--tweak-base", "0"],
     "the data key equals the tweak key"),
    (["serve", "--state-dir", "STATE", "--size", "99999T"], "mktme-emu: "),
])
def test_real_processes_refuse_in_one_line(tmp_path: Path, argv: list[str], says: str) -> None:
    argv = [str(tmp_path / "s") if a == "STATE" else a for a in argv]
    if argv[0] == "serve":
        argv += ["--view", str(tmp_path / "view")]
    result = cli(*argv)
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert says in result.stderr


def test_the_xts_command_line_does_not_load_the_controller(tmp_path: Path) -> None:
    """``xts`` builds only its own parser: nothing of the controller or service is imported."""
    code = ("import sys; from mktme_emu.cli.main import main; main(sys.argv[1:]); "
            "print(sorted(m for m in sys.modules if m.startswith('mktme_emu.')))")
    result = subprocess.run(
        [sys.executable, "-c", code, "xts", "--encrypt", "--key", "01" * 16 + ":" + "02" * 16,
         "--tweak-base", "0"], stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=60, check=True)
    loaded = result.stdout.strip()
    assert "mktme_emu.crypto" in loaded
    assert "controller" not in loaded and "service" not in loaded and ".vm" not in loaded
    assert mktme_emu_command()
