"""Guest networking with real guests: a server in the guest answers the host (TCG, ~15 s each).

Traffic goes only where the run made room for it: the forwarded port on the
host's 127.0.0.1 (``--net user``), or from inside the run's own namespace
(``--net tap``).  Every client loop is bounded in tries and time.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
from mktme_emu.vm.boot import LaunchOptions, launch
from mktme_emu.vm.kernel import cache_dir, load_kernel
from mktme_emu.vm.launcher import RunRequest, VmResult
from mktme_emu.vm.net import NETNS_DIR, NS_PREFIX, TAP_GUEST, TAP_HOST, NetOptions, PortForward

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(load_kernel(cache_dir()) is None,
                       reason="no guest kernel: run `mktme-emu kernel fetch`"),
]
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="--net tap needs root")

GUEST_PORT = 7777  # inside the guest: its own network stack, shared with nobody
#: Serves one connection: answers with the guest's own address and the peer's, then exits.
SERVER = ("import socket, sys\n"
          "s = socket.create_server(('0.0.0.0', int(sys.argv[1])))\n"
          "c, peer = s.accept()\n"
          "c.sendall(f'{c.getsockname()[0]} {peer[0]}\\n'.encode())\n"
          "c.close()\n")
SERVE = ("python3", "-c", SERVER, str(GUEST_PORT))


def namespaces() -> set[str]:
    return {p.name for p in NETNS_DIR.iterdir()} if NETNS_DIR.is_dir() else set()


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ask(connect: Callable[[], socket.socket], seconds: float = 150.0) -> str:
    """The guest server's answer: retry (bounded) until it listens, then read to EOF."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with connect() as sock:
                sock.settimeout(10)
                answer = b""
                while chunk := sock.recv(256):
                    answer += chunk
            if answer:  # slirp accepts before the guest listens, then closes empty
                return answer.decode()
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"the guest server did not answer within {seconds:.0f} s")


def in_namespace(namespace: str, address: str, port: int) -> Callable[[], socket.socket]:
    """A connector whose socket is made inside ``namespace`` (never creating it)."""
    from pyroute2 import netns

    def connect() -> socket.socket:
        sock = netns.create_socket(namespace, flags=0)
        sock.settimeout(5)
        sock.connect((address, port))
        return sock
    return connect


def run_in_thread(opts: LaunchOptions, command: tuple[str, ...]) -> Future[VmResult]:
    pool = ThreadPoolExecutor(1)
    future = pool.submit(launch, opts, RunRequest(command=command, timeout=240, boot_timeout=120))
    pool.shutdown(wait=False)
    return future


def test_user_mode_server_answers_on_the_forwarded_loopback_port() -> None:
    port = free_loopback_port()
    opts = LaunchOptions(nvdimm_size=64 << 20,
                         net=NetOptions("user", (PortForward(port, GUEST_PORT),)))
    run = run_in_thread(opts, SERVE)
    answer = ask(lambda: socket.create_connection(("127.0.0.1", port), timeout=5))
    result = run.result(timeout=240)
    assert answer.split() == ["10.0.2.15", "10.0.2.2"]  # guest address; slirp's host side
    assert result.exit_code == 0


@root_only
def test_tap_guest_is_reached_from_the_namespace_and_everything_goes_after() -> None:
    before = namespaces()
    run = run_in_thread(LaunchOptions(nvdimm_size=64 << 20, net=NetOptions("tap")), SERVE)
    ours = f"{NS_PREFIX}{os.getpid()}-"
    deadline = time.monotonic() + 60
    while not (mine := [n for n in namespaces() - before if n.startswith(ours)]):
        assert time.monotonic() < deadline and not run.done(), "no namespace appeared"
        time.sleep(0.1)
    answer = ask(in_namespace(mine[0], TAP_GUEST, GUEST_PORT))
    result = run.result(timeout=240)
    assert answer.split() == [TAP_GUEST, TAP_HOST]
    assert result.exit_code == 0
    assert namespaces() == before
    assert host_has_no_trace()


def host_has_no_trace() -> bool:
    """No tap and no address of the run in the host's own namespace."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        links = [link.get("ifname") for link in ipr.get_links()]
        addresses = [a.get("address") for a in ipr.get_addr()]
    return "mktap0" not in links and TAP_HOST not in addresses and TAP_GUEST not in addresses


@root_only
def test_sigkilled_tap_run_leaves_only_a_namespace_that_net_clean_removes() -> None:
    cli = [sys.executable, "-m", "mktme_emu.cli.main"]
    child = subprocess.Popen([*cli, "run", "--plain", "--net", "tap", "--timeout", "300",
                              "--nvdimm-size", "64M", "--", "sh", "-c",
                              'python3 -c "$0" "$1" && sleep 300', SERVER, str(GUEST_PORT)],
                             start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (mine := [n for n in namespaces() if n.startswith(f"{NS_PREFIX}{child.pid}-")]):
            assert time.monotonic() < deadline and child.poll() is None, "no namespace appeared"
            time.sleep(0.1)
        assert ask(in_namespace(mine[0], TAP_GUEST, GUEST_PORT)).split() == [TAP_GUEST, TAP_HOST]
    finally:
        os.killpg(child.pid, signal.SIGKILL)  # the run and its QEMU, with no chance to clean
        child.wait()
    assert mine[0] in namespaces()  # what a killed run leaves
    clean = subprocess.run([*cli, "net", "clean", "--json"], capture_output=True, text=True,
                           timeout=60, check=False)
    assert clean.returncode == 0, clean.stderr
    assert mine[0] in json.loads(clean.stdout)["removed"]
    assert mine[0] not in namespaces()
    assert host_has_no_trace()


@root_only
def test_ctrl_c_during_a_tap_run_removes_its_namespace() -> None:
    child = subprocess.Popen(
        [sys.executable, "-m", "mktme_emu.cli.main", "run", "--plain", "--net", "tap",
         "--nvdimm-size", "64M", "--timeout", "300", "--", "sleep", "300"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal's
    assert child.stderr is not None
    try:
        # Its last line before QEMU starts; a dead child ends the loop with "".
        while "QMP monitor" not in (line := child.stderr.readline()):
            assert line, "the run ended before starting QEMU"
        mine = [n for n in namespaces() if n.startswith(f"{NS_PREFIX}{child.pid}-")]
        assert len(mine) == 1
        time.sleep(2)  # QEMU is booting the guest
        os.killpg(child.pid, signal.SIGINT)  # Ctrl-C: the run and its QEMU both get it
        assert child.wait(timeout=60) == 130
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
        child.stderr.close()
    assert mine[0] not in namespaces()
    assert host_has_no_trace()
