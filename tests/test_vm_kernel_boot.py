"""Boot a kernel given with --kernel/--modules (TCG, ~10 s): Debian's, as a user would pass it."""

from __future__ import annotations

import pytest
from mktme_emu.vm.boot import LaunchOptions, launch
from mktme_emu.vm.kernel import cache_dir, load_kernel
from mktme_emu.vm.launcher import RunRequest

KERNEL = load_kernel(cache_dir())
pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(KERNEL is None, reason="no guest kernel: run `mktme-emu kernel fetch`"),
]


def test_debian_vmlinuz_as_own_kernel_with_its_module_tree() -> None:
    assert KERNEL is not None
    opts = LaunchOptions(nvdimm_size=128 << 20, ns_mode="fsdax", kernel=KERNEL.vmlinuz,
                         modules=KERNEL.root, append=("mktme.test=own-kernel",))
    probe = ("cat /proc/cmdline; uname -r; ls /sys/bus/nd/devices; "
             "grep -c . /proc/modules; ls /dev/pmem0")
    result = launch(opts, RunRequest(command=("sh", "-c", probe), timeout=180, boot_timeout=120,
                                     echo=False, capture=True))
    assert result.exit_code == 0, result.console_tail
    assert "mktme.test=own-kernel" in result.output  # --append reached the kernel
    assert KERNEL.release in result.output
    assert "pfn" in result.output  # the fsdax namespace: its modules came from --modules
    assert "/dev/pmem0" in result.output
