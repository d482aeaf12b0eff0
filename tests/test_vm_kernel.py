"""Your own kernel without booting it: config parsing and checking, build trees, --gdb.

A fake build tree (a .config, a bzImage that is only a setup header) is
enough for everything before QEMU starts: the refusal of a kernel that lacks
options, the gdb line naming the tree's vmlinux, nokaslr and the stub's
address in the QEMU argv (``--dry-run``).
"""

from __future__ import annotations

import shlex
import struct
from pathlib import Path

import pytest
from mktme_emu.cli.main import main
from mktme_emu.errors import ConfigError
from mktme_emu.vm.bootkernel import image_version, modules_root, user_kernel
from mktme_emu.vm.initramfs import GUEST_MODULES, modules_to_load
from mktme_emu.vm.kconfig import REQUIREMENTS, check_config, config_from_modules, parse_config
from mktme_emu.vm.kernel import cache_dir, load_kernel

CONFIG = """\
#
# Automatically generated file; DO NOT EDIT.
CONFIG_64BIT=y
CONFIG_LOCALVERSION="-mktme"
CONFIG_NR_CPUS=64
CONFIG_EXT4_FS=m
# CONFIG_XFS_FS is not set
"""


def every_option(value: str = "y", without: tuple[str, ...] = ()) -> str:
    """A .config with every required option set to ``value``, except ``without``."""
    names = {o for need in REQUIREMENTS for o in need.options} - set(without)
    return "".join(f"CONFIG_{o}={value}\n" for o in sorted(names)) + \
        "".join(f"# CONFIG_{o} is not set\n" for o in without)


def fake_bzimage(path: Path, version: str = "6.9.0-mktme (dev@host) #1 SMP") -> Path:
    """Just the setup header: "HdrS" and the kernel_version pointer (enough for us, not QEMU)."""
    head = bytearray(0x1000)
    head[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", head, 0x20E, 0x300 - 0x200)
    head[0x300:0x300 + len(version) + 1] = version.encode() + b"\0"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(head))
    return path


def fake_tree(root: Path, config: str, vmlinux: bool = True) -> Path:
    """A build tree: bzImage, .config, vmlinux and a modules.builtin naming every guest module."""
    fake_bzimage(root / "arch/x86/boot/bzImage")
    (root / ".config").write_text(config)
    (root / "modules.builtin").write_text("".join(f"kernel/x/{m}.ko\n" for m in GUEST_MODULES))
    if vmlinux:
        (root / "vmlinux").write_bytes(b"\x7fELF")
    return root


# -- config parsing ----------------------------------------------------------------------------

def test_parse_config_reads_values_and_unset_options() -> None:
    config = parse_config(CONFIG, "test")
    assert config.options["64BIT"] == "y" and config.options["LOCALVERSION"] == "-mktme"
    assert config.options["NR_CPUS"] == "64" and config.options["XFS_FS"] == "n"
    assert config.enabled("EXT4_FS") and config.is_module("EXT4_FS")
    assert config.enabled("XFS_FS") is False
    assert config.enabled("NOT_MENTIONED") is False  # a full .config: absent means off


def test_config_inferred_from_modules_leaves_the_rest_unknown() -> None:
    config = config_from_modules({"ext4", "nfit"}, None, "modules")
    assert config.options == {"EXT4_FS": "m", "ACPI_NFIT": "m"}
    assert config.enabled("FS_DAX") is None  # no module tells about a bool option
    assert config.enabled("XFS_FS") is None  # without modules.builtin it may be built in
    listed = config_from_modules({"ext4", "nfit"}, {"virtio_pci"}, "modules")
    assert listed.options["VIRTIO_PCI"] == "y" and listed.options["XFS_FS"] == "n"
    assert listed.enabled("XFS_FS") is False and listed.enabled("FS_DAX") is None


def test_check_needs_any_one_filesystem_and_the_mode_options() -> None:
    ok = parse_config(every_option(without=("XFS_FS", "NVDIMM_DAX", "DEV_DAX_PMEM")), "t")
    assert check_config(ok, "fsdax").missing == ()
    missing = check_config(ok, "devdax").missing
    assert [need.options for need in missing] == [("NVDIMM_DAX",), ("DEV_DAX_PMEM",)]
    no_fs = parse_config(every_option(without=("XFS_FS", "EXT4_FS")), "t")
    assert [n.options for n in check_config(no_fs, None).missing] == [("EXT4_FS", "XFS_FS")]


def test_optional_option_warns_instead_of_refusing() -> None:
    config = parse_config(every_option(without=("PVPANIC_PCI",)), "t")
    result = check_config(config, "fsdax")
    assert result.missing == () and [n.options for n in result.optional_missing] == [("PVPANIC_PCI",)]


def test_modules_of_options_that_are_off_are_not_loaded() -> None:
    config = parse_config(every_option(value="m", without=("XFS_FS", "PVPANIC_PCI")), "t")
    load = modules_to_load(("pvpanic_pci", "ext4", "xfs", "some_new_module"), config)
    assert load == ["ext4", "some_new_module"]


def test_debian_kernel_config_passes_every_mode() -> None:
    kernel = load_kernel(cache_dir())
    if kernel is None:
        pytest.skip("no cached guest kernel")
    config = parse_config((kernel.root / "boot" / f"config-{kernel.release}").read_text(), "debian")
    for mode in (None, "fsdax", "devdax", "raw"):
        result = check_config(config, mode)
        assert (result.missing, result.optional_missing, result.unknown) == ((), (), ())


# -- images and trees ---------------------------------------------------------------------------

def test_image_version_reads_the_setup_header(tmp_path: Path) -> None:
    image = fake_bzimage(tmp_path / "bzImage", "6.9.0-x (a@b) #1")
    assert image_version(image) == "6.9.0-x (a@b) #1"
    (tmp_path / "junk").write_bytes(b"\0" * 4096)
    with pytest.raises(ConfigError, match="not an x86 bzImage"):
        image_version(tmp_path / "junk")


def test_modules_root_takes_install_tree_or_directory(tmp_path: Path) -> None:
    (tmp_path / "inst/lib/modules/6.9.0-mktme").mkdir(parents=True)
    assert modules_root(tmp_path / "inst", "6.9.0-mktme") == tmp_path / "inst/lib/modules/6.9.0-mktme"
    assert modules_root(tmp_path / "inst/lib/modules", "6.9.0-mktme").name == "6.9.0-mktme"
    with pytest.raises(ConfigError, match=r"has modules for 6\.9\.0-mktme, not for .* 6\.1\.0"):
        modules_root(tmp_path / "inst", "6.1.0")


def test_tree_without_config_or_image_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no arch/x86/boot/bzImage"):
        user_kernel(tmp_path)
    fake_bzimage(tmp_path / "arch/x86/boot/bzImage")
    with pytest.raises(ConfigError, match=r"no \.config"):
        user_kernel(tmp_path)


def test_tree_kernel_has_its_vmlinux_and_release(tmp_path: Path) -> None:
    tree = fake_tree(tmp_path / "linux", every_option())
    kernel = user_kernel(tree)
    assert kernel.release == "6.9.0-mktme" and kernel.vmlinux == tree / "vmlinux"
    assert kernel.debian_package is None
    assert f"target remote 127.0.0.1:1234' {tree / 'vmlinux'}" in kernel.gdb_hint(1234)


def test_bare_image_config_is_inferred_from_its_modules(tmp_path: Path) -> None:
    from mktme_emu.vm.bootkernel import select_kernel

    image = fake_bzimage(tmp_path / "boot" / "vmlinuz")
    tree = tmp_path / "inst" / "lib" / "modules" / "6.9.0-mktme"
    (tree / "kernel" / "fs").mkdir(parents=True)
    for module in ("ext4", "nfit", "9p"):
        (tree / "kernel" / "fs" / f"{module}.ko").write_bytes(b"")
    (tree / "modules.builtin").write_text("kernel/drivers/virtio/virtio_pci.ko\n")
    kernel = user_kernel(image, tmp_path / "inst")
    assert kernel.modules_dir == tree and kernel.config is not None
    assert not kernel.config.complete
    on = {o: v for o, v in kernel.config.options.items() if v != "n"}
    assert on == {"EXT4_FS": "m", "ACPI_NFIT": "m", "9P_FS": "m", "VIRTIO_PCI": "y"}
    # a module that is neither a file nor built in: refused, naming it
    with pytest.raises(ConfigError, match=r"CONFIG_VIRTIO_CONSOLE \(") as refused:
        select_kernel(image, tmp_path / "inst", tmp_path / "cache", "fsdax", print)
    assert "CONFIG_FS_DAX" not in str(refused.value)  # a bool option no module tells about
    for module in ("virtio_console", "9pnet", "9pnet_virtio", "overlay", "libnvdimm", "nd_pmem"):
        (tree / "kernel" / "fs" / f"{module}.ko").write_bytes(b"")
    said: list[str] = []
    select_kernel(image, tmp_path / "inst", tmp_path / "cache", "fsdax", said.append)
    assert any("cannot check" in s and "CONFIG_FS_DAX" in s for s in said), said


# -- the CLI, without booting -------------------------------------------------------------------

def dry_run(capsys: pytest.CaptureFixture[str], tmp_path: Path, *args: str) -> tuple[int, str, str]:
    code = main(["run", "--dry-run", "--plain", "--accel", "tcg", "--cache", str(tmp_path / "cache"),
                 *args, "--", "true"])
    out, err = capsys.readouterr()
    return code, out, err


def test_kernel_lacking_options_is_refused_with_every_reason(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    lacking = ("ACPI_NFIT", "FS_DAX", "9P_FS")
    tree = fake_tree(tmp_path / "linux", every_option(without=lacking))
    code, out, err = dry_run(capsys, tmp_path, "--kernel", str(tree), "--ns", "fsdax")
    assert code != 0 and out == ""
    lines = [line for line in err.splitlines() if "cannot run" in line]
    assert len(lines) == 1, err  # one message naming them all
    for option, why in (("ACPI_NFIT", "NFIT"), ("FS_DAX", "mount -o dax"), ("9P_FS", "9p")):
        assert f"CONFIG_{option} (" in lines[0] and why in lines[0]
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("initramfs-*"))


def test_gdb_with_a_build_tree_names_its_vmlinux(capsys: pytest.CaptureFixture[str],
                                                  tmp_path: Path) -> None:
    tree = fake_tree(tmp_path / "linux", every_option())
    code, out, err = dry_run(capsys, tmp_path, "--kernel", str(tree), "--gdb", "4567",
                             "--append", "loglevel=7 dyndbg=\"file nd_pmem.c +p\"")
    assert code == 0, err
    argv = shlex.split(out)
    assert argv[argv.index("-gdb") + 1] == "tcp:127.0.0.1:4567"
    assert argv[argv.index("-kernel") + 1] == str(tree / "arch/x86/boot/bzImage")
    cmdline = argv[argv.index("-append") + 1]
    assert " nokaslr " in f" {cmdline} "
    assert cmdline.endswith('loglevel=7 dyndbg="file nd_pmem.c +p"')  # last, so it wins
    hint = next(line for line in err.splitlines() if "gdb:" in line)
    command = shlex.split(hint.split("gdb: ", 1)[1])
    assert command == ["gdb", "-ex", "target remote 127.0.0.1:4567", str(tree / "vmlinux")]


def test_gdb_port_defaults_to_1234(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    tree = fake_tree(tmp_path / "linux", every_option(), vmlinux=False)
    code, out, err = dry_run(capsys, tmp_path, "--kernel", str(tree), "--gdb")
    argv = shlex.split(out)
    assert code == 0 and argv[argv.index("-gdb") + 1] == "tcp:127.0.0.1:1234"
    assert "VMLINUX" in err  # no vmlinux in the tree: no path that is not there
    assert argv[argv.index("-smp") + 1] == "1"  # TCG: one vCPU unless asked


def test_cpus_option_overrides_the_tcg_default(capsys: pytest.CaptureFixture[str],
                                                tmp_path: Path) -> None:
    tree = fake_tree(tmp_path / "linux", every_option())
    code, out, _ = dry_run(capsys, tmp_path, "--kernel", str(tree), "--cpus", "2")
    argv = shlex.split(out)
    assert code == 0 and argv[argv.index("-smp") + 1] == "2"


def test_gdb_with_debian_kernel_points_at_the_dbg_package(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    kernel = load_kernel(cache_dir())
    if kernel is None:
        pytest.skip("no cached guest kernel")
    code, out, err = dry_run(capsys, tmp_path, "--kernel", str(kernel.vmlinuz),
                             "--modules", str(kernel.root), "--gdb")
    assert code == 0, err
    hint = next(line for line in err.splitlines() if "gdb:" in line)
    assert f"linux-image-{kernel.release}-dbg" in hint
    assert "not checked" not in err and "cannot check" not in err  # found boot/config-R beside it
    assert "nokaslr" in shlex.split(out)[shlex.split(out).index("-append") + 1]


# -- direct (PVH) boot ---------------------------------------------------------------------------

def test_debian_bzimage_unpacks_to_a_pvh_elf(tmp_path: Path) -> None:
    from mktme_emu.vm.pvh import direct_boot_image, extract_elf, has_pvh_entry

    kernel = load_kernel(cache_dir())
    if kernel is None:
        pytest.skip("no cached guest kernel")
    elf = extract_elf(kernel.vmlinuz.read_bytes())
    assert elf is not None and elf.startswith(b"\x7fELF") and has_pvh_entry(elf)
    image = direct_boot_image(kernel.vmlinuz, "0" * 64, tmp_path, lambda _: None)
    assert image is not None and image.read_bytes() == elf


def test_image_without_payload_boots_as_bzimage(tmp_path: Path) -> None:
    from mktme_emu.vm.pvh import direct_boot_image, has_pvh_entry

    said: list[str] = []
    image = fake_bzimage(tmp_path / "bzImage")
    assert direct_boot_image(image, "1" * 64, tmp_path / "cache", said.append) is None
    assert said and "booting the bzImage" in said[0]
    assert direct_boot_image(image, "1" * 64, tmp_path / "cache", said.append) is None
    assert len(said) == 1  # the verdict is remembered
    assert not has_pvh_entry(b"\x7fELF not really")
