"""Integration tests that boot real guests (TCG here, ~10 s each): `make test-vm`."""

from __future__ import annotations

import time

import pytest
from mktme_emu.errors import VmError
from mktme_emu.vm.boot import LaunchOptions, launch
from mktme_emu.vm.kernel import cache_dir, load_kernel
from mktme_emu.vm.launcher import EXIT_PANIC, PlainNvdimm, RunRequest, VmResult

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(load_kernel(cache_dir()) is None,
                       reason="no guest kernel: run `mktme-emu kernel fetch`"),
]

OPTS = LaunchOptions(nvdimm_size=128 << 20)


def run(*command: str, backend: PlainNvdimm | None = None) -> VmResult:
    backends = [backend] if backend else None
    request = RunRequest(command=command, timeout=120, boot_timeout=60)
    return launch(OPTS, request, backends)


def test_true_exits_0() -> None:
    result = run("true")
    assert (result.exit_code, result.boots, result.panicked) == (0, 1, False)


def test_false_exits_1() -> None:
    assert run("false").exit_code == 1


def test_panic_is_reported_fast() -> None:
    start = time.monotonic()
    result = run("sh", "-c", "echo c > /proc/sysrq-trigger; sleep 100")
    assert result.panicked and result.exit_code == EXIT_PANIC
    assert time.monotonic() - start < 40


def test_guest_sees_pmem_at_the_qmp_base(capfd: pytest.CaptureFixture[str]) -> None:
    backend = PlainNvdimm(128 << 20)
    try:
        result = run("sh", "-c", "test -b /dev/pmem0 && cat /sys/bus/nd/devices/region0/resource"
                     " /sys/bus/nd/devices/region0/size", backend=backend)
    finally:
        backend.close()
    assert result.exit_code == 0
    resource, region_size = capfd.readouterr().out.split()[-2:]
    assert backend.bases == result.bases and len(backend.bases) == 1
    assert int(resource, 16) == backend.bases[0]
    assert int(region_size) == 128 << 20


def test_guest_reboot_power_cycles_the_backend() -> None:
    backend = PlainNvdimm(128 << 20)
    try:
        result = run("sh", "-c", 'if [ "$MKTME_BOOT" = 0 ]; then reboot; fi; exit 7',
                     backend=backend)
    finally:
        backend.close()
    assert (result.exit_code, result.boots) == (7, 2)
    # RESET at the reboot (SeaBIOS may add one), SHUTDOWN at the final poweroff.
    assert backend.power_cycles >= 2


class BrokenPowerCycle(PlainNvdimm):
    """A backend whose power cycle fails (a host-side fault the run must not swallow)."""

    def power_cycle(self) -> None:
        raise OSError("the DIMM caught fire")


def test_a_failing_power_cycle_is_raised_not_lost() -> None:
    backend = BrokenPowerCycle(128 << 20)
    try:
        with pytest.raises(VmError, match="caught fire"):
            run("sh", "-c", "reboot; sleep 100", backend=backend)
    finally:
        backend.close()
