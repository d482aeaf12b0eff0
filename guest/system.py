"""The guest's system tools: ndctl namespaces, mkfs, mount, and the block cache.

The phases need a namespace in a given mode, a filesystem on it, and one
subtle thing: the kernel caches block-device reads (the buffer cache holds a
superblock read through the old KeyID), so after a KeyID change under a
``/dev/pmemN`` the cache must be dropped or the next mount sees stale bytes.
DAX mappings have no such cache.

Every command runs from an argv list (never a shell string) and raises
:class:`~mktme_guest.errors.CommandFailed` with its last stderr line.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from mktme_emu.vocabulary import NAMESPACE_MODES

from .errors import CommandFailed, DeviceError

TYPE_CHECKING = False  # not typing's (see mktme_emu.protocol)
if TYPE_CHECKING:  # run() imports it: `mktme-guest status` lists devices without a tool
    import subprocess

BLKFLSBUF = 0x1261
NS_MODES = NAMESPACE_MODES  # the host's `boot --ns` uses the same names
FILESYSTEMS = ("ext4", "xfs")
# xfsprogs >= 5.19 refuses filesystems under 300 MB unless it runs under fstests,
# which it recognises by these variables; the default emulated NVDIMM is 256 MB.
XFS_SMALL_FS_ENV = {"TEST_DIR": "/mnt", "TEST_DEV": "/dev/null", "QA_CHECK_FS": "1"}
DEFAULT_NAMESPACE = "namespace0.0"


def run(argv: list[str], timeout: float = 600.0, check: bool = True,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a tool, capture its output; CommandFailed on a non-zero status when ``check``.

    ``env`` adds variables to the inherited environment.
    """
    import subprocess

    full_env = {**os.environ, **env} if env else None
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                              env=full_env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CommandFailed(argv, -1, str(exc)) from exc
    if check and proc.returncode != 0:
        raise CommandFailed(argv, proc.returncode, proc.stderr or proc.stdout)
    return proc


def _ndctl_json(text: str) -> dict[str, object]:
    """ndctl prints one object, or a list when several match: the first object."""
    import json  # here: `mktme-guest status` lists devices from sysfs, without ndctl

    try:
        data = json.loads(text)
    except ValueError as exc:
        raise DeviceError(f"ndctl printed something that is not JSON: {text[:80]!r}") from exc
    if isinstance(data, list):
        data = data[0] if data else {}
    if not isinstance(data, dict):
        raise DeviceError("ndctl printed no namespace")
    return data


def namespace_device(info: dict[str, object]) -> str:
    """``/dev/pmemN`` or ``/dev/daxX.Y`` from an ndctl namespace object."""
    if isinstance(info.get("blockdev"), str):
        return f"/dev/{info['blockdev']}"
    if isinstance(info.get("chardev"), str):
        return f"/dev/{info['chardev']}"
    region = info.get("daxregion")
    if isinstance(region, dict):
        for dev in region.get("devices", []):
            if isinstance(dev, dict) and isinstance(dev.get("chardev"), str):
                return f"/dev/{dev['chardev']}"
    raise DeviceError(f"namespace {info.get('dev', '?')} (mode {info.get('mode', '?')}) has no device")


def namespace_info(namespace: str = DEFAULT_NAMESPACE) -> dict[str, object]:
    """``ndctl list -n NAMESPACE`` as a dict (mode, size, blockdev/chardev)."""
    return _ndctl_json(run(["ndctl", "list", "-n", namespace]).stdout)


def ensure_namespace(mode: str, namespace: str = DEFAULT_NAMESPACE, reconfigure: bool = True) -> str:
    """Put the namespace in ``mode`` unless it already is; returns its device path.

    Reconfiguring destroys what the namespace held (it rewrites its info
    block); keeping the mode keeps the data, which is what a second boot on
    the same media needs.  With ``reconfigure`` False a namespace in another
    mode raises DeviceError instead (phases that check data of an earlier boot).
    """
    if mode not in NS_MODES:
        raise DeviceError(f"namespace mode must be one of {', '.join(NS_MODES)}, not {mode!r}")
    info = namespace_info(namespace)
    if info.get("mode") != mode and not reconfigure:
        raise DeviceError(f"{namespace} is in mode {info.get('mode')!r}, not {mode!r}: "
                          "not the namespace an earlier phase prepared")
    if info.get("mode") != mode:
        info = _ndctl_json(run(["ndctl", "create-namespace", "-f", "-e", namespace,
                                "-m", mode]).stdout)
    device = namespace_device(info)
    if not Path(device).exists():
        raise DeviceError(f"{device} does not exist after configuring {namespace} as {mode}")
    return device


def drop_caches(device: str | None = None) -> None:
    """Forget cached block-device contents (after a KeyID change under the device).

    Syncs first, then BLKFLSBUF on the block device (when given) and
    drop_caches=3.  Needs root.
    """
    os.sync()
    if device and not Path(device).name.startswith("dax"):
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, BLKFLSBUF, 0)
        finally:
            os.close(fd)
    with contextlib.suppress(OSError), open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def mkfs(fs: str, device: str) -> None:
    """A fresh filesystem with 4 KiB blocks (what DAX needs); xfs without reflink."""
    if fs == "ext4":
        run(["mkfs.ext4", "-q", "-F", "-b", "4096", device])
    elif fs == "xfs":
        run(["mkfs.xfs", "-q", "-f", "-b", "size=4096", "-m", "reflink=0", device],
            env=XFS_SMALL_FS_ENV)
    else:
        raise DeviceError(f"filesystem must be one of {', '.join(FILESYSTEMS)}, not {fs!r}")


def mount(device: str, mountpoint: Path, fs: str, dax: bool = True) -> None:
    """Mount ``device`` (``-o dax`` by default) at ``mountpoint``, creating the directory."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    run(["mount", "-t", fs, *(["-o", "dax"] if dax else []), device, str(mountpoint)])


def try_mount(device: str, mountpoint: Path, fs: str, dax: bool = True) -> str | None:
    """Like :func:`mount`; returns None on success, the error line when it fails."""
    try:
        mount(device, mountpoint, fs, dax)
    except CommandFailed as exc:
        return str(exc)
    return None


def umount(mountpoint: Path) -> None:
    run(["umount", str(mountpoint)])


MOUNTS = Path("/proc/self/mounts")


def mount_options(mountpoint: Path, mounts: Path = MOUNTS) -> list[str] | None:
    """The options of what is mounted at ``mountpoint`` (the last mount wins), None if nothing."""
    target = os.path.realpath(mountpoint)
    found = None
    for line in mounts.read_text().splitlines():
        fields = line.split()
        if len(fields) > 3 and fields[1] == target:
            found = fields[3].split(",")
    return found


def is_mounted(mountpoint: Path, mounts: Path = MOUNTS) -> bool:
    return mount_options(mountpoint, mounts) is not None


def mount_is_dax(mountpoint: Path, mounts: Path = MOUNTS) -> bool:
    """Whether the mount's options say DAX is on (``dax`` or ``dax=always``)."""
    return any(opt in ("dax", "dax=always") for opt in mount_options(mountpoint, mounts) or [])


def nvdimm_devices(sysfs: Path = Path("/sys")) -> list[str]:
    """The NVDIMM devices the kernel exposes: ``/dev/pmemN`` disks and ``/dev/daxX.Y``."""
    disks = sorted(p.name for p in (sysfs / "block").glob("pmem*"))
    daxes = sorted(p.name for p in (sysfs / "bus" / "dax" / "devices").glob("dax*"))
    return [f"/dev/{name}" for name in (*disks, *daxes)]


def default_device(sysfs: Path = Path("/sys")) -> str:
    """The one NVDIMM device, for commands that may omit --device; DeviceError otherwise."""
    devices = nvdimm_devices(sysfs)
    if len(devices) != 1:
        found = ", ".join(devices) or "none"
        raise DeviceError(f"cannot choose an NVDIMM device (found: {found}); pass --device")
    return devices[0]
