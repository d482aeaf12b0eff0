"""Nothing outlives a run, however it ends (VMs): no process, view, socket or run directory.

Each test runs `mktme-emu run` with an emulated NVDIMM as a child, reads what
the run started from its run directory's run.json (never by scanning the
machine: other VMs may be running), ends the run one way, and checks.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mktme_emu.vm.kernel import cache_dir, load_kernel

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(load_kernel(cache_dir()) is None,
                       reason="no guest kernel: run `mktme-emu kernel fetch`"),
]

READY = "GUEST-READY"


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped, does not count)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Run:
    """`mktme-emu run` in the background, with what it reports about itself."""

    def __init__(self, tmp_path: Path, command: str, *extra: str) -> None:
        self.stderr_path = tmp_path / "stderr.txt"
        # A short private TMPDIR (unix socket paths are short): the temporary
        # state folder of the backend shows up there.
        self.tmp = Path(tempfile.mkdtemp(prefix="mkcl-", dir="/tmp"))
        env = {**os.environ, "TMPDIR": str(self.tmp)}
        argv = [sys.executable, "-m", "mktme_emu.cli.main", "run", "--nvdimm-size", "64M",
                "--timeout", "240", *extra, "--", "sh", "-c", command]
        with self.stderr_path.open("w") as err:
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True,
                                         env=env, cwd=tmp_path)

    def wait_ready(self) -> dict[str, object]:
        """Read stdout until the guest says READY; return run.json."""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if READY in line:
                break
        else:
            pytest.fail(f"the guest never got ready: {self.stderr_path.read_text()[-2000:]}")
        return self.info()

    def info(self) -> dict[str, object]:
        """run.json of the run directory the run reported on stderr."""
        said = re.search(r"vm: run directory (\S+)", self.stderr_path.read_text())
        assert said, self.stderr_path.read_text()
        info = json.loads((Path(said.group(1)) / "run.json").read_text())
        info["run_dir"] = said.group(1)
        info["tmp"] = str(self.tmp)
        return info

    def finish(self, timeout: float = 180) -> int:
        assert self.proc.stdout is not None
        self.proc.stdout.read()
        return self.proc.wait(timeout=timeout)


def _assert_nothing_left(info: dict[str, object], within: float = 60) -> None:
    pids = [info["qemu_pid"], *info["backend_pids"]]  # type: ignore[list-item]
    leftovers: list[object] = []
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        leftovers = [p for p in pids if isinstance(p, int) and _alive(p)]
        leftovers += [v for v in info["views"] if os.path.exists(v)]  # type: ignore[attr-defined]
        leftovers += [d for d in (info["run_dir"],) if os.path.exists(str(d))]
        leftovers += list(Path(str(info["tmp"])).glob("mktme-nvdimm*"))  # temporary state
        if not leftovers:
            shutil.rmtree(str(info["tmp"]))
            return
        time.sleep(0.2)
    pytest.fail(f"left behind: {leftovers}")


@pytest.mark.parametrize("how", ["exit", "panic"])
def test_a_run_that_ends_by_itself_leaves_nothing(tmp_path: Path, how: str) -> None:
    command = {"exit": f"echo {READY}; sleep 1; exit 5",
               "panic": f"echo {READY}; sleep 1; echo c >/proc/sysrq-trigger; sleep 60"}[how]
    run = Run(tmp_path, command)
    info = run.wait_ready()
    assert run.finish() == {"exit": 5, "panic": 255}[how]
    _assert_nothing_left(info)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_to_run_leaves_nothing(tmp_path: Path, sig: signal.Signals) -> None:
    run = Run(tmp_path, f"echo {READY}; sleep 200")
    info = run.wait_ready()
    run.proc.send_signal(sig)
    assert run.finish() == 128 + sig
    _assert_nothing_left(info)


def test_a_sigkilled_launcher_leaves_nothing(tmp_path: Path) -> None:
    run = Run(tmp_path, f"echo {READY}; sleep 200")
    info = run.wait_ready()
    assert _alive(info["watchdog_pid"])  # type: ignore[arg-type]
    run.proc.kill()
    run.finish()
    _assert_nothing_left(info, within=120)


def test_keep_and_state_dir_are_kept(tmp_path: Path) -> None:
    state = tmp_path / "state"
    run = Run(tmp_path, f"echo {READY}; exit 0", "--keep", "--state-dir", str(state))
    info = run.wait_ready()
    assert run.finish() == 0
    assert (state / "media").exists() and Path(str(info["run_dir"])).is_dir()
    assert list(state.glob("*.sock")) == []  # the backend's sockets go with it
    assert not any(_alive(p) for p in [info["qemu_pid"], *info["backend_pids"]])  # type: ignore[list-item]
    for view in info["views"]:  # type: ignore[attr-defined]
        Path(view).unlink()  # kept, as --keep asks: ours to remove now
    shutil.rmtree(str(info["run_dir"]))
    shutil.rmtree(str(info["tmp"]))
