"""Boot a kernel given with --kernel/--modules (TCG, ~10 s): Debian's, as a user would pass it."""

from __future__ import annotations

import pytest
from mktme_emu.vm import timeline
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
    # the launcher's phase timer saw every phase, in order, and init's kernel uptime
    names = [m.name for m in result.phases]
    assert names == [timeline.QEMU_STARTED, timeline.QMP_READY, timeline.GUEST_RUNNING,
                     timeline.INIT_HELLO, timeline.COMMAND_START, timeline.COMMAND_EXIT,
                     timeline.TEARDOWN]
    hello = result.phases[names.index(timeline.INIT_HELLO)]
    assert 0 < float(hello.detail.split()[0]) < hello.at - result.phases[0].at


def test_filesystems_load_when_first_mounted() -> None:
    # ext4 and xfs are not loaded at boot (they are most of init's time under TCG):
    # the kernel's request_module() loads them from the initramfs at the first mount.
    # (overlay is loaded on demand too, but init's own /tmp overlay asks for it at boot.)
    probe = ("set -e; for m in ext4 xfs; do "
             "grep -q \"^$m \" /proc/modules && echo LOADED-EARLY-$m; done; "
             "mkfs.ext4 -q -F -b 4096 /dev/pmem0; mkdir -p /mnt/a; mount -o dax /dev/pmem0 /mnt/a; "
             "echo hi >/mnt/a/f; cat /mnt/a/f; umount /mnt/a; "
             "mount -t xfs /dev/pmem0 /mnt/a 2>/dev/null || true; "
             "for m in ext4 xfs crc32c_generic; do "
             "grep -q \"^$m \" /proc/modules && echo ON-DEMAND-$m; done")
    opts = LaunchOptions(nvdimm_size=128 << 20, ns_mode="fsdax")
    result = launch(opts, RunRequest(command=("sh", "-c", probe), timeout=180, boot_timeout=120,
                                     echo=False, capture=True))
    assert result.exit_code == 0, result.output[-2000:]
    assert "LOADED-EARLY" not in result.output
    for module in ("ext4", "xfs", "crc32c_generic"):
        assert f"ON-DEMAND-{module}" in result.output, result.output[-2000:]
