"""From a frozen VM configuration to the QEMU argv (a list, never a shell string).

The machine shape (machine type, nvdimm=on, RAM, CPUs, pvpanic, the
virtio-serial bus) lives in a ``qemu-configs/<profile>.cfg`` -readconfig file;
this module adds only what changes per run: file and socket paths, NVDIMM
sizes, ``slots``/``maxmem`` computed for them, the kernel command line.
"""

from __future__ import annotations

import os
import re
import select
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from mktme_emu.errors import ConfigError, VmError
from mktme_emu.vm.status import RwDir

QEMU = "qemu-system-x86_64"
PROFILE_DIR = Path(__file__).resolve().parents[2] / "qemu-configs"
MIB = 1 << 20
#: The NVDIMM data area must be a multiple of this for fsdax (PMD alignment).
NVDIMM_ALIGN = 2 * MIB
MIN_LABEL_SIZE = 128 * 1024
STATUS_PORT = "org.mktme.status"
CONTROL_PORT = "org.mktme.control"
_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Bytes from '256M', '1G', '131072' (K/M/G/T are binary, as QEMU reads them)."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(text)
    if not match:
        raise ConfigError(f"bad size {text!r}: use a number with an optional K/M/G suffix")
    return int(match.group(1)) << (10 * " KMGT".index(match.group(2).upper() or " "))


def profile_path(name_or_path: str) -> Path:
    """A profile name (default, debug) or a path to a .cfg file."""
    path = Path(name_or_path)
    if path.suffix != ".cfg":
        path = PROFILE_DIR / f"{name_or_path}.cfg"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROFILE_DIR.glob("*.cfg")))
        raise ConfigError(f"no QEMU profile {name_or_path!r} (known: {known})")
    return path


def profile_value(profile: Path, section: str, key: str) -> str | None:
    """Read ``key`` of the first ``[section]`` of a -readconfig file (tiny ini subset)."""
    current = None
    for raw in profile.read_text().splitlines():
        line = raw.strip()
        if line.startswith("["):
            current = line.strip("[]").split()[0]
        elif current == section and "=" in line:
            k, v = (s.strip() for s in line.split("=", 1))
            if k == key:
                return v.strip('"')
    return None


@dataclass(frozen=True)
class NvdimmSpec:
    """What QEMU needs about one NVDIMM: the view file and the sizes."""

    view_path: Path
    data_size: int
    label_size: int = 0
    guest_socket: Path | None = None

    def validate(self) -> None:
        if self.data_size <= 0 or self.data_size % NVDIMM_ALIGN:
            raise ConfigError(f"NVDIMM size {self.data_size} is not a positive multiple of 2M")
        if self.label_size and self.label_size < MIN_LABEL_SIZE:
            raise ConfigError(f"NVDIMM label size {self.label_size} is below 128K")


@dataclass(frozen=True)
class VmConfig:
    """Everything one QEMU run needs, validated; ``qemu_argv`` renders it."""

    kernel: Path
    initrd: Path
    profile: Path
    accel: str  # kvm | tcg
    run_dir: Path  # sockets and the console log live here
    nvdimms: tuple[NvdimmSpec, ...] = ()
    memory: int | None = None  # bytes; None = the profile's
    cpus: int | None = None
    interactive: bool = False  # console on stdio (boot) or on a socket (run)
    gdb_port: int | None = None  # a gdbstub on 127.0.0.1:PORT
    append: tuple[str, ...] = ()
    extra_args: tuple[str, ...] = ()
    qemu: str = QEMU
    net_args: tuple[str, ...] = ()  # -netdev/-device from vm.net.NetPlan.qemu_args
    pass_fds: tuple[int, ...] = ()  # fds QEMU inherits (the tap of --net tap)
    rwdirs: tuple[RwDir, ...] = ()  # host directories the guest may write (--rwdir)

    @property
    def qmp_socket(self) -> Path:
        return self.run_dir / "qmp.sock"

    @property
    def monitor_socket(self) -> Path:
        """A second QMP socket for `mktme-emu monitor` (the launcher holds the first)."""
        return self.run_dir / "monitor.sock"

    @property
    def status_socket(self) -> Path:
        return self.run_dir / "status.sock"

    @property
    def console_socket(self) -> Path:
        return self.run_dir / "console.sock"

    @property
    def console_log(self) -> Path:
        return self.run_dir / "console.log"

    def ram_size(self) -> int:
        if self.memory is not None:
            return self.memory
        return parse_size(profile_value(self.profile, "memory", "size") or "512M")


def nvdimm_id(index: int) -> str:
    """The QEMU device id of the ``index``-th NVDIMM: the one name both sides use.

    ``_nvdimm_args`` gives each -device this id, and :func:`nvdimm_bases`
    finds each backend's base under it in ``query-memory-devices``.
    """
    return f"nvdimm{index}"


def nvdimm_bases(devices: object, count: int) -> list[int]:
    """The guest physical base of NVDIMMs 0..count-1 from QMP ``query-memory-devices``."""
    if not isinstance(devices, list):
        raise VmError("QMP query-memory-devices did not return a list")
    found = {d["data"]["id"]: int(d["data"]["addr"]) for d in devices
             if isinstance(d, dict) and d.get("type") == "nvdimm"}
    bases = []
    for index in range(count):
        if nvdimm_id(index) not in found:
            raise VmError(f"QEMU reports no NVDIMM {nvdimm_id(index)} (query-memory-devices)")
        bases.append(found[nvdimm_id(index)])
    return bases


def _nvdimm_args(cfg: VmConfig) -> list[str]:
    """-object/-device pairs for each NVDIMM plus its guest control port."""
    args: list[str] = []
    for i, nv in enumerate(cfg.nvdimms):
        nv.validate()
        args += ["-object", f"memory-backend-file,id=nvmem{i},share=on,"
                 f"mem-path={nv.view_path},size={nv.data_size + nv.label_size}"]
        label = f",label-size={nv.label_size}" if nv.label_size else ""
        args += ["-device", f"nvdimm,id={nvdimm_id(i)},memdev=nvmem{i}{label}"]
        if nv.guest_socket is not None:
            port = CONTROL_PORT if i == 0 else f"{CONTROL_PORT}.{i}"
            args += ["-chardev", f"socket,id=ctl{i},path={nv.guest_socket},reconnect=1",
                     "-device", f"virtserialport,bus=vser.0,chardev=ctl{i},name={port}"]
    return args


def _console_args(cfg: VmConfig) -> list[str]:
    """The serial console: the user's terminal (boot) or a socket the launcher reads (run)."""
    if cfg.interactive:
        return ["-chardev", f"stdio,id=con,mux=on,signal=off,logfile={cfg.console_log}",
                "-serial", "chardev:con", "-mon", "chardev=con,mode=readline"]
    return ["-chardev", f"socket,id=con,path={cfg.console_socket},logfile={cfg.console_log}",
            "-serial", "chardev:con"]


def _share_args(cfg: VmConfig) -> list[str]:
    """9p exports: the host root read-only, each --rwdir read-write (init.sh mounts them)."""
    args = ["-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,"
            "readonly=on,multidevs=remap"]
    for rw in cfg.rwdirs:
        path = str(rw.path).replace(",", ",,")  # QEMU's option syntax escapes a comma
        args += ["-virtfs", f"local,path={path},mount_tag={rw.tag},security_model=none,"
                 "multidevs=remap"]
    return args


def qemu_argv(cfg: VmConfig) -> list[str]:
    """The full QEMU command line for ``cfg`` (QEMU starts paused: -S)."""
    ram = cfg.ram_size()
    nv_total = sum(nv.data_size + nv.label_size for nv in cfg.nvdimms)
    argv = [cfg.qemu, "-no-user-config", "-nodefaults", "-display", "none",
            "-readconfig", str(cfg.profile), "-accel", cfg.accel, "-S",
            # The guest runs the host's Python, numpy and OpenSSL over 9p: it
            # needs the instruction sets they were built for (x86-64-v2 and up).
            "-cpu", "host" if cfg.accel == "kvm" else "max",
            "-m", f"size={ram}B,slots={max(1, len(cfg.nvdimms))},maxmem={ram + nv_total}B"]
    if cfg.cpus:
        argv += ["-smp", str(cfg.cpus)]
    argv += ["-kernel", str(cfg.kernel), "-initrd", str(cfg.initrd),
             "-append", " ".join(("console=ttyS0", "quiet", "panic=-1", *cfg.append)),
             "-qmp", f"unix:{cfg.qmp_socket},server=on,wait=off",
             "-qmp", f"unix:{cfg.monitor_socket},server=on,wait=off",
             "-action", "panic=pause"]
    argv += _console_args(cfg)
    argv += ["-chardev", f"socket,id=status,path={cfg.status_socket}",
             "-device", f"virtserialport,bus=vser.0,chardev=status,name={STATUS_PORT}"]
    argv += _share_args(cfg)
    argv += _nvdimm_args(cfg)
    argv += cfg.net_args
    if cfg.gdb_port is not None:  # loopback only: the stub can read and write guest memory
        argv += ["-gdb", f"tcp:127.0.0.1:{cfg.gdb_port}"]
    return argv + list(cfg.extra_args)


def format_argv(argv: list[str]) -> str:
    """The argv shell-quoted, for --dry-run and logs (never executed by a shell)."""
    return shlex.join(argv)


@dataclass(frozen=True)
class AccelChoice:
    accel: str
    reason: str = field(default="")


def probe_kvm(kernel: Path, qemu: str = QEMU, timeout: float = 4.0) -> AccelChoice:
    """Can KVM really run the guest kernel here?  Boot it until it prints its banner.

    /dev/kvm existing is not enough: on some nested hosts KVM runs real-mode
    code (the boot loader) and then hangs when the kernel enters long mode.  So
    the probe boots ``kernel`` itself (no initrd) and waits for "Linux version"
    on the serial console, killing QEMU as soon as it appears (well under a
    second with working KVM).  Blocks for at most ``timeout`` seconds.
    """
    argv = [qemu, "-accel", "kvm", "-machine", "q35", "-m", "256", "-nodefaults",
            "-display", "none", "-no-reboot", "-serial", "stdio", "-kernel", str(kernel),
            "-append", "console=ttyS0 earlyprintk=ttyS0 panic=-1"]
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
    except FileNotFoundError as exc:
        raise ConfigError(f"{qemu} not found: install qemu-system-x86 (make setup)") from exc
    assert proc.stdout is not None and proc.stderr is not None
    deadline = time.monotonic() + timeout
    seen = b""
    try:
        while time.monotonic() < deadline and b"Linux version" not in seen:
            ready, _, _ = select.select([proc.stdout], [], [], 0.1)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                seen = seen[-4096:] + chunk
    finally:
        proc.kill()
        err = proc.stderr.read().decode(errors="replace").strip().splitlines()
        proc.wait()
    if b"Linux version" in seen:
        return AccelChoice("kvm", "KVM probe booted the guest kernel")
    if time.monotonic() >= deadline:
        return AccelChoice("tcg", f"KVM probe: no kernel banner within {timeout:.0f} s")
    return AccelChoice("tcg", f"KVM unavailable: {(err or ['QEMU exited'])[-1]}")
