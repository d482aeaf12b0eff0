"""The README works when pasted: every command block in it runs as written.

Each code block of README.md (indented or fenced) runs with bash (``-e -o
pipefail``, so the first failing command fails the test) in a fresh
temporary directory, with the venv's ``bin`` on PATH, ``TMPDIR`` inside that
directory and a ``.venv`` link to the project's venv (so the README's
``. .venv/bin/activate`` works there as in the repository).  A block that
cannot run on the host says so in an HTML comment on the line before it::

    <!-- readme-test: vm (boots a VM) -->

with the kinds ``vm`` (boots a VM: covered by the VM tests), ``guest`` (runs
inside a VM), ``slow`` (takes minutes: ``make test``, ``make bench``; covered
by running them) and ``output`` (what a command prints).  Anything a block left
running is killed afterwards (and fails the test).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MARKER = re.compile(r"^<!--\s*readme-test:\s*(\w+)\b.*-->\s*$")
SKIP_KINDS = {"vm", "guest", "slow", "output"}
VENV = Path(sys.executable).parent.parent


@dataclass(frozen=True)
class Block:
    """One code block: where it is, the heading above it, its text, its marker kind."""

    line: int
    heading: str
    text: str
    kind: str

    @property
    def id(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.heading.lower()).strip("-")
        return f"{slug}-line{self.line}"


def readme_blocks(text: str) -> list[Block]:
    """Code blocks in order: 4-space indented blocks after a blank line, and ``` fences."""
    lines = text.splitlines()
    blocks: list[Block] = []
    heading, kind, i = "", "run", 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading, kind = line.lstrip("#").strip(), "run"
        elif match := MARKER.match(line):
            kind = match.group(1)
        if line.startswith("```"):
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            blocks.append(Block(i + 1, heading, "\n".join(lines[i + 1:end]), kind))
            kind, i = "run", end + 1
            continue
        if line.startswith("    ") and (i == 0 or not lines[i - 1].strip()):
            end = i
            while end < len(lines) and (lines[end].startswith("    ") or (
                    not lines[end].strip() and end + 1 < len(lines)
                    and lines[end + 1].startswith("    "))):
                end += 1
            body = "\n".join(raw[4:] for raw in lines[i:end])
            blocks.append(Block(i + 1, heading, body, kind))
            kind, i = "run", end
            continue
        if line.strip() and not MARKER.match(line):
            kind = "run" if not line.startswith("#") else kind
        i += 1
    return blocks


BLOCKS = readme_blocks(README.read_text())
RUNNABLE = [b for b in BLOCKS if b.kind == "run"]


def test_the_readme_has_blocks_to_run_and_every_marker_is_known() -> None:
    assert len(RUNNABLE) >= 2
    unknown = [(b.line, b.kind) for b in BLOCKS if b.kind not in SKIP_KINDS | {"run"}]
    assert not unknown, f"unknown readme-test kinds: {unknown}"


def test_the_readme_cites_only_the_projects_own_docs() -> None:
    text = README.read_text()
    assert "SPEC" not in text and "../shared" not in text
    for cited in set(re.findall(r"docs/[\w.-]+\.md", text)):
        assert (ROOT / cited).exists(), f"README cites {cited}, which is not in the repository"


def _processes_mentioning(text: str) -> list[int]:
    """Pids of processes whose command line contains ``text`` (what a block left running)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(int(entry.name))
    return found


def _still_running_after(text: str, grace: float) -> list[int]:
    """Processes mentioning ``text`` that are still there after ``grace`` seconds.

    A stopped backend removes its socket once everything is written back and
    exits a moment later: the grace period lets it, under load too.
    """
    deadline = time.monotonic() + grace
    while (found := _processes_mentioning(text)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return found


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_readme_block_runs_as_written(block: Block, tmp_path: Path) -> None:
    activate = VENV / "bin" / "activate"
    if not activate.exists():
        pytest.skip("the tests do not run from the project's venv (make setup)")
    work = tmp_path / "work"
    work.mkdir()
    (work / ".venv").symlink_to(VENV)
    env = {**os.environ, "PATH": f"{VENV / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}",
           "TMPDIR": str(tmp_path)}
    try:
        result = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block.text], cwd=work,
                                env=env, capture_output=True, text=True, timeout=300, check=False)
    finally:
        leftovers = _still_running_after(str(tmp_path), grace=10.0)
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)
    assert result.returncode == 0, (
        f"README line {block.line} failed with status {result.returncode}:\n{result.stderr[-2000:]}")
    assert not leftovers, f"README line {block.line} left processes running: {leftovers}"
