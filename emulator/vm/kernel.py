"""The guest kernel: Debian's linux-image package, unpacked into a cache, never installed.

The guest needs a kernel whose modules we can pick (NVDIMM, DAX, 9p, virtio):
Debian's stock ``linux-image-*-amd64`` has them all as modules.  We download
the ``.deb`` with ``apt-get download`` (no root, no install), check its sha256
against the archive's index, unpack it with ``dpkg-deb -x`` and write a record
(package, version, sha256, kernel release).  A second ``fetch`` finds the record
and the files and does nothing, without the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from mktme_emu.errors import VmError

#: The meta-package whose dependency names the current kernel package.
META_PACKAGE = "linux-image-amd64"
RECORD = "kernel.json"

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    """Default progress sink: say nothing."""


def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """Where kernels and initramfs images live: option, $MKTME_EMU_CACHE, then XDG."""
    if override:
        return Path(override)
    if env := os.environ.get("MKTME_EMU_CACHE"):
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "mktme-emu"


@dataclass(frozen=True)
class GuestKernel:
    """An unpacked guest kernel: what the initramfs builder and QEMU need."""

    package: str
    version: str  # Debian package version, e.g. 6.1.192-2
    release: str  # kernel release (uname -r), e.g. 6.1.0-56-amd64
    sha256: str  # of the .deb, as listed by the archive and checked by us
    root: Path  # the unpack directory

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.release}"

    @property
    def modules_dir(self) -> Path:
        return self.root / "lib" / "modules" / self.release

    def is_complete(self) -> bool:
        """True when the files the record promises are all there."""
        return self.vmlinuz.is_file() and (self.modules_dir / "kernel").is_dir()


def _run(argv: list[str], cwd: Path | None = None, capture: bool = True) -> str:
    """Run a host tool; raise VmError with its stderr when it fails or is missing."""
    try:
        proc = subprocess.run(argv, cwd=cwd, check=True, text=True,
                              capture_output=capture)
    except FileNotFoundError as exc:
        raise VmError(f"{argv[0]} not found: install it (make setup)") from exc
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or "").strip().splitlines()[-1:] or [f"exit {exc.returncode}"]
        raise VmError(f"{' '.join(argv[:2])} failed: {detail[0]}") from exc
    return proc.stdout or ""


def _apt_field(package: str, field: str) -> str:
    """One field of a package's apt-cache record (first stanza = candidate)."""
    for line in _run(["apt-cache", "show", "--no-all-versions", package]).splitlines():
        if line.startswith(f"{field}:"):
            return line.split(":", 1)[1].strip()
    raise VmError(f"apt-cache has no {field} for {package}")


def resolve_package(package: str | None = None) -> str:
    """The linux-image package to use: given, or what linux-image-amd64 depends on."""
    if package:
        return package
    for line in _run(["apt-cache", "depends", META_PACKAGE]).splitlines():
        dep = line.strip().removeprefix("Depends:").strip()
        if line.strip().startswith("Depends:") and dep.startswith("linux-image-"):
            return dep
    raise VmError(f"cannot find the kernel package {META_PACKAGE} depends on (apt-get update?)")


def load_kernel(cache: Path) -> GuestKernel | None:
    """The cached kernel from its record, or None when there is none or it is incomplete."""
    try:
        data = json.loads((cache / RECORD).read_text())
        kernel = GuestKernel(**{**data, "root": Path(data["root"])})
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return kernel if kernel.is_complete() else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _download(package: str, workdir: Path, progress: Progress) -> Path:
    """apt-get download into workdir (its own progress bar shows on a terminal)."""
    progress(f"kernel: downloading {package} ...")
    start = time.monotonic()
    _run(["apt-get", "download", package], cwd=workdir, capture=False)
    debs = sorted(workdir.glob(f"{package}_*.deb"))
    if not debs:
        raise VmError(f"apt-get download {package} produced no .deb")
    size = debs[0].stat().st_size
    progress(f"kernel: downloaded {size / 1e6:.1f} MB in {time.monotonic() - start:.1f} s")
    return debs[0]


def fetch_kernel(cache: Path, package: str | None = None, force: bool = False,
                 progress: Progress = _quiet) -> GuestKernel:
    """Make sure the guest kernel is unpacked in ``cache``; return it.

    Does nothing (and needs no network) when the record and files are present,
    unless ``force``.  Blocks on apt-get and dpkg-deb; raises VmError when a
    tool fails, the checksum differs from the archive's, or the package holds
    no vmlinuz.
    """
    current = load_kernel(cache)
    if current and not force and package in (None, current.package):
        progress(f"kernel: {current.package} {current.version} already in {cache}")
        return current
    package = resolve_package(package)
    version = _apt_field(package, "Version")
    expected = _apt_field(package, "SHA256")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".fetch-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)  # apt's _apt user writes here when not root
        deb = _download(package, work, progress)
        actual = _sha256(deb)
        if actual != expected:
            raise VmError(f"{deb.name}: sha256 {actual} differs from the archive's {expected}")
        progress(f"kernel: sha256 {actual} ok; unpacking ...")
        start = time.monotonic()
        unpacked = work / "root"
        _run(["dpkg-deb", "-x", str(deb), str(unpacked)])
        releases = sorted(p.name.removeprefix("vmlinuz-") for p in (unpacked / "boot").glob("vmlinuz-*"))
        if not releases:
            raise VmError(f"{package} contains no /boot/vmlinuz-*")
        final = cache / f"{package}_{version}"
        shutil.rmtree(final, ignore_errors=True)
        unpacked.rename(final)
    kernel = GuestKernel(package=package, version=version, release=releases[0],
                         sha256=actual, root=final)
    record = {**asdict(kernel), "root": str(final)}
    (cache / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    progress(f"kernel: unpacked {kernel.release} in {time.monotonic() - start:.1f} s into {final}")
    return kernel
