"""Fast tests of the VM layer (no QEMU guest): modules, cpio, argv, CLI dry-run."""

from __future__ import annotations

import asyncio
import shlex
import subprocess
import tempfile
from pathlib import Path

import pytest
from mktme_emu.errors import BackendUnreachable, ConfigError, MktmeError, RemoteError, VmError
from mktme_emu.protocol import Client
from mktme_emu.vm.emulated import EmulatedNvdimm, EmulatorOptions
from mktme_emu.vm.initramfs import Entry, cpio_newc, init_script
from mktme_emu.vm.kernel import cache_dir, load_kernel
from mktme_emu.vm.launcher import RunRequest, VmResult, command_script, power_cycle_waiting
from mktme_emu.vm.modules import ModuleInfo, resolve
from mktme_emu.vm.qemu import NvdimmSpec, VmConfig, parse_size, qemu_argv

DEPS = {"ext4": ("jbd2", "mbcache", "crc16"), "jbd2": (), "mbcache": (), "crc16": (),
        "nd_pmem": ("libnvdimm", "nd_btt"), "nd_btt": ("libnvdimm",), "libnvdimm": (),
        "loop_a": ("loop_b",), "loop_b": ("loop_a",), "needs_ghost": ("ghost",)}


def fake_loader(path: Path) -> ModuleInfo:
    return ModuleInfo(path.stem, path, DEPS[path.stem])


INDEX = {name: Path(f"/m/{name}.ko") for name in DEPS}


def names(wanted: list[str], builtin: frozenset[str] = frozenset()) -> list[str]:
    return [m.name for m in resolve(wanted, INDEX, builtin, loader=fake_loader)]


def test_dependencies_come_first_and_once() -> None:
    order = names(["nd_pmem", "ext4", "nd_btt"])
    assert order == ["libnvdimm", "nd_btt", "nd_pmem", "jbd2", "mbcache", "crc16", "ext4"]


def test_builtin_dependencies_are_satisfied() -> None:
    assert names(["ext4"], frozenset({"crc16"})) == ["jbd2", "mbcache", "ext4"]


def test_missing_module_is_named() -> None:
    with pytest.raises(VmError, match=r"ghost not found.*needed by needs_ghost"):
        names(["needs_ghost"])
    with pytest.raises(VmError, match="nonexistent"):
        names(["nonexistent"])


def test_cycle_is_an_error() -> None:
    with pytest.raises(VmError, match="cycle"):
        names(["loop_a"])


def test_cpio_is_newc_and_readable_by_cpio_tool(tmp_path: Path) -> None:
    archive = cpio_newc([Entry("bin", 0o40755), Entry("bin/hello", 0o100755, b"hi\n"),
                         Entry("bin/sh", 0o120777, b"hello")])
    assert archive.startswith(b"070701")
    listing = subprocess.run(["cpio", "-it"], input=archive, capture_output=True, check=True)
    assert listing.stdout.split() == [b"bin", b"bin/hello", b"bin/sh"]


def test_init_script_parses() -> None:
    script = init_script()
    subprocess.run(["busybox", "sh", "-n", "/dev/stdin"], input=script, check=True)


def test_parse_size() -> None:
    assert parse_size("256M") == 256 << 20
    assert parse_size("128K") == 128 << 10
    assert parse_size("4096") == 4096
    with pytest.raises(ConfigError):
        parse_size("lots")


def _config(tmp_path: Path, **kw: object) -> VmConfig:
    profile = Path(__file__).resolve().parents[1] / "qemu-configs" / "default.cfg"
    nv = NvdimmSpec(Path("/dev/shm/view with space"), 256 << 20, 128 << 10,
                    tmp_path / "ctl.sock")
    base = dict(kernel=tmp_path / "vmlinuz", initrd=tmp_path / "initrd", profile=profile,
                accel="tcg", run_dir=tmp_path, nvdimms=(nv,), memory=512 << 20)
    return VmConfig(**{**base, **kw})  # type: ignore[arg-type]


def test_argv_has_nvdimm_sizes_and_paused_start(tmp_path: Path) -> None:
    argv = qemu_argv(_config(tmp_path))
    assert "-S" in argv and argv[0] == "qemu-system-x86_64"
    total = (256 << 20) + (128 << 10)
    assert f"size={512 << 20}B,slots=1,maxmem={(512 << 20) + total}B" in argv
    obj = argv[argv.index("-object") + 1]
    assert obj == ("memory-backend-file,id=nvmem0,share=on,"
                   f"mem-path=/dev/shm/view with space,size={total}")
    assert "nvdimm,id=nvdimm0,memdev=nvmem0,label-size=131072" in argv
    assert f"socket,id=ctl0,path={tmp_path}/ctl.sock,reconnect=1" in argv
    assert "virtserialport,bus=vser.0,chardev=ctl0,name=org.mktme.control" in argv


def test_argv_rejects_unaligned_nvdimm(tmp_path: Path) -> None:
    bad = NvdimmSpec(Path("/dev/shm/x"), (256 << 20) + 4096)
    with pytest.raises(ConfigError, match="2M"):
        qemu_argv(_config(tmp_path, nvdimms=(bad,)))


def test_argv_gdb_listens_on_loopback_port(tmp_path: Path) -> None:
    argv = qemu_argv(_config(tmp_path, gdb_port=4321))
    assert argv[argv.index("-gdb") + 1] == "tcp:127.0.0.1:4321"
    assert "-gdb" not in qemu_argv(_config(tmp_path))


def test_command_script_survives_quoting() -> None:
    script = command_script(["printf", "%s|", "a b", "'q'", "$HOME", ""], cwd="/tmp/x y")
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, cwd="/")
    assert out.stdout == "a b|'q'|$HOME||"
    assert shlex.quote("/tmp/x y") in script


def test_exit_codes() -> None:
    assert VmResult(status=3).exit_code == 3
    assert VmResult(panicked=True, status=0).exit_code == 255
    assert VmResult().exit_code == 254
    assert VmResult(started=True, timed_out=True).exit_code == 253
    assert RunRequest().interactive is False


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Temporary and runtime directories of our own, to see what a command leaves there."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    return tmp_path


@pytest.mark.skipif(load_kernel(cache_dir()) is None, reason="no guest kernel cached")
def test_cli_dry_run_prints_quoted_argv_and_starts_nothing(
        capsys: pytest.CaptureFixture[str], private_tmp: Path) -> None:
    from mktme_emu.cli.main import main

    cache_before = sorted(cache_dir().iterdir())
    assert main(["boot", "--dry-run", "--accel", "tcg", "--nvdimm-size", "128M"]) == 0
    argv = shlex.split(capsys.readouterr().out)
    assert argv[0] == "qemu-system-x86_64" and "-S" in argv
    assert any(a.startswith("memory-backend-file") and a.endswith("size=134217728")
               for a in argv)
    assert "initramfs" in argv[argv.index("-initrd") + 1]
    # No backend (its temporary state folder), no run directory, no initramfs build.
    assert list(private_tmp.iterdir()) == []
    assert sorted(cache_dir().iterdir()) == cache_before


def test_refused_nvdimm_size_leaves_nothing_behind(private_tmp: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from mktme_emu.cli.main import main

    assert main(["run", "--nvdimm-size", "3M", "--", "true"]) == 1
    assert "multiple of 2M" in capsys.readouterr().err
    with pytest.raises(MktmeError):  # the backend itself refuses it too, and cleans up
        EmulatedNvdimm(EmulatorOptions(size=3 << 20))
    assert list(private_tmp.iterdir()) == []


def test_boot_help_has_no_command_and_shows_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    from mktme_emu.cli.main import main

    with pytest.raises(SystemExit):
        main(["boot", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "CMD" not in text and "command" not in text.split("options:")[0]
    assert "1..63" in text and "raw when new" in text
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "-- CMD ARGS" in capsys.readouterr().out


# -- a power cycle while a backend restarts -----------------------------------------------------

class RestartingBackend:
    """A backend whose socket refuses ``refusals`` times, then power-cycles (or fails)."""

    def __init__(self, refusals: int, then: Exception | None = None) -> None:
        self.refusals, self.then, self.calls = refusals, then, 0

    def power_cycle(self) -> None:
        self.calls += 1
        if self.calls <= self.refusals:
            raise BackendUnreachable("cannot connect to control.sock: Connection refused")
        if self.then is not None:
            raise self.then


def test_a_power_cycle_waits_for_a_restarting_backend_and_says_so_once() -> None:
    backend, said = RestartingBackend(refusals=3), []
    asyncio.run(power_cycle_waiting(backend.power_cycle, said.append, timeout=30))
    assert backend.calls == 4
    assert said == ["power cycle: cannot connect to control.sock: Connection refused; "
                    "waiting up to 30 s for it to come back"]


def test_a_power_cycle_gives_up_on_a_backend_that_stays_gone() -> None:
    backend, said = RestartingBackend(refusals=10**6), []
    with pytest.raises(BackendUnreachable):
        asyncio.run(power_cycle_waiting(backend.power_cycle, said.append, timeout=0.5))
    assert 2 <= backend.calls <= 5 and len(said) == 1


def test_a_power_cycle_does_not_retry_a_refusal() -> None:
    """Only a socket nobody listens on means "restarting"; a backend's own error ends it."""
    backend = RestartingBackend(refusals=0, then=RemoteError("power cycle failed", 3))
    with pytest.raises(RemoteError):
        asyncio.run(power_cycle_waiting(backend.power_cycle, print, timeout=30))
    assert backend.calls == 1


def test_a_socket_nobody_listens_on_is_unreachable(tmp_path: Path) -> None:
    with pytest.raises(BackendUnreachable, match="cannot connect to"):
        Client.connect(tmp_path / "control.sock", timeout=1)
