"""Lint and type checks run as tests, so `make test` (and CI) catches them too."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (make setup installs it)")
    return found


def test_ruff_is_clean() -> None:
    result = subprocess.run([_tool("ruff"), "check", "emulator", "guest", "tests", "bench"],
                            cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_is_clean(tmp_path: Path) -> None:
    """Checked under their import names, so the guest's imports of mktme_emu resolve.

    The folders map to the packages through setuptools' package-dir, which
    mypy cannot follow: checking the folders as such typed every mktme_emu
    name the guest uses as Any.  Links named after the packages fix that.
    """
    for package, folder in (("mktme_emu", "emulator"), ("mktme_guest", "guest")):
        (tmp_path / package).symlink_to(ROOT / folder, target_is_directory=True)
    result = subprocess.run([_tool("mypy"), "--config-file", str(ROOT / "pyproject.toml"),
                             "--cache-dir", str(ROOT / ".mypy_cache"),
                             "-p", "mktme_emu", "-p", "mktme_guest"],
                            cwd=tmp_path, env={**os.environ, "MYPYPATH": str(tmp_path)},
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
