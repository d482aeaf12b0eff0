"""Issue 8's data-loss bugs 2 and 3 and the view and journal holes, against a real ``serve``.

Each test reproduces what a user saw with the old code:
- a metadata file cut short on a full disk, ``serve`` exiting 0 (RLIMIT_FSIZE
  on the serve process stands in for the full disk);
- two backends on one state directory (or one view);
- a truncated or deleted view killing the backend with SIGBUS;
- a crafted journal record growing the media to 1 TiB.
"""

from __future__ import annotations

import os
import resource
import signal
import struct
import time
import zlib

import pytest
from backend_helpers import PAGE, Backends, cli, mktme_emu_command, program_user, remote_error
from mktme_emu.errors import ErrorCode, RemoteError

LIMIT = 8192  # below the metadata file of an 8M device (2,048 pages x 10 bytes)


@pytest.fixture
def backends(tmp_path):
    with Backends(tmp_path) as pool:
        yield pool


def ignore_sigxfsz() -> None:
    """In the child: a write past RLIMIT_FSIZE fails with EFBIG instead of killing."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def full_disk() -> None:
    ignore_sigxfsz()
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


def last_line(text: str) -> str:
    """The line main() printed last (the log's lines all start with "mktme-emu: ")."""
    return text.strip().splitlines()[-1]


def test_serve_never_exits_0_after_a_failed_persist_and_keeps_the_old_metadata(backends):
    """Old code: the short metadata was renamed over the good one, serve exited 0, and
    the next start refused with a checksum mismatch (every KeyID and tweak lost)."""
    b = backends(size="8M", start=False)
    b.start(preexec=ignore_sigxfsz)
    c = b.client()
    program_user(c, 1, os.urandom(16), os.urandom(16))
    c.map(0, 4 * PAGE, 1)
    metadata = b.metadata_path.read_bytes()
    resource.prlimit(b.proc.pid, resource.RLIMIT_FSIZE, (LIMIT, LIMIT))  # the disk fills up
    code = b.stop(expect=None)
    assert code != 0, "serve reported success although it could not persist"
    log = b.log_text()
    assert "Traceback" not in log
    assert last_line(log).startswith("mktme-emu: writing back at exit failed: File too large"), log
    assert b.metadata_path.read_bytes() == metadata
    assert not (b.state_dir / "metadata.tmp").exists()

    # A start while the disk is still full says so in one line and changes nothing.
    with pytest.raises(AssertionError, match="serve exited with 1 while starting"):
        b.start(preexec=full_disk)
    assert "Traceback" not in b.log_text()
    line = last_line(b.logs[-1].read_text())
    assert line.startswith(f"mktme-emu: cannot open the device in {b.state_dir}"), line
    assert "File too large" in line and "disk is full" in line, line
    assert b.metadata_path.read_bytes() == metadata

    b.start()  # space again: everything is still there
    assert [r.keyid for r in b.client().inspect(0, 4)] == [1] * 4


def test_a_second_serve_on_a_state_directory_or_a_view_is_refused(backends, tmp_path):
    """Old code: the second serve took over the sockets and both wrote back over each other."""
    b = backends()
    c = b.client()
    b.write(0, b"FIRST!!!")
    before = b.state_files()
    run = cli("serve", "--state-dir", str(b.state_dir), "--view", str(tmp_path / "other.view"),
              timeout=30)
    assert run.returncode == 1
    assert run.stderr.strip() == (f"mktme-emu: state directory {b.state_dir} is in use by "
                                  f"another backend (pid {b.proc.pid}); stop it first, or use "
                                  "another state directory")
    run = cli("serve", "--state-dir", str(tmp_path / "other-state"), "--view", str(b.view_path),
              timeout=30)
    assert run.returncode == 1
    assert f"view {b.view_path} is in use by another backend (pid {b.proc.pid})" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    assert b.state_files() == before
    assert c.flush() == 1 and b.media(0, 8) == b"FIRST!!!"  # the first one still serves
    assert b.admin_socket.exists()


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_truncated_or_deleted_view_is_an_error_not_a_sigbus(backends, damage):
    """Old code: the first flush after a truncation killed serve with SIGBUS, nothing logged."""
    b = backends()
    c = b.client()
    if damage == "truncate":
        os.truncate(b.view_path, PAGE)
    else:
        os.unlink(b.view_path)
    for request in (c.flush, lambda: c.map(0, PAGE, 0), lambda: c.inspect(0, 1)):
        with pytest.raises(RemoteError):
            request()
    assert b.running, "the backend died"
    assert ("truncated to 4096 bytes" if damage == "truncate" else "was deleted") in b.log_text()
    assert b.stop(expect=None) != 0  # it could not write back at exit: never a silent 0
    assert "Traceback" not in b.log_text()
    b._map = None  # our own mapping of the old view is stale


def test_a_crafted_journal_record_is_refused_and_the_media_keeps_its_size(backends):
    """Old code: replaying a record for offset 1 TiB - 4K grew the media to 1 TiB."""
    b = backends()
    b.stop()
    index = struct.pack("<Q", (1 << 40) - PAGE)
    body = index + b"\xee" * PAGE
    head = struct.pack("<QQIIQ", 0x4C4E524A4D544B4D, 9, 1, zlib.crc32(body), 0)
    (b.state_dir / "journal").write_bytes(head + body)
    began = time.monotonic()
    run = cli(*b.command()[len(mktme_emu_command()):], timeout=30)
    assert run.returncode == 1, run
    assert "journal record writes a page at 0xfffffff000" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr
    assert b.media_path.stat().st_size == b.size
    assert time.monotonic() - began < 30


def test_map_onto_a_keyid_lost_in_a_restart_is_refused_and_flush_reports_nothing_lost(backends):
    b = backends()
    c = b.client()
    program_user(c, 1, os.urandom(16), os.urandom(16))
    c.map(0, 2 * PAGE, 1)
    b.restart()
    c = b.client()
    with remote_error(ErrorCode.NO_KEY):
        c.map(16 * PAGE, PAGE, 1)
    assert [r.keyid for r in c.inspect(16 * PAGE, 1)] == [0]
    assert [r.locked for r in c.inspect(0, 3)] == [True, True, False]

