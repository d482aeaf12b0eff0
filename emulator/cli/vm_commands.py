"""The VM commands: ``kernel fetch``, ``boot``, ``run``, ``monitor`` (SPEC section 5).

Thin: parse -> :class:`LaunchOptions` / :class:`RunRequest` -> ``mktme_emu.vm``.
The NVDIMMs are emulated MKTME ones (``mktme-emu serve`` processes) unless
``--plain`` asks for QEMU's own.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from mktme_emu.controller import default_view_path
from mktme_emu.errors import ConfigError
from mktme_emu.keytable import DEFAULT_KEYID_BITS
from mktme_emu.vm.boot import (
    NS_MODES,
    LaunchOptions,
    dry_run_argv,
    launch,
    plain_backends,
    runtime_root,
)
from mktme_emu.vm.emulated import EmulatedNvdimm, EmulatorOptions
from mktme_emu.vm.kernel import cache_dir, fetch_kernel
from mktme_emu.vm.launcher import NvdimmBackend, RunRequest
from mktme_emu.vm.net import NET_MODES, NetOptions, PortForward, require_root
from mktme_emu.vm.qemu import NvdimmSpec, format_argv

from .args import size
from .net_commands import add_net_commands


def nvdimm_backends(opts: LaunchOptions, args: argparse.Namespace) -> list[NvdimmBackend]:
    """The NVDIMMs of boot/run: emulated MKTME ones (default), or plain ones with --plain.

    The caller closes them.  With several NVDIMMs and --state-dir, each gets
    a subdirectory ``nvdimmN``.
    """
    if args.plain:
        return list(plain_backends(opts))
    backends: list[NvdimmBackend] = []
    try:
        for index in range(opts.nvdimm_count):
            backends.append(EmulatedNvdimm(_emulator_options(args, index), index))
    except BaseException:
        for backend in backends:
            backend.close()
        raise
    return backends


def _emulator_options(args: argparse.Namespace, index: int) -> EmulatorOptions:
    state = Path(args.state_dir) if args.state_dir else None
    if state is not None and args.nvdimms > 1:
        state = state / f"nvdimm{index}"
    attach = Path(args.attach) if args.attach and index == 0 else None
    if args.attach and args.nvdimms > 1:
        raise ConfigError("--attach serves one NVDIMM; use --nvdimms 1")
    return EmulatorOptions(state_dir=state, size=args.nvdimm_size, label_size=args.label_size,
                           tme=args.tme, tweak=args.tweak, unit=args.unit,
                           keyid_bits=args.keyid_bits, attach_socket=attach, keep=args.keep)


def _progress(message: str) -> None:
    print(f"mktme-emu: {message}", file=sys.stderr, flush=True)


def _add_vm_options(p: argparse.ArgumentParser, with_command: bool) -> None:
    """The options boot and run share (run adds its command)."""
    p.add_argument("--profile", default="default", help="qemu-configs/NAME.cfg or a .cfg path")
    p.add_argument("--accel", default="auto", choices=("auto", "kvm", "tcg"),
                   help="auto probes KVM with a short timeout and falls back to TCG")
    p.add_argument("--memory", type=size, help="guest RAM (default: the profile's)")
    p.add_argument("--cpus", type=int,
                   help="guest CPUs (default: the profile's with KVM, 1 under TCG, where a "
                   "second one slows the boot)")
    p.add_argument("--nvdimm-size", type=size, default=256 << 20, help="data area (default 256M)")
    p.add_argument("--label-size", type=size, default=0, help="NVDIMM label area (0 = none)")
    p.add_argument("--nvdimms", type=int, default=1, help="how many NVDIMMs (default 1)")
    p.add_argument("--ns", choices=NS_MODES,
                   help="put every NVDIMM namespace in this mode at boot (default: leave it "
                   "as the DIMM has it, raw when new; fsdax for mount -o dax)")
    p.add_argument("--rwdir", action="append", default=[], metavar="DIR",
                   help="make host directory DIR writable from the guest, at the same path "
                   "(repeatable); elsewhere the host's files are read-only, and /tmp, "
                   "/var/tmp take writes in guest memory")
    p.add_argument("--gdb", type=int, nargs="?", const=1234, default=None, metavar="PORT",
                   help="start a gdbstub on 127.0.0.1:PORT (default 1234) and boot with "
                   "nokaslr; prints the gdb command line")
    p.add_argument("--kernel", type=Path, metavar="PATH",
                   help="boot your own kernel: a bzImage/vmlinuz or a kernel build tree "
                   "(default: Debian's, from the cache); its config is checked first")
    p.add_argument("--modules", type=Path, metavar="DIR",
                   help="the kernel's modules: an INSTALL_MOD_PATH tree or a modules directory "
                   "(default: the build tree's own .ko files)")
    p.add_argument("--append", action="append", default=[], metavar="ARGS",
                   help="add ARGS to the kernel command line (repeatable)")
    p.add_argument("--qemu-arg", action="append", default=[], metavar="ARG",
                   help="extra QEMU argument (repeat for each word)")
    p.add_argument("--cache", help="kernel/initramfs cache (default $MKTME_EMU_CACHE or XDG)")
    p.add_argument("--keep", action="store_true", help="keep the run directory (console.log)")
    p.add_argument("--dry-run", action="store_true", help="print the QEMU command line and exit")
    p.add_argument("--net", choices=NET_MODES, default="none", help="guest network: user (QEMU "
                   "user-mode, no privileges) or tap (root: a namespace of the run's own)")
    p.add_argument("--hostfwd", action="append", default=[], metavar="HOSTPORT:GUESTPORT",
                   help="with --net user: forward 127.0.0.1:HOSTPORT to the guest (repeatable)")
    p.add_argument("--timeout", type=float, default=None, help="seconds for the whole run")
    p.add_argument("--boot-timeout", type=float, default=60.0,
                   help="seconds until the command starts (default 60)")
    emu = p.add_argument_group("emulated NVDIMM (mktme-emu serve)")
    emu.add_argument("--state-dir", help="keep the media here (default: a temporary directory); "
                     "a second run on it is a power cycle of the same DIMM")
    emu.add_argument("--attach", metavar="SOCKET", help="use a running backend's control socket")
    emu.add_argument("--tme", choices=("bypass", "ephemeral", "retained"), help="KeyID 0 policy")
    emu.add_argument("--tweak", choices=("spa", "dpa", "logical", "dun"),
                     help="tweak mode (spa; dun needs --unit 4096)")
    emu.add_argument("--unit", type=size, help="XTS data unit in bytes (64)")
    emu.add_argument("--keyid-bits", type=int,
                     help=f"KeyID bits (default {DEFAULT_KEYID_BITS}: user KeyIDs "
                     f"1..{(1 << DEFAULT_KEYID_BITS) - 1}, i.e. 1..2^bits-1; 0 is TME's)")
    emu.add_argument("--plain", action="store_true",
                     help="a plain QEMU NVDIMM with no emulator (the performance reference)")
    if with_command:
        p.add_argument("command", nargs=argparse.REMAINDER,
                       help="-- CMD ARGS... to run in the guest")


def launch_options(args: argparse.Namespace) -> LaunchOptions:
    """The validated, frozen options of boot/run."""
    return LaunchOptions(
        profile=args.profile, accel=args.accel, memory=args.memory, cpus=args.cpus,
        nvdimm_size=args.nvdimm_size, label_size=args.label_size, nvdimm_count=args.nvdimms,
        ns_mode=args.ns, gdb=args.gdb, extra_args=tuple(args.qemu_arg),
        kernel=args.kernel, modules=args.modules, append=_append_words(args.append),
        cache=Path(args.cache) if args.cache else None, keep=args.keep,
        rwdirs=tuple(Path(d).absolute() for d in args.rwdir),
        net=NetOptions(args.net, tuple(PortForward.parse(f) for f in args.hostfwd)))


def _append_words(values: list[str]) -> tuple[str, ...]:
    """--append values as given: the kernel, not a shell, parses its command line."""
    for value in values:
        if "\n" in value or "\0" in value:
            raise ConfigError("--append: the kernel command line is one line")
    return tuple(v.strip() for v in values if v.strip())


def _command(args: argparse.Namespace) -> tuple[str, ...]:
    """run's -- CMD ARGS (boot has none: args.command is then the subcommand's name)."""
    if args.func is not cmd_run:
        return ()
    words = list(args.command)
    if words[:1] == ["--"]:
        words = words[1:]
    return tuple(words)


def _dry_run_specs(opts: LaunchOptions, args: argparse.Namespace) -> list[NvdimmSpec]:
    """The NVDIMMs as QEMU would see them, without starting or creating anything."""
    specs = []
    for index in range(opts.nvdimm_count):
        if args.plain:
            specs.append(NvdimmSpec(Path(f"/dev/shm/<plain view {index}>"), opts.nvdimm_size,
                                    opts.label_size))
            continue
        state = _emulator_options(args, index).state_dir
        if state is None:  # a temporary one, made at launch
            state = Path(tempfile.gettempdir()) / f"mktme-nvdimm{index}-<made at launch>"
            view = Path(f"/dev/shm/<view of nvdimm{index}>")
        else:
            view = default_view_path(state.absolute())
        specs.append(NvdimmSpec(view, opts.nvdimm_size, opts.label_size, state / "guest.sock"))
    return specs


class _Interrupted(BaseException):
    """SIGINT/SIGTERM/SIGHUP while backends start: unwind, so they are stopped."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _signals_unwind() -> Iterator[list[int]]:
    """Turn the first SIGINT/SIGTERM/SIGHUP into :class:`_Interrupted`.

    Yields a list the caller appends to once cleanup must not be interrupted
    (later signals are then only recorded).  While the VM runs, the launcher
    handles these signals itself and ends the run in order.
    """
    seen: list[int] = []
    cleaning: list[int] = []

    def handler(signum: int, _: FrameType | None) -> None:
        seen.append(signum)
        if len(seen) == 1 and not cleaning:
            raise _Interrupted(signum)

    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    saved = {sig: signal.signal(sig, handler) for sig in sigs}
    try:
        yield cleaning
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)


def _launch(args: argparse.Namespace, interactive: bool) -> int:
    opts = launch_options(args)
    command = _command(args)
    if not interactive and not command:
        raise ConfigError("run needs a command: mktme-emu run [options] -- CMD ...")
    if args.dry_run:
        print(format_argv(dry_run_argv(opts, _dry_run_specs(opts, args), interactive,
                                       _progress)))
        return 0
    if opts.net.mode == "tap":  # refused before anything starts, in one line
        require_root("--net tap", "; without root use --net user")
    request = RunRequest(command=command, cwd=os.getcwd(), interactive=interactive,
                         timeout=args.timeout, boot_timeout=args.boot_timeout)
    try:
        with _signals_unwind() as cleaning:
            backends = nvdimm_backends(opts, args)
            try:
                result = launch(opts, request, backends, _progress)
            finally:
                cleaning.append(1)
                for backend in backends:
                    backend.close()
    except _Interrupted as stop:
        _progress(f"stopped by {signal.Signals(stop.signum).name}")
        return 128 + stop.signum
    if result.status is None or result.interrupted is not None:
        _progress(result.describe())
    if result.failed:
        tail = result.console_tail.replace("\r\n", "\n")[-2000:]
        print(f"--- console tail ---\n{tail}\n---", file=sys.stderr)
    return result.exit_code


def cmd_boot(args: argparse.Namespace) -> int:
    """Interactive VM: the guest console on this terminal (Ctrl-A X quits QEMU)."""
    if not args.dry_run:
        _progress("console on this terminal; Ctrl-A X quits, Ctrl-A C toggles the HMP monitor")
    return _launch(args, interactive=True)


def cmd_run(args: argparse.Namespace) -> int:
    """Boot, run CMD, exit with its status (255 panic, 254 boot failure, 253 timeout)."""
    return _launch(args, interactive=False)


def cmd_kernel_fetch(args: argparse.Namespace) -> int:
    kernel = fetch_kernel(cache_dir(args.cache), package=args.package, force=args.force,
                          progress=_progress)
    print(f"{kernel.release} {kernel.vmlinuz}")
    return 0


def _newest_monitor() -> Path:
    sockets = sorted(runtime_root().glob("vm-*/monitor.sock"), key=lambda p: p.stat().st_mtime)
    if not sockets:
        raise ConfigError(f"no running VM found under {runtime_root()} (use --socket)")
    return sockets[-1]


def cmd_monitor(args: argparse.Namespace) -> int:
    """qemu.qmp's qmp-shell on a running VM's monitor socket."""
    socket = Path(args.socket) if args.socket else _newest_monitor()
    shell = Path(sys.executable).parent / "qmp-shell"
    argv = [str(shell)] if shell.exists() else \
        [sys.executable, "-c", "from qemu.qmp.qmp_shell import main; main()"]
    return subprocess.run([*argv, str(socket)], check=False).returncode


def add_vm_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register kernel/boot/run/monitor on the top-level subparsers."""
    kernel = subparsers.add_parser("kernel", help="the guest kernel (Debian linux-image)")
    ksub = kernel.add_subparsers(dest="kernel_command", metavar="ACTION", required=True)
    fetch = ksub.add_parser("fetch", help="download and unpack the guest kernel into the cache")
    fetch.add_argument("--cache", help="cache directory (default $MKTME_EMU_CACHE or XDG)")
    fetch.add_argument("--package", help="linux-image package (default: linux-image-amd64's)")
    fetch.add_argument("--force", action="store_true", help="fetch again even if cached")
    fetch.set_defaults(func=cmd_kernel_fetch)

    boot = subparsers.add_parser(
        "boot", help="boot a VM with an interactive console",
        description="Boot a VM with its console on this terminal. Leaving it (exit, poweroff, "
        "Ctrl-A X) ends with status 0; 255 = guest kernel panic, 254 = init failed.")
    _add_vm_options(boot, with_command=False)
    boot.set_defaults(func=cmd_boot)
    run = subparsers.add_parser(
        "run", help="boot, run -- CMD in the guest, exit with its status",
        description="Boot a VM, run CMD in the host's working directory, exit with CMD's "
        "status; 255 = guest kernel panic, 254 = CMD never started, 253 = --timeout, "
        "128+N = stopped by signal N.")
    _add_vm_options(run, with_command=True)
    run.set_defaults(func=cmd_run)

    add_net_commands(subparsers)
    monitor = subparsers.add_parser("monitor", help="QMP shell on a running VM")
    monitor.add_argument("--socket", help="monitor socket (default: the newest running VM's)")
    monitor.set_defaults(func=cmd_monitor)
