"""Guest networking for the test VMs: QEMU user-mode, or a tap in a namespace of the run's own.

The two kinds test-VM runners offer (virtme-ng's ``--network user|bridge``):

``user`` (no privileges): QEMU's user-mode stack (slirp).  The guest is
10.0.2.15/24 behind 10.0.2.2; ``--hostfwd H:G`` forwards TCP port H on the
host's 127.0.0.1 (never another address) to guest port G.

``tap`` (root): the run creates a network namespace of its own and, in it, a
tap with the host side of a /30 (10.213.0.1, the guest is 10.213.0.2).  Since
the namespace is the run's alone, the addresses collide with nothing, and the
guest reaches nothing but the namespace.  QEMU itself stays in the host's
namespace (its QMP, gdb and 9p are host-side things); it gets the tap as an
open file (``-netdev tap,fd=N``): a short-lived thread ``setns()``\\s into the
namespace, opens /dev/net/tun there, attaches to the tap and clears its
persist flag, so the tap lives exactly as long as an fd on it does.

What a killed run leaves: only the namespace's name in /run/netns (the tap
dies with the last fd).  Names carry the owner's pid and start time, so the
next tap run and ``mktme-emu net clean`` remove exactly the namespaces whose
owner is gone, even when the pid has been reused meanwhile.

pyroute2 is imported here only, and only when a tap is made or cleaned: the
rest of the project never needs it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mktme_emu.errors import ConfigError, MktmeError, VmError

NET_MODES = ("none", "user", "tap")
NS_PREFIX = "mktme-emu-"
NETNS_DIR = Path("/run/netns")
TAP_NAME = "mktap0"  # fixed: it lives in the run's own namespace
TAP_HOST, TAP_GUEST, TAP_PREFIX = "10.213.0.1", "10.213.0.2", 30
USER_GUEST, USER_GATEWAY, USER_NET = "10.0.2.15", "10.0.2.2", "10.0.2.0/24"
#: virtio_net pulls in net_failover and failover (resolved from .modinfo).
GUEST_NET_MODULES = ("virtio_net",)
TAP_FD_PLACEHOLDER = "TAPFD"  # what --dry-run shows for the fd QEMU would get
_NS_NAME = re.compile(rf"^{re.escape(NS_PREFIX)}(\d+)-(\d+)-[0-9a-f]+$")
Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    """Default progress sink."""


@dataclass(frozen=True)
class PortForward:
    """``--hostfwd HOST:GUEST``: TCP port HOST on the host's 127.0.0.1 -> guest port GUEST."""

    host_port: int
    guest_port: int

    def __post_init__(self) -> None:
        for port in (self.host_port, self.guest_port):
            if not 1 <= port <= 65535:
                raise ConfigError(f"--hostfwd port {port} is not in 1..65535")

    @classmethod
    def parse(cls, text: str) -> PortForward:
        host, sep, guest = text.partition(":")
        if not (sep and host.isdigit() and guest.isdigit()):
            raise ConfigError(f"--hostfwd {text!r}: use HOSTPORT:GUESTPORT, e.g. 8080:80")
        return cls(int(host), int(guest))


@dataclass(frozen=True)
class NetOptions:
    """The validated network options of `boot` and `run`."""

    mode: str = "none"  # none | user | tap
    forwards: tuple[PortForward, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in NET_MODES:
            raise ConfigError(f"--net must be one of {', '.join(NET_MODES)}, not {self.mode!r}")
        if self.forwards and self.mode != "user":
            raise ConfigError("--hostfwd needs --net user (with --net tap, use the namespace)")
        ports = [f.host_port for f in self.forwards]
        if len(set(ports)) != len(ports):
            raise ConfigError("--hostfwd: a host port is given twice")


@dataclass(frozen=True)
class NetPlan:
    """One run's network, fixed before anything exists, so --dry-run can show all of it."""

    mode: str  # user | tap
    guest_address: str
    prefix: int
    gateway: str
    forwards: tuple[PortForward, ...] = ()
    namespace: str | None = None  # tap: the namespace the run creates
    tap: str | None = None

    def kernel_param(self) -> str:
        """What init.sh reads to configure the guest's interface statically (no DHCP)."""
        return f"mktme.net={self.guest_address}/{self.prefix},{self.gateway}"

    def qemu_args(self, tap_fd: int | None) -> tuple[str, ...]:
        """-netdev/-device for QEMU; ``tap_fd`` is the fd QEMU inherits (tap only)."""
        if self.mode == "user":
            fwd = "".join(f",hostfwd=tcp:127.0.0.1:{f.host_port}-:{f.guest_port}"
                          for f in self.forwards)
            netdev = f"user,id=net0,net={USER_NET},host={self.gateway}{fwd}"
        else:
            netdev = f"tap,id=net0,fd={TAP_FD_PLACEHOLDER if tap_fd is None else tap_fd}"
        return ("-netdev", netdev, "-device", "virtio-net-pci,netdev=net0")

    def describe(self) -> str:
        """One line: the guest's address and how to reach it."""
        if self.mode == "user":
            fwd = ", ".join(f"127.0.0.1:{f.host_port} -> guest:{f.guest_port}"
                            for f in self.forwards)
            return f"net: user-mode, guest {self.guest_address}" + (f"; {fwd}" if fwd else "")
        return (f"net: guest {self.guest_address} in namespace {self.namespace} (host side "
                f"{self.gateway}/{self.prefix} on tap {self.tap}); reach it from there, e.g. "
                f"ip netns exec {self.namespace} ping {self.guest_address}")


    def dry_run_line(self) -> str:
        """What --dry-run says the run would create besides the QEMU argv (nothing here)."""
        if self.mode == "user":
            return self.describe() + " (QEMU's user-mode stack: nothing is created on the host)"
        return (f"net: would create namespace {self.namespace} with tap {self.tap} "
                f"{self.gateway}/{self.prefix} (guest {self.guest_address}); "
                f"{TAP_FD_PLACEHOLDER} is the fd QEMU would get on it")


def process_start(pid: int, proc: Path = Path("/proc")) -> int | None:
    """A process's start time (clock ticks since boot, /proc/PID/stat field 22), None if gone.

    Pid plus start time names a process for good: a reused pid starts later.
    """
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    return int(stat.rpartition(")")[2].split()[19])


def namespace_name(pid: int | None = None, proc: Path = Path("/proc")) -> str:
    """A fresh namespace name owned by ``pid`` (default: this process)."""
    pid = os.getpid() if pid is None else pid
    return f"{NS_PREFIX}{pid}-{process_start(pid, proc) or 0}-{secrets.token_hex(2)}"


def owner_alive(name: str, proc: Path = Path("/proc")) -> bool | None:
    """Is the run that made namespace ``name`` still running?  None: not one of ours."""
    match = _NS_NAME.match(name)
    if match is None:
        return None
    pid, start = int(match.group(1)), int(match.group(2))
    return process_start(pid, proc) == start


def stale_namespaces(names: Iterable[str], proc: Path = Path("/proc")) -> list[str]:
    """Those of ``names`` that a run made and whose run is gone (others are left alone)."""
    return sorted(n for n in names if owner_alive(n, proc) is False)


def plan_network(opts: NetOptions, pid: int | None = None) -> NetPlan | None:
    """The network of one run (None for --net none); creates nothing."""
    if opts.mode == "none":
        return None
    if opts.mode == "user":
        return NetPlan("user", USER_GUEST, 24, USER_GATEWAY, opts.forwards)
    return NetPlan("tap", TAP_GUEST, TAP_PREFIX, TAP_HOST,
                   namespace=namespace_name(pid), tap=TAP_NAME)


def _pyroute2() -> Any:
    """pyroute2, imported only here, with a one-line error when it is missing."""
    try:
        import pyroute2
        import pyroute2.netns
    except ImportError as exc:
        raise VmError("--net tap needs pyroute2: pip install pyroute2") from exc
    return pyroute2


def require_root(what: str, advice: str = "") -> None:
    """One clear line for non-root users: what needs root, and what to do instead."""
    if os.geteuid() != 0:
        raise ConfigError(f"{what} needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN, for network "
                          f"namespaces and tap devices){advice}")


def clean_stale(netns_dir: Path = NETNS_DIR, proc: Path = Path("/proc")) -> list[str]:
    """Remove the namespaces of runs that are gone; return their names.

    Blocks on a few netlink/mount calls; raises ConfigError when not root.
    """
    names = [p.name for p in netns_dir.iterdir()] if netns_dir.is_dir() else []
    stale = stale_namespaces(names, proc)
    if stale:
        require_root(f"removing {len(stale)} namespace(s) left by killed tap runs")
        netns = _pyroute2().netns
        for name in stale:
            with contextlib.suppress(FileNotFoundError):
                netns.remove(name)
    return stale


def _create_namespace(plan: NetPlan) -> None:
    """The namespace with lo up and the tap (host side address, up) in it."""
    pyroute2 = _pyroute2()
    assert plan.namespace and plan.tap
    pyroute2.netns.create(plan.namespace)
    with pyroute2.IPRoute(netns=plan.namespace, flags=0) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        ipr.link("add", ifname=plan.tap, kind="tuntap", mode="tap")
        index = ipr.link_lookup(ifname=plan.tap)[0]
        ipr.addr("add", index=index, address=plan.gateway, prefixlen=plan.prefix)
        ipr.link("set", index=index, state="up")


def _open_tap(namespace: str, tap: str) -> int:
    """An fd on ``tap`` (inside ``namespace``), from a thread that enters the namespace.

    setns() changes only the calling thread, and that thread ends right after:
    the rest of this process never leaves the host's namespace.  Clearing the
    persist flag ties the tap's life to its fds (ours and QEMU's copy).
    """
    from pyroute2.netlink.rtnl.ifinfmsg import IFT_NO_PI, IFT_TAP, IFT_VNET_HDR
    from pyroute2.netlink.rtnl.ifinfmsg.tuntap import TUNSETIFF, TUNSETPERSIST

    netns = _pyroute2().netns
    fds: list[int] = []
    errors: list[BaseException] = []

    def attach() -> None:
        try:
            netns.setns(namespace, flags=0)
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
            fds.append(fd)
            ifr = struct.pack("16sH", tap.encode(), IFT_TAP | IFT_NO_PI | IFT_VNET_HDR)
            fcntl.ioctl(fd, TUNSETIFF, ifr)
            fcntl.ioctl(fd, TUNSETPERSIST, 0)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=attach, name="mktme-net-tap")
    thread.start()
    thread.join()
    if errors:
        for fd in fds:
            os.close(fd)
        raise VmError(f"cannot open tap {tap} in namespace {namespace}: {errors[0]}")
    return fds[0]


def _remove_namespace(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        _pyroute2().netns.remove(name)


@contextlib.contextmanager
def open_network(plan: NetPlan | None, progress: Progress = _quiet) -> Iterator[int | None]:
    """Create what ``plan`` needs for the run; yield the tap fd QEMU gets (None: no tap).

    For tap: first removes namespaces left by killed runs, then creates this
    run's; removes it on the way out, whatever ends the run (Ctrl-C included).
    Raises ConfigError when not root, VmError when netlink refuses.
    """
    if plan is None or plan.mode != "tap":
        if plan is not None:
            progress(plan.describe())
        yield None
        return
    assert plan.namespace and plan.tap
    require_root("--net tap", "; without root use --net user")
    for name in clean_stale():
        progress(f"net: removed namespace {name} left by a run that is gone")
    fd: int | None = None
    try:
        try:
            _create_namespace(plan)
            fd = _open_tap(plan.namespace, plan.tap)
        except MktmeError:
            raise
        except Exception as exc:  # OSError from mount/ioctl, NetlinkError from netlink
            raise VmError(f"cannot set up network namespace {plan.namespace}: {exc}") from exc
        progress(plan.describe())
        yield fd
    finally:
        if fd is not None:
            os.close(fd)
        _remove_namespace(plan.namespace)
