"""Tests for ``mktme-emu xts``: stdin to stdout, run as a real subprocess.

It must reproduce the IEEE 1619 vectors from the command line and agree with
the independent per-unit reference, with the key inline (concatenated or
DATAKEY:TWEAKKEY) or in a file, with either tweak step; a bad key or input
exits non-zero with one line on stderr, nothing on stdout, and never the key.
It streams: 512 MiB through a pipe in at most 64 MiB of memory.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from backend_helpers import xts_fast, xts_reference
from test_crypto import IEEE1619_VECTORS, MASK64, Vector, carry_base, random_key, reference_xts


def _command() -> list[str]:
    script = Path(sys.executable).with_name("mktme-emu")
    if script.exists():
        return [str(script)]
    found = shutil.which("mktme-emu")
    assert found, "the mktme-emu console script is not installed (make venv)"
    return [found]


MKTME_EMU = _command()


def xts(*args: str, data: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*MKTME_EMU, "xts", *args], input=data, capture_output=True,
                          timeout=120, check=False)


def assert_ok(result: subprocess.CompletedProcess[bytes]) -> bytes:
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout


# Every command line this module runs, by name.  Each run pays the interpreter's
# start-up, so they all start together, once, in the fixture below.
RUNS: dict[str, tuple[list[str], bytes]] = {}

for _vec in IEEE1619_VECTORS:
    _common = ["--key", _vec.key, "--tweak-base", hex(_vec.sequence), "--unit", str(_vec.unit)]
    RUNS[f"encrypt {_vec.name}"] = (["--encrypt", *_common], bytes.fromhex(_vec.pt))
    RUNS[f"decrypt {_vec.name}"] = (["--decrypt", *_common], bytes.fromhex(_vec.ct))

_rng = random.Random("cli")
DEFAULT_KEY = random_key(_rng, 32)
DEFAULT_BASE = carry_base(_rng, 64, 5, _rng.getrandbits(64))
DEFAULT_PT = _rng.randbytes(64 * 11)
RUNS["default unit"] = (["--encrypt", "--key", DEFAULT_KEY.hex(), "--tweak-base", str(DEFAULT_BASE)],
                        DEFAULT_PT)
RUNS["empty"] = (["--encrypt", "--key", DEFAULT_KEY.hex(), "--tweak-base", "0"], b"")

# Over 4 MiB, so the range is split across the pool's workers; the 2^128 wrap falls inside.
LARGE_UNIT = 4096
LARGE_KEY = random_key(_rng, 64)
LARGE_LEN = 4 * 1024 * 1024 + 3 * LARGE_UNIT
LARGE_BASE = carry_base(_rng, LARGE_UNIT, LARGE_LEN // LARGE_UNIT // 2, MASK64)
LARGE_PT = _rng.randbytes(LARGE_LEN)
LARGE_CT = reference_xts(LARGE_KEY, LARGE_PT, LARGE_BASE, LARGE_UNIT)
_large = ["--key", LARGE_KEY.hex(), "--tweak-base", hex(LARGE_BASE), "--unit", "4K"]
RUNS["large encrypt"] = (["--encrypt", *_large], LARGE_PT)
RUNS["large decrypt"] = (["--decrypt", *_large], LARGE_CT)

# The DATAKEY:TWEAKKEY form and a key file give what the concatenated form gives.
COLON_KEY = random_key(_rng, 64)
COLON_PT = _rng.randbytes(64 * 9)
COLON_TEXT = f"{COLON_KEY[:32].hex()}:{COLON_KEY[32:].hex()}"
RUNS["colon key"] = (["--encrypt", "--key", COLON_TEXT, "--tweak-base", "0x140000000"], COLON_PT)
KEY_FILE = Path(os.environ.get("TMPDIR", "/tmp")) / f"mktme-test-xts-{os.getpid()}.key"
RUNS["key file"] = (["--encrypt", "--key-file", str(KEY_FILE), "--tweak-base", "0x140000000"],
                    COLON_PT)

# Data unit numbers: unit i uses tweak base + i (fscrypt IV_INO_LBLK_64 with 4096-byte units).
DUN_KEY = random_key(_rng, 32)
DUN_BASE = (7 << 32) | 0xFFFF_FFFE  # the unit number carries into the inode half
DUN_PT = _rng.randbytes(4096 * 5)
DUN_CT = xts_reference(DUN_KEY, DUN_PT, [DUN_BASE + i for i in range(5)], 4096)
_dun = ["--key", DUN_KEY.hex(), "--tweak-base", hex(DUN_BASE), "--unit", "4096", "--tweak-step", "dun"]
RUNS["dun encrypt"] = (["--encrypt", *_dun], DUN_PT)
RUNS["dun decrypt"] = (["--decrypt", *_dun], DUN_CT)

# Several stream chunks (2 MiB each at 64-byte units) and a partial last unit after them.
MULTI_KEY = random_key(_rng, 32)
MULTI_PT = _rng.randbytes(5 * 1024 * 1024 + 64 * 3)
MULTI_CT = xts_fast(MULTI_KEY, MULTI_PT, 0x1_0000_0000, 64)
RUNS["multi chunk"] = (["--encrypt", "--key", MULTI_KEY.hex(), "--tweak-base", "0x100000000"],
                       MULTI_PT)
RUNS["partial after chunks"] = (["--encrypt", "--key", MULTI_KEY.hex(), "--tweak-base",
                                 "0x100000000"], MULTI_PT + bytes(10))

SECRET_HEX = "a1b2c3d4e5f60718293a4b5c6d7e8f900f1e2d3c4b5a69788796a5b4c3d2e1f0"
REFUSALS = {
    "odd-hex": (["--key", SECRET_HEX[:-1]], bytes(64)),
    "not-hex": (["--key", "zz" + SECRET_HEX[2:]], bytes(64)),
    "16-bytes": (["--key", SECRET_HEX[:32]], bytes(64)),
    "48-bytes": (["--key", SECRET_HEX + SECRET_HEX[:32]], bytes(64)),
    "33-bytes": (["--key", SECRET_HEX + "00"], bytes(64)),
    "equal-halves": (["--key", SECRET_HEX[:32] * 2], bytes(64)),
    "partial-unit": (["--key", SECRET_HEX], bytes(60)),
    "unit-48": (["--key", SECRET_HEX, "--unit", "48"], bytes(96)),
    "unit-8192": (["--key", SECRET_HEX, "--unit", "8192"], bytes(8192)),
    "colon-equal-halves": (["--key", f"{SECRET_HEX[:32]}:{SECRET_HEX[:32]}"], bytes(64)),
    "colon-uneven": (["--key", f"{SECRET_HEX[:32]}:{SECRET_HEX}"], bytes(64)),
    "colon-short": (["--key", f"{SECRET_HEX[:30]}:{SECRET_HEX[32:62]}"], bytes(64)),
    "colon-not-hex": (["--key", f"{SECRET_HEX[:32]}:zz{SECRET_HEX[34:64]}"], bytes(64)),
    "key-file-stdin": (["--key-file", "-"], bytes(64)),
    "key-file-missing": (["--key-file", f"/nonexistent/{SECRET_HEX}"], bytes(64)),
    "tweak-step": (["--key", SECRET_HEX, "--tweak-step", "bytes"], bytes(64)),
}
for _name, (_args, _data) in REFUSALS.items():
    RUNS[f"refuse encrypt {_name}"] = (["--encrypt", "--tweak-base", "0", *_args], _data)
for _name in ("odd-hex", "48-bytes", "partial-unit"):
    _args, _data = REFUSALS[_name]
    RUNS[f"refuse decrypt {_name}"] = (["--decrypt", "--tweak-base", "0", *_args], _data)


@pytest.fixture(scope="module")
def runs() -> dict[str, subprocess.CompletedProcess[bytes]]:
    KEY_FILE.write_text(COLON_TEXT + "\n")
    try:
        return _run_all()
    finally:
        KEY_FILE.unlink()


def _run_all() -> dict[str, subprocess.CompletedProcess[bytes]]:
    with ThreadPoolExecutor(max_workers=2 * (os.cpu_count() or 1)) as pool:
        futures = {name: pool.submit(xts, *args, data=data) for name, (args, data) in RUNS.items()}
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("vec", IEEE1619_VECTORS, ids=lambda v: v.name)
def test_vector_encrypt_decrypt(runs: dict[str, subprocess.CompletedProcess[bytes]], vec: Vector) -> None:
    assert assert_ok(runs[f"encrypt {vec.name}"]) == bytes.fromhex(vec.ct)
    assert assert_ok(runs[f"decrypt {vec.name}"]) == bytes.fromhex(vec.pt)


def test_decimal_tweak_base_and_default_unit(runs: dict[str, subprocess.CompletedProcess[bytes]]) -> None:
    assert assert_ok(runs["default unit"]) == reference_xts(DEFAULT_KEY, DEFAULT_PT, DEFAULT_BASE, 64)


def test_empty_input(runs: dict[str, subprocess.CompletedProcess[bytes]]) -> None:
    assert assert_ok(runs["empty"]) == b""


def test_large_input_matches_reference(runs: dict[str, subprocess.CompletedProcess[bytes]]) -> None:
    assert assert_ok(runs["large encrypt"]) == LARGE_CT
    assert assert_ok(runs["large decrypt"]) == LARGE_PT


@pytest.mark.parametrize("name", [name for name in RUNS if name.startswith("refuse ")])
def test_refusal_is_one_line(runs: dict[str, subprocess.CompletedProcess[bytes]], name: str) -> None:
    result = runs[name]
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode != 0
    assert result.stdout == b""
    assert len(stderr.strip().splitlines()) == 1, stderr
    lowered = stderr.lower()
    for start in range(0, len(SECRET_HEX) - 12 + 1, 2):
        assert SECRET_HEX[start:start + 12] not in lowered, stderr


def test_key_forms_and_key_file_agree(runs: dict[str, subprocess.CompletedProcess[bytes]]) -> None:
    expected = reference_xts(COLON_KEY, COLON_PT, 0x140000000, 64)
    assert assert_ok(runs["colon key"]) == expected
    assert assert_ok(runs["key file"]) == expected


def test_dun_tweak_step(runs: dict[str, subprocess.CompletedProcess[bytes]]) -> None:
    assert assert_ok(runs["dun encrypt"]) == DUN_CT
    assert assert_ok(runs["dun decrypt"]) == DUN_PT


def test_stream_over_several_chunks(runs: dict[str, subprocess.CompletedProcess[bytes]]) -> None:
    assert assert_ok(runs["multi chunk"]) == MULTI_CT
    partial = runs["partial after chunks"]
    assert partial.returncode == 1
    assert partial.stdout == MULTI_CT  # every whole unit before the partial one
    assert partial.stderr.decode().strip().splitlines() == [
        f"mktme-emu: the input ends with 10 bytes, not a whole 64-byte data unit "
        f"({len(MULTI_PT)} bytes before it were written)"]


def test_refusals_say_why(runs: dict[str, subprocess.CompletedProcess[bytes]]) -> None:
    said = {name: runs[f"refuse encrypt {name}"].stderr.decode() for name in REFUSALS}
    assert "the data key equals the tweak key" in said["colon-equal-halves"]
    assert "the data key equals the tweak key" in said["equal-halves"]
    assert "the data key has 16 bytes and the tweak key 32" in said["colon-uneven"]
    assert "must be 16 bytes (AES-XTS-128) or 32" in said["colon-short"]
    assert "not hexadecimal" in said["colon-not-hex"]
    assert "stdin carries the data" in said["key-file-stdin"]


# A child that feeds SIZE zero bytes through a pipe to the command, reads its output
# through a pipe, and reports its only child's peak RSS (RUSAGE_CHILDREN of a fresh
# process, so no other child of the test run is counted) and the output's head and tail.
STREAM_PROBE = r"""
import json, resource, subprocess, sys, threading
size, cmd = int(sys.argv[1]), sys.argv[2:]
proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
def feed():
    zeros = bytes(1 << 20)
    for _ in range(size >> 20):
        proc.stdin.write(zeros)
    proc.stdin.close()
threading.Thread(target=feed, daemon=True).start()
count, head, tail = 0, b"", b""
while chunk := proc.stdout.read(1 << 20):
    if len(head) < 4096:
        head += chunk[:4096 - len(head)]
    tail = (tail + chunk)[-4096:]
    count += len(chunk)
rc = proc.wait()
print(json.dumps({"rc": rc, "count": count, "head": head.hex(), "tail": tail.hex(),
                  "maxrss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""
STREAM_SIZE = 512 << 20
MAX_RSS = 64 << 20


@pytest.mark.parametrize("unit", [64, 4096])
def test_streams_512_mib_in_constant_memory(unit: int) -> None:
    key = random_key(random.Random(unit), 32)
    base = 0x1_4000_0000
    cmd = [*MKTME_EMU, "xts", "--encrypt", "--key", key.hex(), "--tweak-base", hex(base),
           "--unit", str(unit)]
    out = subprocess.run([sys.executable, "-c", STREAM_PROBE, str(STREAM_SIZE), *cmd],
                         capture_output=True, text=True, timeout=600, check=True).stdout
    report = json.loads(out)
    assert report["rc"] == 0 and report["count"] == STREAM_SIZE
    assert report["maxrss_kib"] * 1024 <= MAX_RSS, report["maxrss_kib"]
    assert bytes.fromhex(report["head"]) == reference_xts(key, bytes(4096), base, unit)
    tail_base = base + STREAM_SIZE - 4096
    assert bytes.fromhex(report["tail"]) == reference_xts(key, bytes(4096), tail_base, unit)


# -- the library function behind the command ---------------------------------------------------

class _FailingSink:
    """Takes the first write, then fails as a closed pipe does."""

    def __init__(self) -> None:
        self.writes = 0

    def write(self, data: memoryview) -> int:
        self.writes += 1
        if self.writes > 1:
            raise BrokenPipeError("reader went away")
        return len(data)


class _FailingSource:
    """Gives one chunk of zeros, then an I/O error."""

    def __init__(self) -> None:
        self.reads = 0

    def readinto(self, buffer: memoryview) -> int:
        self.reads += 1
        if self.reads > 1:
            raise OSError(5, "Input/output error")
        buffer[:] = bytes(len(buffer))
        return len(buffer)


def test_stream_api_matches_the_reference_in_both_steps() -> None:
    import io

    from mktme_emu.crypto import XtsKey
    from mktme_emu.xts_stream import TweakStep, xts_stream

    key = random_key(random.Random("api"), 32)
    plain = random.Random("api-data").randbytes(4096 * 3)
    for step, tweaks in ((TweakStep.ADDRESS, [0x1000 + i * 4096 for i in range(3)]),
                         (TweakStep.DUN, [0x1000 + i for i in range(3)])):
        out = io.BytesIO()
        count = xts_stream(XtsKey(key), io.BytesIO(plain), out, 0x1000, unit=4096, tweak_step=step)
        assert count == len(plain)
        assert out.getvalue() == xts_reference(key, plain, tweaks, 4096)


def test_stream_api_raises_the_errors_of_its_files() -> None:
    import io

    from mktme_emu.crypto import XtsKey
    from mktme_emu.xts_stream import xts_stream

    key = XtsKey(random_key(random.Random("err"), 32))
    with pytest.raises(BrokenPipeError):
        xts_stream(key, io.BytesIO(bytes(16 << 20)), _FailingSink(), 0)
    with pytest.raises(OSError, match="Input/output error"):
        xts_stream(key, _FailingSource(), io.BytesIO(), 0)


class _ChoppySource:
    """Hands its data out in reads of random sizes, as a pipe does."""

    def __init__(self, data: bytes, rng: random.Random) -> None:
        self.data, self.rng, self.offset = data, rng, 0

    def readinto(self, buffer: memoryview) -> int:
        n = min(len(buffer), len(self.data) - self.offset, self.rng.randint(1, 3 << 20))
        buffer[:n] = self.data[self.offset:self.offset + n]
        self.offset += n
        return n


@pytest.mark.parametrize("workers", [1, 2, 3, 4])
def test_stream_api_writes_every_chunk_in_order_whatever_the_workers(workers: int) -> None:
    """Chunks finish out of order on several workers; the output must not."""
    import io

    from mktme_emu.crypto import XtsKey
    from mktme_emu.xts_stream import stream_plan, xts_stream

    rng = random.Random(f"workers {workers}")
    unit = rng.choice([16, 64, 512, 4096])
    key = random_key(rng, rng.choice([32, 64]))
    chunk = stream_plan(unit, workers).chunk
    plain = rng.randbytes(5 * chunk + unit * rng.randint(1, 64))
    base = carry_base(rng, unit, len(plain) // unit, rng.getrandbits(64))
    out = io.BytesIO()
    count = xts_stream(XtsKey(key), _ChoppySource(plain, rng), out, base, unit=unit,
                       workers=workers)
    assert count == len(plain)
    assert out.getvalue() == xts_fast(key, plain, base, unit)
    back = io.BytesIO()
    xts_stream(XtsKey(key), io.BytesIO(out.getvalue()), back, base, encrypt=False, unit=unit,
               workers=workers)
    assert back.getvalue() == plain


def test_stream_api_dun_step_over_several_chunks_and_workers() -> None:
    import io

    from mktme_emu.crypto import XtsKey
    from mktme_emu.xts_stream import TweakStep, stream_plan, xts_stream

    rng = random.Random("dun chunks")
    key = random_key(rng, 64)
    chunk = stream_plan(4096, 2).chunk
    plain = rng.randbytes(2 * chunk + 3 * 4096)
    out = io.BytesIO()
    xts_stream(XtsKey(key), io.BytesIO(plain), out, 7, unit=4096, tweak_step=TweakStep.DUN,
               workers=2)
    tweaks = [7 + i for i in range(len(plain) // 4096)]
    assert out.getvalue() == xts_reference(key, plain, tweaks, 4096)


def test_stream_plan_keeps_its_buffers_in_budget() -> None:
    from mktme_emu.xts_stream import MAX_STREAM_WORKERS, STREAM_BUFFER_BUDGET, StreamPlan, stream_plan

    for cores in range(1, 65):
        plan = stream_plan(4096, cores, compiled=True)
        assert plan.workers == min(cores, MAX_STREAM_WORKERS)
        assert plan.chunk * plan.buffers <= STREAM_BUFFER_BUDGET
        assert plan.chunk % 4096 == 0 and plan.chunk >= 2 << 20
    # The numpy mask of small units needs the GIL: one worker, however many cores.
    assert stream_plan(64, 8, compiled=False) == StreamPlan(stream_plan(64, 1).chunk, 1)


def test_stream_api_stops_every_worker_after_an_error() -> None:
    import io
    import threading

    from mktme_emu.crypto import XtsKey
    from mktme_emu.xts_stream import stream_plan, xts_stream

    raw = random_key(random.Random("stop"), 32)
    key = XtsKey(raw)
    with pytest.raises(BrokenPipeError):
        xts_stream(key, io.BytesIO(bytes(64 << 20)), _FailingSink(), 0, workers=4)
    out = io.BytesIO()
    with pytest.raises(OSError, match="Input/output error"):
        xts_stream(key, _FailingSource(), out, 0, workers=4)
    assert out.getvalue() == xts_fast(raw, bytes(stream_plan(64, 4).chunk), 0, 64)  # all before the error
    for thread in threading.enumerate():
        if thread.name.startswith("xts-stream"):
            thread.join(timeout=10)
            assert not thread.is_alive(), thread.name


class _WouldBlockSource(_ChoppySource):
    """A non-blocking pipe with nothing in it yet on its second read."""

    def readinto(self, buffer: memoryview) -> int | None:  # type: ignore[override]
        if self.offset:
            return None
        return super().readinto(buffer)


class _StuckSink:
    """Takes nothing, as a full disk may answer a write."""

    def write(self, data: memoryview) -> int:
        return 0


def test_stream_api_refuses_inputs_and_outputs_that_would_block_or_stall() -> None:
    """A None from readinto is not the end of the input: cutting the output short
    there would lose data silently; a write taking nothing must not spin forever."""
    import io

    from mktme_emu.crypto import XtsKey
    from mktme_emu.xts_stream import xts_stream

    rng = random.Random("would block")
    key = XtsKey(random_key(rng, 32))
    with pytest.raises(BlockingIOError, match="the input would block"):
        xts_stream(key, _WouldBlockSource(rng.randbytes(12 << 20), rng), io.BytesIO(), 0)
    with pytest.raises(OSError, match="made no progress"):
        xts_stream(key, io.BytesIO(bytes(1 << 20)), _StuckSink(), 0)
