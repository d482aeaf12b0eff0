"""The guest sees the host's files: the working directory anywhere, --rwdir writable (VMs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mktme_emu.vm.kernel import cache_dir, load_kernel

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(load_kernel(cache_dir()) is None,
                       reason="no guest kernel: run `mktme-emu kernel fetch`"),
]

RUN = [sys.executable, "-m", "mktme_emu.cli.main", "run", "--plain", "--nvdimm-size", "64M",
       "--timeout", "240"]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*RUN, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_a_script_in_a_host_temporary_directory_runs_in_the_guest(tmp_path: Path) -> None:
    assert str(tmp_path).startswith(("/tmp", "/var/tmp"))  # the case that used to fail
    script = tmp_path / "x.sh"
    script.write_text("#!/bin/sh\necho \"hello from $(pwd)\"\necho scratch >scratch.txt\n"
                      "cat scratch.txt\nexit 3\n")
    script.chmod(0o755)
    out = _run(["--", "./x.sh"], tmp_path)
    assert out.returncode == 3, out.stderr[-2000:]
    assert f"hello from {tmp_path}" in out.stdout and "scratch" in out.stdout
    assert not (tmp_path / "scratch.txt").exists()  # /tmp writes stay in the guest


def test_a_file_written_under_rwdir_is_on_the_host(tmp_path: Path) -> None:
    results = tmp_path / "results dir"
    results.mkdir()
    out = _run(["--rwdir", str(results), "--", "sh", "-c",
                f"echo guest-wrote >'{results}/out.txt' && touch /etc/mktme-probe"],
               tmp_path)
    assert out.returncode != 0  # the host root stays read-only...
    assert (results / "out.txt").read_text() == "guest-wrote\n"  # ...but results land
    assert (results / "out.txt").stat().st_uid == os.getuid()
    assert not Path("/etc/mktme-probe").exists()
