"""Guest networking without a guest: options, QEMU args, owner bookkeeping, namespace lifecycle.

The namespace tests need root (they create real network namespaces, each
named for this run and removed in a ``finally``); the VM tests that send
traffic to a guest are in test_vm_net_guest.py.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from mktme_emu.errors import ConfigError
from mktme_emu.vm.net import (
    NETNS_DIR,
    NS_PREFIX,
    TAP_GUEST,
    TAP_HOST,
    NetOptions,
    PortForward,
    namespace_name,
    open_network,
    owner_alive,
    plan_network,
    process_start,
    stale_namespaces,
)

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


def namespaces() -> set[str]:
    return {p.name for p in NETNS_DIR.iterdir()} if NETNS_DIR.is_dir() else set()


def fake_proc(tmp_path: Path, processes: dict[int, int]) -> Path:
    """A /proc with one stat file per pid, start time in field 22 (comm has ') (' in it)."""
    for pid, start in processes.items():
        (tmp_path / str(pid)).mkdir()
        fields = ["S", *["0"] * 18, str(start), "0"]
        (tmp_path / str(pid) / "stat").write_text(f"{pid} (a) (b) {' '.join(fields)}\n")
    return tmp_path


# -- options and QEMU args --------------------------------------------------------------

def test_hostfwd_parses_and_rejects_bad_forms() -> None:
    assert PortForward.parse("8080:80") == PortForward(8080, 80)
    for bad in ("8080", "a:80", "80:", "0:80", "80:70000", "-1:80"):
        with pytest.raises(ConfigError, match="hostfwd"):
            PortForward.parse(bad)


def test_hostfwd_needs_user_mode() -> None:
    with pytest.raises(ConfigError, match="--net user"):
        NetOptions("tap", (PortForward(1, 2),))
    with pytest.raises(ConfigError, match="--net must be"):
        NetOptions("bridge")
    with pytest.raises(ConfigError, match="twice"):
        NetOptions("user", (PortForward(8080, 80), PortForward(8080, 81)))


def test_user_plan_forwards_loopback_only() -> None:
    plan = plan_network(NetOptions("user", (PortForward(2222, 22), PortForward(8080, 80))))
    assert plan is not None and plan.namespace is None
    args = plan.qemu_args(None)
    assert args == ("-netdev", "user,id=net0,net=10.0.2.0/24,host=10.0.2.2,"
                    "hostfwd=tcp:127.0.0.1:2222-:22,hostfwd=tcp:127.0.0.1:8080-:80",
                    "-device", "virtio-net-pci,netdev=net0")
    assert plan.kernel_param() == "mktme.net=10.0.2.15/24,10.0.2.2"
    assert plan_network(NetOptions()) is None


def test_tap_plan_names_a_namespace_owned_by_this_process() -> None:
    plan = plan_network(NetOptions("tap"))
    assert plan is not None and plan.namespace is not None
    assert plan.namespace.startswith(f"{NS_PREFIX}{os.getpid()}-")
    assert owner_alive(plan.namespace) is True
    assert plan.qemu_args(7)[:2] == ("-netdev", "tap,id=net0,fd=7")
    assert plan.kernel_param() == f"mktme.net={TAP_GUEST}/30,{TAP_HOST}"
    assert f"ip netns exec {plan.namespace}" in plan.describe()


# -- which namespaces are stale ---------------------------------------------------------

def test_stale_means_owner_gone_or_pid_reused(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, {100: 5000, 200: 7000})
    alive = namespace_name(100, proc)
    reused = f"{NS_PREFIX}200-6000-abcd"  # pid 200 now belongs to a later process
    gone = f"{NS_PREFIX}300-1234-abcd"
    foreign = ["mktme-emu-notours", "other-ns", f"{NS_PREFIX}300-x-abcd"]
    assert alive.startswith(f"{NS_PREFIX}100-5000-")
    assert stale_namespaces([alive, reused, gone, *foreign], proc) == sorted([reused, gone])
    assert [owner_alive(n, proc) for n in foreign] == [None, None, None]


def test_process_start_reads_field_22_of_a_real_process() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        start = process_start(child.pid)
        assert start is not None and start >= (process_start(os.getpid()) or 0)
    finally:
        child.kill()
        child.wait()
    assert process_start(child.pid) is None


# -- the CLI ---------------------------------------------------------------------------

def run_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mktme_emu.cli.main", *argv], text=True,
                          capture_output=True, timeout=120, check=False)


def main_as_nobody(*argv: str) -> tuple[int, str]:
    """The CLI's main() in a forked child that dropped root: (exit status, stderr).

    Forked rather than exec'd: the interpreter may live where nobody cannot read.
    """
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 99
        try:
            from mktme_emu.cli.main import main  # imported first: nobody may not read the stdlib

            os.close(read)
            sys.stderr = os.fdopen(write, "w")  # pytest's capture replaced the original
            os.setgid(65534)
            os.setuid(65534)
            code = main(list(argv))
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as stderr:
        err = stderr.read()
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), err


def test_dry_run_shows_the_network_and_creates_nothing() -> None:
    before = namespaces()
    tap = run_cli("run", "--dry-run", "--plain", "--accel", "tcg", "--net", "tap", "--", "true")
    assert tap.returncode == 0, tap.stderr
    argv = shlex.split(tap.stdout)
    assert argv[argv.index("-netdev") + 1] == "tap,id=net0,fd=TAPFD"
    assert "virtio-net-pci,netdev=net0" in argv
    assert "would create namespace mktme-emu-" in tap.stderr
    assert namespaces() == before
    user = run_cli("run", "--dry-run", "--plain", "--accel", "tcg", "--net", "user",
                   "--hostfwd", "2222:22", "--", "true")
    assert "hostfwd=tcp:127.0.0.1:2222-:22" in user.stdout
    assert "mktme.net=10.0.2.15/24,10.0.2.2" in user.stdout


def test_bad_net_options_are_one_line_errors() -> None:
    result = run_cli("run", "--net", "tap", "--hostfwd", "80:80", "--", "true")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "mktme-emu: --hostfwd needs --net user (with --net tap, use the namespace)"]


@root_only
def test_tap_without_root_is_one_clear_line() -> None:
    before = namespaces()
    code, err = main_as_nobody("run", "--plain", "--accel", "tcg", "--net", "tap", "--", "true")
    assert code == 1
    assert err.startswith("mktme-emu: --net tap needs root") and "--net user" in err
    assert len(err.strip().splitlines()) == 1
    assert namespaces() == before


# -- namespace lifecycle (root, no guest) ------------------------------------------------

@pytest.fixture
def dead_owner_namespace() -> Iterator[str]:
    """A namespace named for a process that has exited, as a SIGKILLed run leaves it."""
    from pyroute2 import netns

    child = subprocess.Popen(["true"])
    child.wait()
    name = f"{NS_PREFIX}{child.pid}-1-dead"
    netns.create(name)
    try:
        yield name
    finally:
        if name in namespaces():
            netns.remove(name)


def tap_state(namespace: str) -> list[tuple[str, str, int]]:
    """(ifname, address, prefix) of every IPv4 address inside ``namespace``."""
    from pyroute2 import IPRoute

    with IPRoute(netns=namespace, flags=0) as ipr:
        names = {link["index"]: link.get("ifname") for link in ipr.get_links()}
        return sorted((names[a["index"]], a.get("address"), a["prefixlen"])
                      for a in ipr.get_addr(family=2))


@root_only
def test_namespace_and_tap_live_exactly_as_long_as_the_run() -> None:
    plan = plan_network(NetOptions("tap"))
    assert plan is not None and plan.namespace is not None
    lines: list[str] = []
    with pytest.raises(KeyboardInterrupt), open_network(plan, lines.append) as fd:
        assert fd is not None and os.readlink(f"/proc/self/fd/{fd}") == "/dev/net/tun"
        assert plan.namespace in namespaces()
        assert tap_state(plan.namespace) == [("lo", "127.0.0.1", 8), ("mktap0", TAP_HOST, 30)]
        raise KeyboardInterrupt  # Ctrl-C in the middle of the run
    assert plan.namespace not in namespaces()
    assert any(f"ip netns exec {plan.namespace}" in line for line in lines)
    with pytest.raises(OSError):
        os.fstat(fd)  # closed


@root_only
def test_next_tap_run_removes_a_killed_runs_namespace(dead_owner_namespace: str) -> None:
    plan = plan_network(NetOptions("tap"))
    lines: list[str] = []
    with open_network(plan, lines.append):
        assert dead_owner_namespace not in namespaces()
    assert f"net: removed namespace {dead_owner_namespace} left by a run that is gone" in lines


@root_only
def test_net_clean_removes_dead_owners_and_keeps_live_ones(dead_owner_namespace: str) -> None:
    from pyroute2 import netns

    live = namespace_name()  # owned by this (running) test process
    netns.create(live)
    try:
        result = run_cli("net", "clean", "--json")
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert dead_owner_namespace in report["removed"] and live in report["running"]
        assert dead_owner_namespace not in namespaces() and live in namespaces()
    finally:
        netns.remove(live)
