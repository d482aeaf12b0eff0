"""Tests for the KeyID table (``mktme_emu.keytable``): the PCONFIG leaf and the TME policy.

Structs are built here byte by byte from SPEC section 3 (KEYID u16 at 0,
KEYID_CTRL u32 at 2, KEY_FIELD_1 at 64, KEY_FIELD_2 at 128), not with the
module's own packer, so a layout mistake on either side shows.  What a KeyID
does is observed from outside: its ``kind()`` and the ciphertext its
``cipher()`` gives for a fixed probe, compared with ciphertext computed from
the expected key bytes.
"""

from __future__ import annotations

import os
import random
import stat
from pathlib import Path

import pytest
from mktme_emu.crypto import XtsEngine, XtsKey, xts_encrypt
from mktme_emu.errors import ConfigError, KeyProgramError
from mktme_emu.keytable import (
    Algorithm,
    KeyCommand,
    KeyLostError,
    KeyProgram,
    KeyStatus,
    KeyTable,
    SlotKind,
    TmePolicy,
    build_program,
    parse_key_options,
)

# KEYID_CTRL values straight from SPEC section 3.
SET_KEY_DIRECT, SET_KEY_RANDOM, CLEAR_KEY, NO_ENCRYPT = 0, 1, 2, 3
CTRL_XTS_128, CTRL_XTS_256 = 0x100, 0x400
KEY_BYTES = {CTRL_XTS_128: 16, CTRL_XTS_256: 32}

PROBE = random.Random("probe").randbytes(64 * 4)
PROBE_TWEAK = 0x1234_5678_9ABC_DEF0_0000_0000_0000_0040

RNG = random.Random("keytable")
KEY_A = RNG.randbytes(64)  # a data key field
TWEAK_A = RNG.randbytes(64)  # a tweak key field
KEY_B, TWEAK_B = RNG.randbytes(64), RNG.randbytes(64)


def make_struct(keyid: int, ctrl: int, field_1: bytes = b"", field_2: bytes = b"") -> bytes:
    """A 192-byte MKTME_KEY_PROGRAM_STRUCT laid out by hand."""
    raw = bytearray(192)
    raw[0:2] = keyid.to_bytes(2, "little")
    raw[2:6] = ctrl.to_bytes(4, "little")
    raw[64:64 + len(field_1)] = field_1
    raw[128:128 + len(field_2)] = field_2
    return bytes(raw)


def expected_ct(key: bytes) -> bytes:
    return xts_encrypt(XtsKey(key), PROBE, PROBE_TWEAK, unit=64)


# One small engine for the many probes (xts_encrypt allocates a full-size engine per call).
_PROBE_ENGINE = XtsEngine(64, chunk=len(PROBE))


def probe(table: KeyTable, keyid: int) -> bytes | None:
    """The probe's ciphertext under this KeyID, or None when it is stored as is."""
    key = table.cipher(keyid)
    if key is None:
        return None
    out = bytearray(len(PROBE))
    _PROBE_ENGINE.encrypt_into(key, PROBE, out, PROBE_TWEAK)
    return bytes(out)


def snapshot(table: KeyTable) -> list[tuple[SlotKind, bytes | None]]:
    return [(table.kind(k), probe(table, k)) for k in range(table.keyid_count)]


def xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


class ScriptedRandom:
    """A deterministic entropy source that can be told to fail; it records what it gave."""

    def __init__(self, seed: str) -> None:
        self._rng = random.Random(seed)
        self.mode = "ok"
        self.given: list[bytes] = []

    def __call__(self, size: int) -> bytes:
        if self.mode == "oserror":
            raise OSError("no entropy today")
        data = self._rng.randbytes(size)
        if self.mode == "short":
            data = data[:-1]
        elif self.mode == "empty":
            data = b""
        self.given.append(data)
        return data


# -- constants -------------------------------------------------------------------


def test_status_codes_match_spec() -> None:
    assert {s.name: int(s) for s in KeyStatus} == {
        "PROG_SUCCESS": 0, "INVALID_PROG_CMD": 1, "ENTROPY_ERROR": 2,
        "INVALID_KEYID": 3, "INVALID_ENC_ALG": 4, "DEVICE_BUSY": 5}


def test_commands_and_algorithms_match_spec() -> None:
    assert [int(c) for c in (KeyCommand.SET_KEY_DIRECT, KeyCommand.SET_KEY_RANDOM,
                             KeyCommand.CLEAR_KEY, KeyCommand.NO_ENCRYPT)] == [0, 1, 2, 3]
    assert int(Algorithm.AES_XTS_128) << 8 == CTRL_XTS_128
    assert int(Algorithm.AES_XTS_256) << 8 == CTRL_XTS_256
    assert (Algorithm.AES_XTS_128.key_bytes, Algorithm.AES_XTS_256.key_bytes) == (16, 32)


# -- successful programming ------------------------------------------------------------


@pytest.mark.parametrize("alg", [CTRL_XTS_128, CTRL_XTS_256], ids=["xts128", "xts256"])
def test_set_key_direct(alg: int) -> None:
    n = KEY_BYTES[alg]
    table = KeyTable(tme=TmePolicy.EPHEMERAL)
    before = snapshot(table)
    # Bytes past the first n of each field are not part of the key.
    status = table.program(make_struct(5, SET_KEY_DIRECT | alg, KEY_A, TWEAK_A))
    assert status is KeyStatus.PROG_SUCCESS
    assert table.kind(5) is SlotKind.USER
    assert probe(table, 5) == expected_ct(KEY_A[:n] + TWEAK_A[:n])
    assert table.cipher(5).bits == 8 * n  # type: ignore[union-attr]
    after = snapshot(table)
    assert after[:5] + after[6:] == before[:5] + before[6:], "another KeyID changed"


def test_reprogram_replaces_key() -> None:
    table = KeyTable()
    assert table.program(make_struct(1, CTRL_XTS_128, KEY_A, TWEAK_A)) is KeyStatus.PROG_SUCCESS
    first = probe(table, 1)
    assert table.program(make_struct(1, CTRL_XTS_256, KEY_B, TWEAK_B)) is KeyStatus.PROG_SUCCESS
    assert probe(table, 1) == expected_ct(KEY_B[:32] + TWEAK_B[:32]) != first


@pytest.mark.parametrize("alg", [CTRL_XTS_128, CTRL_XTS_256], ids=["xts128", "xts256"])
def test_set_key_random_is_randomness_xor_entropy(alg: int) -> None:
    n = KEY_BYTES[alg]
    source = ScriptedRandom(f"random-{alg}")
    table = KeyTable(random=source)
    source.given.clear()
    status = table.program(make_struct(7, SET_KEY_RANDOM | alg, KEY_A, TWEAK_A))
    assert status is KeyStatus.PROG_SUCCESS
    assert table.kind(7) is SlotKind.RANDOM
    fresh = b"".join(source.given)
    assert len(fresh) == 2 * n
    assert probe(table, 7) == expected_ct(xor(fresh, KEY_A[:n] + TWEAK_A[:n]))


def test_set_key_random_fresh_every_time() -> None:
    """With the real os.urandom, the same entropy gives different keys, and not the entropy itself."""
    table = KeyTable()
    for keyid in (1, 2):
        raw = make_struct(keyid, SET_KEY_RANDOM | CTRL_XTS_128, KEY_A, TWEAK_A)
        assert table.program(raw) is KeyStatus.PROG_SUCCESS
    assert table.kind(2) is SlotKind.RANDOM
    assert probe(table, 1) != probe(table, 2)
    assert probe(table, 1) != expected_ct(KEY_A[:16] + TWEAK_A[:16])
    # Zero entropy is allowed and still gives a random key.
    assert table.program(make_struct(3, SET_KEY_RANDOM | CTRL_XTS_256)) is KeyStatus.PROG_SUCCESS
    assert probe(table, 3) not in (None, probe(table, 1), probe(table, 2))


@pytest.mark.parametrize("tme", [TmePolicy.BYPASS, TmePolicy.EPHEMERAL])
def test_clear_key_returns_to_tme(tme: TmePolicy) -> None:
    table = KeyTable(tme=tme)
    assert table.program(make_struct(3, SET_KEY_DIRECT | CTRL_XTS_128, KEY_A, TWEAK_A)) == 0
    assert probe(table, 3) is not None
    assert table.program(make_struct(3, CLEAR_KEY | CTRL_XTS_128)) is KeyStatus.PROG_SUCCESS
    assert table.kind(3) is SlotKind.TME
    assert probe(table, 3) == probe(table, 0)
    assert (probe(table, 3) is None) == (tme is TmePolicy.BYPASS)


def test_no_encrypt_stores_as_is() -> None:
    table = KeyTable(tme=TmePolicy.EPHEMERAL)
    assert table.program(make_struct(4, SET_KEY_DIRECT | CTRL_XTS_128, KEY_A, TWEAK_A)) == 0
    assert table.program(make_struct(4, NO_ENCRYPT | CTRL_XTS_256)) is KeyStatus.PROG_SUCCESS
    assert table.kind(4) is SlotKind.NO_ENCRYPT
    assert table.cipher(4) is None
    assert table.cipher(0) is not None  # while TME KeyIDs still encrypt


def test_prepare_changes_nothing_until_commit() -> None:
    table = KeyTable(tme=TmePolicy.EPHEMERAL)
    before = snapshot(table)
    prepared = table.prepare(make_struct(9, SET_KEY_DIRECT | CTRL_XTS_128, KEY_A, TWEAK_A))
    assert not isinstance(prepared, KeyStatus)
    assert snapshot(table) == before
    assert KEY_A[:8].hex() not in repr(prepared)
    table.commit(prepared)
    assert probe(table, 9) == expected_ct(KEY_A[:16] + TWEAK_A[:16])


# -- every failure status, and that it changes nothing ------------------------------------

def _direct(keyid: int = 1, ctrl: int = SET_KEY_DIRECT | CTRL_XTS_128) -> bytes:
    return make_struct(keyid, ctrl, KEY_B, TWEAK_B)


FAILURES: list[tuple[str, bytes, str, KeyStatus]] = [
    # (id, struct, entropy source mode, expected status)
    *[(f"unknown-command-{c:#x}", make_struct(1, c | CTRL_XTS_128, KEY_B, TWEAK_B), "ok",
       KeyStatus.INVALID_PROG_CMD) for c in (4, 0x7F, 0xFF)],
    *[(f"reserved-ctrl-{r:#x}", make_struct(1, (r << 24) | SET_KEY_DIRECT | CTRL_XTS_128, KEY_B, TWEAK_B),
       "ok", KeyStatus.INVALID_PROG_CMD) for r in (0x01, 0x80, 0xFF)],
    ("reserved-ctrl-clear", make_struct(1, (0x10 << 24) | CLEAR_KEY | CTRL_XTS_128), "ok",
     KeyStatus.INVALID_PROG_CMD),
    ("size-0", b"", "ok", KeyStatus.INVALID_PROG_CMD),
    ("size-191", _direct()[:191], "ok", KeyStatus.INVALID_PROG_CMD),
    ("size-193", _direct() + b"\0", "ok", KeyStatus.INVALID_PROG_CMD),
    ("size-384", _direct() * 2, "ok", KeyStatus.INVALID_PROG_CMD),
    ("equal-keys-128", make_struct(1, SET_KEY_DIRECT | CTRL_XTS_128, KEY_B, KEY_B), "ok",
     KeyStatus.INVALID_PROG_CMD),
    ("equal-keys-256", make_struct(1, SET_KEY_DIRECT | CTRL_XTS_256, TWEAK_B, TWEAK_B), "ok",
     KeyStatus.INVALID_PROG_CMD),
    # Only the first 16 bytes count under XTS-128: these halves are equal though the fields differ.
    ("equal-used-bytes-128", make_struct(1, SET_KEY_DIRECT | CTRL_XTS_128, KEY_B, KEY_B[:16] + TWEAK_B[16:]),
     "ok", KeyStatus.INVALID_PROG_CMD),
    *[(f"entropy-{mode}-{alg:#x}", make_struct(1, SET_KEY_RANDOM | alg, KEY_B, TWEAK_B), mode,
       KeyStatus.ENTROPY_ERROR)
      for mode in ("oserror", "short", "empty") for alg in (CTRL_XTS_128, CTRL_XTS_256)],
    *[(f"keyid-{k}-{name}", make_struct(k, ctrl, KEY_B, TWEAK_B), "ok", KeyStatus.INVALID_KEYID)
      for k in (0, 64, 65, 0xFFFF)
      for name, ctrl in (("direct", SET_KEY_DIRECT | CTRL_XTS_128), ("clear", CLEAR_KEY | CTRL_XTS_128),
                         ("no-encrypt", NO_ENCRYPT | CTRL_XTS_256))],
    *[(f"alg-{a:#x}-cmd{c}", make_struct(1, c | (a << 8), KEY_B, TWEAK_B), "ok", KeyStatus.INVALID_ENC_ALG)
      for a in (0, 0x5, 0x2, 0x8, 0x3, 0x100, 0x8000, 0xFFFF) for c in (SET_KEY_DIRECT, SET_KEY_RANDOM)],
    *[(f"alg-{a:#x}-cmd{c}", make_struct(1, c | (a << 8)), "ok", KeyStatus.INVALID_ENC_ALG)
      for a in (0, 0x5, 0x2) for c in (CLEAR_KEY, NO_ENCRYPT)],
]


@pytest.fixture
def busy_table() -> tuple[KeyTable, ScriptedRandom]:
    """An ephemeral table (so TME KeyIDs encrypt too) with KeyIDs 1..3 programmed."""
    source = ScriptedRandom("busy")
    table = KeyTable(tme=TmePolicy.EPHEMERAL, random=source)
    assert table.program(make_struct(1, SET_KEY_DIRECT | CTRL_XTS_128, KEY_A, TWEAK_A)) == 0
    assert table.program(make_struct(2, SET_KEY_RANDOM | CTRL_XTS_256, KEY_A, TWEAK_A)) == 0
    assert table.program(make_struct(3, NO_ENCRYPT | CTRL_XTS_128)) == 0
    return table, source


@pytest.mark.parametrize(("raw", "mode", "status"), [case[1:] for case in FAILURES],
                         ids=[case[0] for case in FAILURES])
def test_failed_program_changes_nothing(busy_table: tuple[KeyTable, ScriptedRandom], raw: bytes,
                                        mode: str, status: KeyStatus) -> None:
    table, source = busy_table
    before = snapshot(table)
    assert [kind for kind, _ in before[:4]] == [SlotKind.TME, SlotKind.USER, SlotKind.RANDOM,
                                                SlotKind.NO_ENCRYPT]
    source.mode = mode
    assert table.program(raw) is status
    source.mode = "ok"
    assert snapshot(table) == before
    assert probe(table, 1) == expected_ct(KEY_A[:16] + TWEAK_A[:16])


@pytest.mark.parametrize(("raw", "mode", "status"), [case[1:] for case in FAILURES],
                         ids=[case[0] for case in FAILURES])
def test_failed_program_on_unprogrammed_keyid(raw: bytes, mode: str, status: KeyStatus) -> None:
    """The same structs against a KeyID still in TME state (a failure must not 'program' it)."""
    source = ScriptedRandom("fresh")
    table = KeyTable(tme=TmePolicy.BYPASS, random=source)
    source.mode = mode
    assert table.program(raw) is status
    assert table.kind(1) is SlotKind.TME and table.cipher(1) is None


# -- KeyID range --------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [0, 16, -1, 64])
def test_keyid_bits_out_of_range(bits: int) -> None:
    with pytest.raises(ConfigError, match=str(bits)):
        KeyTable(keyid_bits=bits)


@pytest.mark.parametrize("bits", [1, 6, 15])
def test_keyid_bits_bounds(bits: int) -> None:
    table = KeyTable(keyid_bits=bits)
    top = (1 << bits) - 1
    assert table.keyid_count == 1 << bits
    assert table.program(make_struct(top, SET_KEY_DIRECT | CTRL_XTS_128, KEY_A, TWEAK_A)) == 0
    assert table.kind(top) is SlotKind.USER
    over = make_struct(top + 1, SET_KEY_DIRECT | CTRL_XTS_128, KEY_A, TWEAK_A)
    assert table.program(over) is KeyStatus.INVALID_KEYID
    assert table.program(make_struct(0, SET_KEY_DIRECT | CTRL_XTS_128, KEY_A, TWEAK_A)) \
        is KeyStatus.INVALID_KEYID


def test_default_keyid_bits_is_6() -> None:
    assert KeyTable().keyid_count == 64


# -- LOST keyslots (a key that died in a backend restart) ------------------------------------


@pytest.mark.parametrize("tme", [TmePolicy.BYPASS, TmePolicy.EPHEMERAL])
def test_restore_marks_used_keyids_with_lost_keys(tme: TmePolicy) -> None:
    table = KeyTable(tme=tme)
    kinds = [SlotKind.TME] * 64
    kinds[1], kinds[2], kinds[3], kinds[4] = (SlotKind.USER, SlotKind.RANDOM, SlotKind.NO_ENCRYPT,
                                              SlotKind.USER)
    lost = table.restore(kinds, in_use={0, 1, 2, 3, 7})  # KeyID 4 had a key, but no page uses it
    expected = [1, 2] if tme is TmePolicy.BYPASS else [0, 1, 2, 7]  # ephemeral: TME data is lost
    assert lost == expected == table.lost_keyids()
    assert [table.kind(k) for k in range(5)] == [SlotKind.TME, SlotKind.USER, SlotKind.RANDOM,
                                                SlotKind.NO_ENCRYPT, SlotKind.TME]
    assert table.slot_kinds()[:5] == [SlotKind.TME, SlotKind.USER, SlotKind.RANDOM,
                                     SlotKind.NO_ENCRYPT, SlotKind.TME]
    for keyid in expected:
        assert table.is_lost(keyid)
        with pytest.raises(KeyLostError):
            table.cipher(keyid)  # never "no key, so plaintext"
    assert table.cipher(3) is None and not table.is_lost(3)


def test_programming_or_a_power_cycle_ends_the_lost_state() -> None:
    table = KeyTable()
    kinds = [SlotKind.TME] * 64
    kinds[1] = kinds[2] = SlotKind.USER
    table.restore(kinds, in_use={1, 2})
    assert table.program(make_struct(1, SET_KEY_DIRECT | CTRL_XTS_128, KEY_A, TWEAK_A)) \
        is KeyStatus.PROG_SUCCESS
    assert table.lost_keyids() == [2] and table.cipher(1) is not None
    table.power_cycle()
    assert table.lost_keyids() == [] and table.cipher(2) is None


def test_wipe_zeroes_every_key_the_table_holds(tmp_path: Path) -> None:
    table = KeyTable(tme=TmePolicy.RETAINED, state_dir=tmp_path)
    table.program(make_struct(1, SET_KEY_DIRECT | CTRL_XTS_128, KEY_A, TWEAK_A))
    keys = [table.cipher(0), table.cipher(1)]
    table.wipe()
    assert all(k is not None and k.wiped for k in keys)


# -- TME policies -------------------------------------------------------------------------


def test_bypass_policy() -> None:
    table = KeyTable(tme=TmePolicy.BYPASS)
    assert all(table.cipher(k) is None for k in range(table.keyid_count))
    assert all(table.kind(k) is SlotKind.TME for k in range(table.keyid_count))
    table.power_cycle()
    assert table.cipher(0) is None


def test_ephemeral_policy() -> None:
    table = KeyTable(tme=TmePolicy.EPHEMERAL)
    first = probe(table, 0)
    assert first is not None and first != PROBE
    assert all(probe(table, k) == first for k in (1, 17, 63))  # unprogrammed = KeyID 0
    table.power_cycle()
    second = probe(table, 0)
    assert second is not None and second != first
    assert probe(table, 5) == second
    assert probe(KeyTable(tme=TmePolicy.EPHEMERAL), 0) not in (first, second)


def test_retained_policy(tmp_path: Path) -> None:
    table = KeyTable(tme=TmePolicy.RETAINED, state_dir=tmp_path)
    files = list(tmp_path.iterdir())
    assert len(files) == 1
    key_file = files[0]
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert key_file.stat().st_size == 32
    content = key_file.read_bytes()
    first = probe(table, 0)
    assert first is not None and first != PROBE
    assert probe(table, 9) == first
    table.power_cycle()
    assert probe(table, 0) == first
    again = KeyTable(tme=TmePolicy.RETAINED, state_dir=tmp_path)
    assert probe(again, 0) == first
    assert key_file.read_bytes() == content
    assert list(tmp_path.iterdir()) == [key_file]
    other = tmp_path / "other"
    other.mkdir()
    assert probe(KeyTable(tme=TmePolicy.RETAINED, state_dir=other), 0) != first


def test_retained_needs_state_dir() -> None:
    with pytest.raises(ConfigError):
        KeyTable(tme=TmePolicy.RETAINED)


def test_user_keys_never_reach_the_state_dir(tmp_path: Path) -> None:
    table = KeyTable(tme=TmePolicy.RETAINED, state_dir=tmp_path)
    assert table.program(make_struct(1, SET_KEY_DIRECT | CTRL_XTS_256, KEY_A, TWEAK_A)) == 0
    table.power_cycle()
    for path in tmp_path.rglob("*"):
        data = path.read_bytes()
        assert KEY_A[:8] not in data and TWEAK_A[:8] not in data


@pytest.mark.parametrize("content", [b"\x01", b"\x02" * 31, b"\x03" * 33, os.urandom(64), b"",
                                     b"\x5a" * 16 + b"\x5a" * 16],
                         ids=["1", "31", "33", "64", "empty", "equal-halves"])
def test_retained_damaged_key_file(tmp_path: Path, content: bytes) -> None:
    KeyTable(tme=TmePolicy.RETAINED, state_dir=tmp_path)
    (key_file,) = tmp_path.iterdir()
    key_file.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        KeyTable(tme=TmePolicy.RETAINED, state_dir=tmp_path)
    if len(content) >= 6:
        assert content[:6].hex() not in str(info.value)
    assert key_file.read_bytes() == content, "a damaged key file was overwritten"


@pytest.mark.parametrize("tme", [TmePolicy.BYPASS, TmePolicy.EPHEMERAL])
def test_power_cycle_forgets_user_and_random_keys(tme: TmePolicy) -> None:
    table = KeyTable(tme=tme)
    assert table.program(make_struct(1, SET_KEY_DIRECT | CTRL_XTS_128, KEY_A, TWEAK_A)) == 0
    assert table.program(make_struct(2, SET_KEY_RANDOM | CTRL_XTS_128)) == 0
    user_ct = probe(table, 1)
    table.power_cycle()
    for keyid in (1, 2):
        assert table.kind(keyid) is SlotKind.TME
        assert probe(table, keyid) == probe(table, 0)
    # A user key programmed again gives the same ciphertext as before the power cycle.
    assert table.program(make_struct(1, SET_KEY_DIRECT | CTRL_XTS_128, KEY_A, TWEAK_A)) == 0
    assert probe(table, 1) == user_ct


# -- the key-service option string ----------------------------------------------------------

HEX16_KEY, HEX16_TWEAK = KEY_A[:16].hex(), TWEAK_A[:16].hex()
HEX32_KEY, HEX32_TWEAK = KEY_A[:32].hex(), TWEAK_A[:32].hex()


def fields(raw: bytes) -> tuple[int, int, bytes, bytes, bytes]:
    """(keyid, ctrl, unused bytes, key field 1, key field 2) read by SPEC offsets."""
    assert len(raw) == 192
    return (int.from_bytes(raw[0:2], "little"), int.from_bytes(raw[2:6], "little"),
            raw[6:64], raw[64:128], raw[128:192])


@pytest.mark.parametrize(("options", "ctrl", "field_1", "field_2", "kind"), [
    (f"type=user algorithm=aes-xts-128 key={HEX16_KEY} tweak={HEX16_TWEAK}",
     0x100, KEY_A[:16], TWEAK_A[:16], SlotKind.USER),
    (f"type=user algorithm=aes-xts-256 key={HEX32_KEY} tweak={HEX32_TWEAK}",
     0x400, KEY_A[:32], TWEAK_A[:32], SlotKind.USER),
    (f"tweak={HEX16_TWEAK}  key={HEX16_KEY.upper()}\talgorithm=aes-xts-128 type=user",
     0x100, KEY_A[:16], TWEAK_A[:16], SlotKind.USER),
    ("type=cpu algorithm=aes-xts-128", 0x101, b"", b"", SlotKind.RANDOM),
    (f"type=cpu algorithm=aes-xts-256 key={HEX32_KEY} tweak={HEX32_TWEAK}",
     0x401, KEY_A[:32], TWEAK_A[:32], SlotKind.RANDOM),
    ("type=clear algorithm=aes-xts-128", 0x102, b"", b"", SlotKind.TME),
    ("type=clear algorithm=aes-xts-256", 0x402, b"", b"", SlotKind.TME),
    ("type=no-encrypt algorithm=aes-xts-128", 0x103, b"", b"", SlotKind.NO_ENCRYPT),
    ("type=no-encrypt algorithm=aes-xts-256", 0x403, b"", b"", SlotKind.NO_ENCRYPT),
], ids=["user-128", "user-256", "user-any-order", "cpu-128", "cpu-256-entropy", "clear-128",
        "clear-256", "no-encrypt-128", "no-encrypt-256"])
def test_parse_key_options(options: str, ctrl: int, field_1: bytes, field_2: bytes,
                           kind: SlotKind) -> None:
    prog = parse_key_options(12, options)
    raw = prog.pack()
    keyid, got_ctrl, unused, got_1, got_2 = fields(raw)
    assert (keyid, got_ctrl) == (12, ctrl)
    assert unused == bytes(58)
    assert got_1 == field_1.ljust(64, b"\0")
    assert got_2 == field_2.ljust(64, b"\0")
    assert KEY_A[:8].hex() not in repr(prog)
    assert KeyProgram.unpack(raw) == prog
    # The struct programs a table into the expected state.
    table = KeyTable(tme=TmePolicy.EPHEMERAL)
    assert table.program(raw) is KeyStatus.PROG_SUCCESS
    assert table.kind(12) is kind
    if kind is SlotKind.USER:
        assert probe(table, 12) == expected_ct(field_1 + field_2)


def test_build_program_matches_parse() -> None:
    prog = build_program(3, KeyCommand.SET_KEY_DIRECT, Algorithm.AES_XTS_256, HEX32_KEY, HEX32_TWEAK)
    assert fields(prog.pack()) == (3, 0x400, bytes(58), KEY_A[:32] + bytes(32), TWEAK_A[:32] + bytes(32))
    assert prog == parse_key_options(3, f"type=user algorithm=aes-xts-256 key={HEX32_KEY} "
                                        f"tweak={HEX32_TWEAK}")


MALFORMED = [
    ("empty", "", "type"),
    ("missing-type", f"algorithm=aes-xts-128 key={HEX16_KEY} tweak={HEX16_TWEAK}", "type"),
    ("unknown-type", f"type=usr key={HEX16_KEY} tweak={HEX16_TWEAK}", "usr"),
    ("unknown-option", f"type=user key={HEX16_KEY} tweak={HEX16_TWEAK} colour=red", "colour"),
    ("duplicate-type", f"type=user type=user key={HEX16_KEY} tweak={HEX16_TWEAK}", "twice"),
    ("duplicate-key", f"type=user key={HEX16_KEY} key={HEX16_TWEAK} tweak={HEX16_TWEAK}", "twice"),
    ("no-equals", f"type user key={HEX16_KEY} tweak={HEX16_TWEAK}", "name=value"),
    ("empty-value", f"type= key={HEX16_KEY} tweak={HEX16_TWEAK}", "name=value"),
    ("key-no-equals", f"type=user key:{HEX16_KEY} tweak={HEX16_TWEAK}", "name=value"),
    ("bare-hex", f"type=user {HEX16_KEY} tweak={HEX16_TWEAK}", "name=value"),
    ("bad-hex", f"type=user key=zz{HEX16_KEY[2:]} tweak={HEX16_TWEAK}", "hex"),
    ("odd-hex", f"type=user key={HEX16_KEY}0 tweak={HEX16_TWEAK}", "hex"),
    ("short-key-256", f"type=user algorithm=aes-xts-256 key={HEX16_KEY} tweak={HEX32_TWEAK}", "32"),
    ("long-key-128", f"type=user algorithm=aes-xts-128 key={HEX32_KEY} tweak={HEX16_TWEAK}", "16"),
    ("short-tweak-256", f"type=user algorithm=aes-xts-256 key={HEX32_KEY} tweak={HEX16_TWEAK}", "32"),
    ("long-entropy-cpu", f"type=cpu algorithm=aes-xts-128 key={HEX32_KEY}", "16"),
    ("key-for-clear", f"type=clear key={HEX16_KEY}", "key"),
    ("tweak-for-no-encrypt", f"type=no-encrypt algorithm=aes-xts-128 tweak={HEX16_TWEAK}", "key"),
    ("user-without-tweak", f"type=user algorithm=aes-xts-128 key={HEX16_KEY}", "tweak"),
    ("user-without-key", f"type=user algorithm=aes-xts-128 tweak={HEX16_TWEAK}", "key"),
    ("unknown-algorithm", f"type=user algorithm=aes-xts-512 key={HEX16_KEY} tweak={HEX16_TWEAK}",
     "aes-xts-512"),
]


@pytest.mark.parametrize(("options", "hint"), [case[1:] for case in MALFORMED],
                         ids=[case[0] for case in MALFORMED])
def test_malformed_key_options(options: str, hint: str) -> None:
    with pytest.raises(KeyProgramError) as info:
        parse_key_options(1, options)
    message = str(info.value)
    assert hint.lower() in message.lower(), message
    lowered = message.lower()
    for secret in (KEY_A[:32], TWEAK_A[:32]):
        for start in range(0, 32 - 6 + 1):
            assert secret[start:start + 6].hex() not in lowered, f"key material in: {message}"
