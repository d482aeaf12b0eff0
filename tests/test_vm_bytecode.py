"""The launcher leaves fresh bytecode for the guest (vm/bytecode.py), without booting.

The guest cannot write a ``__pycache__`` (its root is the host's, read-only),
so without the host's bytecode every ``mktme-guest`` call compiles its modules
from source.  These tests run under PYTHONDONTWRITEBYTECODE=1, as CI does.
"""

from __future__ import annotations

import importlib.util
import os
import struct
import subprocess
import sys
from pathlib import Path

import mktme_emu
import mktme_guest
import pytest
from mktme_emu.vm.bytecode import compile_packages, guest_package_dirs, prepare_guest_bytecode


def fresh_pyc(source: Path) -> bool:
    """Whether the interpreter would load ``source``'s cached bytecode (timestamp pyc, level 0)."""
    cached = Path(importlib.util.cache_from_source(str(source)))
    if not cached.exists():
        return False
    header = cached.read_bytes()[:16]
    magic, flags, mtime, size = struct.unpack("<4sLLL", header)
    stat = source.stat()
    return (magic == importlib.util.MAGIC_NUMBER and flags == 0
            and mtime == int(stat.st_mtime) & 0xFFFF_FFFF and size == stat.st_size & 0xFFFF_FFFF)


@pytest.fixture
def package(tmp_path: Path) -> Path:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text("VALUE = 1\n")
    (pkg / "sub" / "deep.py").write_text("def f() -> int:\n    return 2\n")
    return pkg


def test_compiles_every_module_even_when_python_would_not(package: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1")  # would make py_compile write hash-based pycs
    sources = [package / "__init__.py", package / "mod.py", package / "sub" / "deep.py"]
    assert not any(fresh_pyc(s) for s in sources)
    assert compile_packages([package]) is True
    assert all(fresh_pyc(s) for s in sources)


def test_a_changed_module_is_compiled_again_the_others_left_alone(package: Path) -> None:
    compile_packages([package])
    kept = Path(importlib.util.cache_from_source(str(package / "__init__.py")))
    kept_mtime = kept.stat().st_mtime_ns
    mod = package / "mod.py"
    mod.write_text("VALUE = 22\n")
    os.utime(mod, (mod.stat().st_atime + 5, mod.stat().st_mtime + 5))
    assert not fresh_pyc(mod)
    compile_packages([package])
    assert fresh_pyc(mod) and kept.stat().st_mtime_ns == kept_mtime


def test_a_package_it_cannot_write_is_left_alone_silently(package: Path,
                                                          capfd: pytest.CaptureFixture[str]) -> None:
    (package / "__pycache__").write_text("not a directory")  # stops even root, unlike chmod
    assert compile_packages([package, package.parent / "missing"]) is False
    assert capfd.readouterr() == ("", "")  # nothing on the launcher's stdout or stderr
    assert fresh_pyc(package / "sub" / "deep.py")  # what it can write, it still writes


def test_boot_preparation_leaves_fresh_bytecode_for_the_guest_modules() -> None:
    dirs = guest_package_dirs()
    assert dirs == (Path(mktme_emu.__file__).resolve().parent,
                    Path(mktme_guest.__file__).resolve().parent)
    prepare_guest_bytecode()
    for module in ("mktme_guest/cli.py", "mktme_guest/channel.py", "mktme_emu/protocol/client.py",
                   "mktme_emu/protocol/messages.py", "mktme_emu/vocabulary.py"):
        package, _, rest = module.partition("/")
        source = dirs[package == "mktme_guest"] / rest
        assert fresh_pyc(source), source


def test_the_guest_interpreter_loads_that_bytecode_without_writing() -> None:
    # What the guest does: import with bytecode writing off (-B); -v says where code came from.
    prepare_guest_bytecode()
    out = subprocess.run([sys.executable, "-B", "-v", "-c", "import mktme_guest.cli"],
                         capture_output=True, text=True, check=True, timeout=60)
    cached = importlib.util.cache_from_source(str(Path(mktme_guest.__file__).parent / "cli.py"))
    assert f"code object from '{cached}'" in out.stderr
