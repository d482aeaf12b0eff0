"""Keys stay out of argv, cores and other processes; refusals say why; ``serve --daemon``.

Against real ``mktme-emu serve`` processes: a key read from ``--user-file``,
``--options-file`` or stdin programs exactly the key the inline form would
(the media holds the independent XTS ciphertext under it); a refused PCONFIG
status is explained on stderr; the key-holding commands run with a core
limit of 0 and not dumpable; ``serve --daemon`` returns once its sockets
listen and prints the pid.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from backend_helpers import PAGE, Backends, cli, mktme_emu_command, xts_reference

DATA_KEY = bytes.fromhex("a1b2c3d4e5f60718293a4b5c6d7e8f90")
TWEAK_KEY = bytes.fromhex("0f1e2d3c4b5a69788796a5b4c3d2e1f0")
USER = f"{DATA_KEY.hex()}:{TWEAK_KEY.hex()}"
OPTIONS = f"type=user algorithm=aes-xts-128 key={DATA_KEY.hex()} tweak={TWEAK_KEY.hex()}"


@pytest.fixture
def backends(tmp_path: Path):
    with Backends(tmp_path) as pool:
        yield pool


def _run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*mktme_emu_command(), *args], input=stdin, capture_output=True,
                          text=True, timeout=60, check=False)


def _media_is_under_the_key(backend, keyid: int, page: int) -> None:
    """Map a page with the KeyID, write it, flush: the media is XTS under DATA_KEY:TWEAK_KEY."""
    client = backend.client()
    client.map(page * PAGE, PAGE, keyid)
    plain = os.urandom(PAGE)
    backend.write(page * PAGE, plain)
    client.flush()
    base = client.config().base
    tweaks = [base + page * PAGE + i * 64 for i in range(PAGE // 64)]
    assert backend.media(page * PAGE, PAGE) == xts_reference(DATA_KEY + TWEAK_KEY, plain, tweaks, 64)


def test_key_files_and_stdin_program_the_same_key(backends, tmp_path: Path) -> None:
    b = backends()
    sock = str(b.admin_socket)
    user_file = tmp_path / "user.key"
    user_file.write_text(USER + "\n")
    options_file = tmp_path / "options.key"
    options_file.write_text(OPTIONS)
    runs = [
        _run("key", "-s", sock, "--keyid", "1", "--user-file", str(user_file)),
        _run("key", "-s", sock, "--keyid", "2", "--options-file", str(options_file)),
        _run("key", "-s", sock, "--keyid", "3", "--user-file", "-", stdin=USER),
        _run("key", "-s", sock, "--keyid", "4", "--options-file", "-", stdin=OPTIONS + "\n"),
    ]
    for result in runs:
        assert result.returncode == 0 and result.stdout.strip() == "PROG_SUCCESS", result.stderr
    for keyid in (1, 2, 3, 4):
        _media_is_under_the_key(b, keyid, keyid)


def _guest(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    guest = Path(mktme_emu_command()[0]).with_name("mktme-guest")
    command = [str(guest)] if guest.exists() else [sys.executable, "-m", "mktme_guest.cli"]
    return subprocess.run([*command, *args], input=stdin, capture_output=True, text=True,
                          timeout=60, check=False)


def test_guest_key_files_and_refusals(backends, tmp_path: Path) -> None:
    """mktme-guest reads keys from files and stdin too, and explains a refusal in one line."""
    b = backends()
    channel = f"unix:{b.guest_socket}"
    user_file = tmp_path / "user.key"
    user_file.write_text(USER)
    ok = [_guest("--channel", channel, "key", "--keyid", "5", "--user-file", str(user_file)),
          _guest("--channel", channel, "key", "--keyid", "6", "--options-file", "-", stdin=OPTIONS)]
    for result in ok:
        assert result.returncode == 0 and result.stdout.strip() == "PROG_SUCCESS", result.stderr
    for keyid in (5, 6):
        _media_is_under_the_key(b, keyid, keyid)
    refused = _guest("--channel", channel, "key", "--keyid", "0", "--user-file", str(user_file))
    assert refused.returncode == 1 and refused.stdout.strip() == "INVALID_KEYID"
    assert refused.stderr.strip().splitlines() == [
        "mktme-guest: programming KeyID 0 failed: INVALID_KEYID: KeyID 0 is the TME KeyID; "
        "1..63 are programmable"]


def test_refused_status_says_why(backends, tmp_path: Path) -> None:
    b = backends()
    sock = str(b.admin_socket)
    same = tmp_path / "same.key"
    same.write_text(f"{DATA_KEY.hex()}:{DATA_KEY.hex()}")
    cases = {
        "INVALID_KEYID: KeyID 0 is the TME KeyID; 1..63 are programmable":
            _run("key", "-s", sock, "--keyid", "0", "--random"),
        "INVALID_KEYID: KeyID 64 is out of range; 1..63 are programmable":
            _run("key", "-s", sock, "--keyid", "64", "--clear"),
        "INVALID_PROG_CMD: the data key equals the tweak key, which XTS forbids":
            _run("key", "-s", sock, "--keyid", "1", "--user-file", str(same)),
    }
    for says, result in cases.items():
        assert result.returncode == 1
        assert result.stdout.split() == [says.split(":")[0]]
        assert result.stderr.strip().splitlines() == [f"mktme-emu: {says}"], result.stderr
        assert DATA_KEY.hex()[:12] not in result.stderr


def test_status_explanations_name_every_code() -> None:
    from mktme_emu.pconfig import KeyCommand, KeyProgram, KeyStatus

    for status in KeyStatus:
        text = status.explain()
        assert text.startswith(f"{status.name}: ") and len(text) > len(status.name) + 10
    tme = KeyProgram(keyid=0, command=int(KeyCommand.SET_KEY_RANDOM), algorithm=1)
    assert KeyStatus.INVALID_KEYID.explain(tme, 64) == (
        "INVALID_KEYID: KeyID 0 is the TME KeyID; 1..63 are programmable")


def test_hardening_helper_sets_the_core_limit_and_dumpable_off() -> None:
    code = ("import resource; from mktme_emu.hardening import harden_process, is_dumpable; "
            "assert is_dumpable(); harden_process(); "
            "print(resource.getrlimit(resource.RLIMIT_CORE), is_dumpable())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         check=True).stdout
    assert out.strip() == "(0, 0) False"


def _allow_cores() -> None:
    """In the child before exec: a non-zero core limit, so that lowering it is seen."""
    resource.setrlimit(resource.RLIMIT_CORE, (1 << 20, 1 << 20))


def _core_limit(pid: int) -> list[str]:
    line = next(line for line in Path(f"/proc/{pid}/limits").read_text().splitlines()
                if line.startswith("Max core file size"))
    return line.split()[4:6]


def _wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize("command", ["key", "xts"])
def test_key_and_xts_run_without_cores(tmp_path: Path, command: str) -> None:
    """Held mid-read (key file on stdin / data on stdin), the process has a core limit of 0."""
    args = (["key", "-s", str(tmp_path / "none.sock"), "--keyid", "1", "--user-file", "-"]
            if command == "key" else
            ["xts", "--encrypt", "--key", USER, "--tweak-base", "0"])
    proc = subprocess.Popen([*mktme_emu_command(), *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=_allow_cores)
    try:
        # Started with cores allowed; the command lowers the limit itself before reading stdin.
        _wait_for(lambda: _core_limit(proc.pid) == ["0", "0"])
        proc.stdin.write(b"0")  # still waiting for the rest of its input: alive
        proc.stdin.flush()
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.communicate()


def test_serve_daemon_returns_when_ready_and_runs_without_cores(tmp_path: Path) -> None:
    state = tmp_path / "nv"
    result = subprocess.run([*mktme_emu_command(), "serve", "--daemon", "--state-dir", str(state),
                             "--size", "4M", "--view", str(tmp_path / "view")],
                            capture_output=True, text=True, timeout=60, check=False,
                            preexec_fn=_allow_cores)
    assert result.returncode == 0, result.stderr
    pid = int(result.stdout.strip())
    try:
        # Ready means listening: a client connects at once, with no retry.
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(state / "control.sock"))
        assert _core_limit(pid) == ["0", "0"]
        status = cli("status", "-s", str(state / "control.sock"), "--json")
        assert status.returncode == 0 and '"size": 4194304' in status.stdout
    finally:
        os.kill(pid, signal.SIGTERM)
        _wait_for(lambda: not (state / "control.sock").exists())
    assert "written back" in (state / "serve.log").read_text()
    assert (state / "serve.log").stat().st_mode & 0o777 == 0o600


def test_serve_daemon_that_cannot_start_says_why_and_fails(tmp_path: Path) -> None:
    result = cli("serve", "--daemon", "--state-dir", str(tmp_path / "nv"), "--size", "3M",
                 "--view", str(tmp_path / "view"))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "mktme-emu: NVDIMM size must be a positive multiple of 2M, got 3145728"]
