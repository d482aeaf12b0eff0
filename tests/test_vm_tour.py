"""The README's guest tour runs as written in an fsdax VM (the `make vm` shell)."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mktme_emu.vm.kernel import cache_dir, load_kernel

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(load_kernel(cache_dir()) is None,
                       reason="no guest kernel: run `mktme-emu kernel fetch`"),
]

README = Path(__file__).resolve().parents[1] / "README.md"
MAKEFILE = README.parent / "Makefile"


def tour() -> str:
    """The commands between the guest-tour markers, exactly as the README shows them."""
    match = re.search(r"<!-- guest-tour[^>]*-->\n(.*?)<!-- end guest-tour -->",
                      README.read_text(), re.DOTALL)
    assert match, "README has no guest-tour block"
    return textwrap.dedent(match.group(1))


def test_make_vm_boots_fsdax() -> None:
    recipe = MAKEFILE.read_text().split("\nvm:", 1)[1].split("\n\n", 1)[0]
    assert "boot --ns fsdax $(ARGS)" in recipe


def test_the_readme_tour_runs_in_an_fsdax_vm(tmp_path: Path) -> None:
    script = tour()
    assert "mount -o dax" in script and "map --file" in script
    argv = [sys.executable, "-m", "mktme_emu.cli.main", "run", "--ns", "fsdax",
            "--nvdimm-size", "128M", "--timeout", "500", "--", "sh", "-ec", script]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert out.stdout.count("PROG_SUCCESS") >= 1
    assert "pages written back" in out.stdout
    # inspect: the file's page is under KeyID 2, written back, and only the
    # view holds the plaintext (the media holds its ciphertext).
    # (byte 16 is what the page held before, read through the new key: garbage)
    view = b"hello, KeyID 2\n".hex()
    row = re.search(rf"^\s*0x[0-9a-f]+\s+2\s+\S+\s+consistent\s+{view}[0-9a-f]{{2}} ([0-9a-f]{{32}})$",
                    out.stdout, re.MULTILINE)
    assert row, out.stdout[-2000:]
    assert not row.group(1).startswith(view)
