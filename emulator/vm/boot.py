"""Options -> a ready VmConfig (kernel, initramfs, accel, run directory) -> a run.

This is the one entry point the CLI and the scenarios need: build
:class:`LaunchOptions` once, then :func:`launch` with a request and, when the
NVDIMMs are not plain ones, the backends to use.  :func:`dry_run_argv` renders
the same command line with no side effect at all (no backend, no initramfs,
no KVM probe, no run directory).

Where things live: options in :class:`LaunchOptions` (parsed in
cli/vm_commands.py), QEMU arguments in qemu.py (``qemu_argv``), kernel
parameters for init.sh in :func:`kernel_params`, init's steps in init.sh.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mktme_emu.errors import ConfigError
from mktme_emu.vm.bootkernel import from_debian, select_kernel
from mktme_emu.vm.bytecode import prepare_guest_bytecode
from mktme_emu.vm.initramfs import GUEST_MODULES, build_initramfs
from mktme_emu.vm.kernel import cache_dir, load_kernel
from mktme_emu.vm.launcher import PhaseHook, RunRequest, VmResult, run_vm
from mktme_emu.vm.lifetime import WATCHDOG
from mktme_emu.vm.net import GUEST_NET_MODULES, NetOptions, NetPlan, open_network, plan_network
from mktme_emu.vm.nvdimm import NvdimmBackend, PlainNvdimm, spec_of
from mktme_emu.vm.pvh import direct_boot_image
from mktme_emu.vm.qemu import (
    MIN_LABEL_SIZE,
    NVDIMM_ALIGN,
    QEMU,
    NvdimmSpec,
    VmConfig,
    probe_kvm,
    profile_path,
    qemu_argv,
)
from mktme_emu.vm.status import RwDir
from mktme_emu.vocabulary import NAMESPACE_MODES

NS_MODES = NAMESPACE_MODES  # the guest phases use the same names
ACCEL_PROBE_TTL = 24 * 3600.0
TCG_CPUS = 1  # guest CPUs under TCG unless --cpus says otherwise (the profile's are for KVM)
Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    """Default progress sink."""


def runtime_root() -> Path:
    """Where running VMs keep their sockets (found again by `mktme-emu monitor`)."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(base) / f"mktme-emu-{os.getuid()}"


@dataclass(frozen=True)
class LaunchOptions:
    """The validated VM options of `boot` and `run` (SPEC section 5)."""

    profile: str = "default"
    accel: str = "auto"  # auto | kvm | tcg
    memory: int | None = None
    cpus: int | None = None
    nvdimm_size: int = 256 << 20
    label_size: int = 0
    nvdimm_count: int = 1
    ns_mode: str | None = None  # fsdax | devdax | raw: prepare namespaces at boot
    gdb: int | None = None  # gdbstub port on 127.0.0.1 (None = no stub)
    kernel: Path | None = None  # --kernel: a bzImage or a build tree (None = Debian's)
    modules: Path | None = None  # --modules: INSTALL_MOD_PATH tree or modules directory
    append: tuple[str, ...] = ()  # --append: added to the kernel command line
    extra_args: tuple[str, ...] = ()
    cache: Path | None = None
    keep: bool = False  # leave the run directory (console.log, sockets) behind
    qemu: str = QEMU
    net: NetOptions = field(default_factory=NetOptions)  # guest networking (vm/net.py)
    rwdirs: tuple[Path, ...] = ()  # host directories the guest may write, at the same path

    def __post_init__(self) -> None:
        self._check_sizes()
        for path in self.rwdirs:
            if not path.is_absolute() or not path.is_dir():
                raise ConfigError(f"--rwdir {path}: not an existing directory (absolute path)")
        if self.accel not in ("auto", "kvm", "tcg"):
            raise ConfigError(f"--accel must be auto, kvm or tcg, not {self.accel!r}")
        if self.ns_mode is not None and self.ns_mode not in NS_MODES:
            raise ConfigError(f"namespace mode must be one of {', '.join(NS_MODES)}")
        if self.nvdimm_count < 0:
            raise ConfigError("the NVDIMM count cannot be negative")

    def _check_sizes(self) -> None:
        """Refuse bad sizes before anything is started (no backend, no temporary folder)."""
        if self.nvdimm_size <= 0 or self.nvdimm_size % NVDIMM_ALIGN:
            raise ConfigError(f"--nvdimm-size {self.nvdimm_size}: must be a positive multiple "
                              "of 2M (fsdax maps the NVDIMM in 2 MiB pages)")
        if self.label_size and self.label_size < MIN_LABEL_SIZE:
            raise ConfigError(f"--label-size {self.label_size}: 0 (none) or at least 128K")


def choose_accel(opts: LaunchOptions, kernel: Path, cache: Path, progress: Progress,
                 probe: bool = True) -> str:
    """The accelerator: as asked, or for auto a KVM probe (result cached for a day).

    With ``probe`` False (--dry-run) only a cached result is used, else "tcg".
    """
    if opts.accel != "auto":
        return opts.accel
    record = cache / "accel-probe.json"
    key = f"{opts.qemu}|{kernel}|{os.uname().release}"
    with contextlib.suppress(OSError, ValueError, KeyError):
        data = json.loads(record.read_text())
        if data["key"] == key and time.time() - data["time"] < ACCEL_PROBE_TTL:
            progress(f"accel: {data['accel']} (cached probe: {data['reason']})")
            return str(data["accel"])
    if not probe:
        progress("accel: auto, not probed in a dry run: showing tcg")
        return "tcg"
    choice = probe_kvm(kernel, opts.qemu)
    progress(f"accel: {choice.accel} ({choice.reason})")
    with contextlib.suppress(OSError):
        record.write_text(json.dumps({"key": key, "time": time.time(),
                                      "accel": choice.accel, "reason": choice.reason}))
    return choice.accel


def _project_dirs() -> list[str]:
    """Host directories the guest must see even where it mounts tmpfs (/tmp...).

    The venv and the source tree of the editable install, and the working
    directory the command runs in.
    """
    import mktme_emu
    dirs = {str(Path(sys.prefix)), str(Path(mktme_emu.__file__).resolve().parent.parent),
            os.getcwd()}
    return sorted(dirs)


def kernel_params(opts: LaunchOptions, interactive: bool,
                  net: NetPlan | None = None) -> tuple[str, ...]:
    """Guest kernel parameters init.sh reads (mktme.*)."""
    params = [f"mktme.path={Path(sys.executable).parent}"]
    keep = [d for d in _project_dirs() if "," not in d and not any(c.isspace() for c in d)]
    if keep:
        params.append("mktme.keep=" + ",".join(keep))
    if opts.ns_mode:
        params.append(f"mktme.ns={opts.ns_mode}")
    if interactive:
        size = shutil.get_terminal_size((80, 24))
        params.append(f"mktme.tty={size.lines}x{size.columns}")
    if net is not None:
        params.append(net.kernel_param())
    return tuple(params)


def rw_dirs(opts: LaunchOptions) -> tuple[RwDir, ...]:
    """Each --rwdir with its 9p mount tag (rw0, rw1, ...), the one place tags are made."""
    return tuple(RwDir(f"rw{i}", path.resolve()) for i, path in enumerate(opts.rwdirs))


def make_config(opts: LaunchOptions, nvdimms: Sequence[NvdimmSpec], run_dir: Path,
                interactive: bool, progress: Progress = _quiet,
                net: NetPlan | None = None, tap_fd: int | None = None) -> VmConfig:
    """Fetch the kernel if needed, build the initramfs, pick the accel: a VmConfig.

    Also writes the project's bytecode, which the guest cannot (vm/bytecode.py).
    """
    prepare_guest_bytecode()
    cache = cache_dir(opts.cache)
    kernel = select_kernel(opts.kernel, opts.modules, cache, opts.ns_mode, progress)
    initrd = build_initramfs(kernel, cache, GUEST_MODULES + (GUEST_NET_MODULES if net else ()))
    if opts.gdb is not None:
        progress(f"gdb: {kernel.gdb_hint(opts.gdb)}")
    image = direct_boot_image(kernel.image, kernel.identity, cache, progress) or kernel.image
    accel = choose_accel(opts, kernel.image, cache, progress)
    return _config(opts, image, initrd, accel, nvdimms, run_dir, interactive, net, tap_fd)


def _config(opts: LaunchOptions, kernel: Path, initrd: Path, accel: str,
            nvdimms: Sequence[NvdimmSpec], run_dir: Path, interactive: bool,
            net: NetPlan | None, tap_fd: int | None) -> VmConfig:
    debug = ("nokaslr",) if opts.gdb is not None else ()  # symbols at their link addresses
    # Under TCG a second vCPU costs boot ~40% (bring-up, calibration, MTTCG
    # contention on the host) and buys nothing the guest tools use.
    cpus = opts.cpus or (TCG_CPUS if accel == "tcg" else None)
    return VmConfig(
        kernel=kernel, initrd=initrd, profile=profile_path(opts.profile), accel=accel,
        run_dir=run_dir, nvdimms=tuple(nvdimms), memory=opts.memory, cpus=cpus,
        interactive=interactive, gdb_port=opts.gdb,
        append=(*kernel_params(opts, interactive, net), *debug, *opts.append),
        extra_args=opts.extra_args, qemu=opts.qemu, rwdirs=rw_dirs(opts),
        net_args=net.qemu_args(tap_fd) if net else (), pass_fds=() if tap_fd is None else (tap_fd,))


def dry_run_argv(opts: LaunchOptions, nvdimms: Sequence[NvdimmSpec], interactive: bool,
                 progress: Progress = _quiet) -> list[str]:
    """The QEMU command line a launch would use, with no side effect.

    Nothing is downloaded, built, probed, created or started: the initramfs,
    the run directory and the tap descriptor are shown as what a real launch
    would create.
    """
    cache = cache_dir(opts.cache)
    if opts.kernel is None:
        debian = load_kernel(cache)
        if debian is None:
            raise ConfigError("no guest kernel cached: run `mktme-emu kernel fetch` first "
                              "(--dry-run downloads nothing)")
        kernel = from_debian(debian)
    else:  # the user's kernel is checked as a launch would check it
        kernel = select_kernel(opts.kernel, opts.modules, cache, opts.ns_mode, progress)
    if opts.gdb is not None:
        progress(f"gdb: {kernel.gdb_hint(opts.gdb)}")
    accel = choose_accel(opts, kernel.image, cache, progress, probe=False)
    initrd = cache / f"initramfs-{kernel.release}-<built at launch>.img"
    run_dir = runtime_root() / f"vm-{os.getpid()}-<created at launch>"
    net = plan_network(opts.net)
    if net is not None:
        progress(net.dry_run_line())
    return qemu_argv(_config(opts, kernel.image, initrd, accel, nvdimms, run_dir,
                             interactive, net, None))


@contextlib.contextmanager
def run_directory(keep: bool, progress: Progress = _quiet) -> Iterator[Path]:
    """A private directory for one VM's sockets and console log."""
    root = runtime_root()
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"vm-{os.getpid()}-", dir=root))
    if not keep:
        WATCHDOG.guard_path(path)  # removed even if we are SIGKILLed
    try:
        yield path
    finally:
        if keep:
            progress(f"vm: kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)
            WATCHDOG.release_path(path)


class _GuardedPlainNvdimm(PlainNvdimm):
    """A plain NVDIMM whose view the watchdog removes if we die without closing it."""

    def __init__(self, data_size: int, label_size: int = 0) -> None:
        super().__init__(data_size, label_size)
        WATCHDOG.guard_path(self.view_path)

    def close(self) -> None:
        super().close()
        WATCHDOG.release_path(self.view_path)


def plain_backends(opts: LaunchOptions) -> list[PlainNvdimm]:
    """Unencrypted NVDIMMs, for when no emulator backend is given."""
    return [_GuardedPlainNvdimm(opts.nvdimm_size, opts.label_size)
            for _ in range(opts.nvdimm_count)]


def launch(opts: LaunchOptions, request: RunRequest,
           backends: Sequence[NvdimmBackend] | None = None,
           progress: Progress = _quiet, phase: PhaseHook = _quiet) -> VmResult:
    """Boot a VM with ``backends`` (default: plain NVDIMMs made and closed here), do ``request``.

    Blocks until the VM is gone.  Backends passed in are not closed: the caller
    owns them.  ``phase`` is told each phase of the run (see launcher.py).
    Raises ConfigError/VmError for host-side problems.
    """
    owned = plain_backends(opts) if backends is None else []
    chosen: Sequence[NvdimmBackend] = owned if backends is None else backends
    try:
        phase("backends-ready")
        net = plan_network(opts.net)
        with run_directory(opts.keep, progress) as run_dir, open_network(net, progress) as tap_fd:
            cfg = make_config(opts, [spec_of(b) for b in chosen], run_dir,
                              request.interactive, progress, net, tap_fd)
            progress(f"vm: run directory {run_dir} (QMP monitor: {cfg.monitor_socket.name})")
            return run_vm(cfg, chosen, request, progress, phase)
    finally:
        for backend in owned:
            backend.close()
