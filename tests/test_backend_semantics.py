"""SPEC section 3 rule by rule, against a real ``mktme-emu serve`` over its socket.

The test plays the guest CPU by writing plaintext into the view file (the
memory QEMU maps) and reads the DIMM cells from the media file.
"""

from __future__ import annotations

import os

import pytest
from backend_helpers import (
    DEFAULT_BASE,
    PAGE,
    Backends,
    program,
    program_user,
    remote_error,
    xts_fast,
)
from mktme_emu import protocol as p
from mktme_emu.errors import ErrorCode
from mktme_emu.protocol import KeyCommand, KeyStatus


@pytest.fixture
def backends(tmp_path):
    with Backends(tmp_path) as pool:
        yield pool


def keys(n: int = 16) -> tuple[bytes, bytes]:
    return os.urandom(n), os.urandom(n)


def snapshot(backend, offset: int = 0, pages: int = 64) -> tuple[bytes, dict[str, bytes], list]:
    """What a refused request must leave alone: the view, every state file (media,
    metadata, the page-state log, the journal) and the per-page state."""
    with backend.client() as c:
        records = c.inspect(offset, pages)
    return (bytes(backend.view[:backend.size]), backend.state_files(),
            [(r.keyid, r.logical_tweak, r.kind, r.locked) for r in records])


# -- wrong KeyID, set KeyID, key (re)programming ------------------------------------------------

def test_wrong_keyid_gives_garbage_and_the_right_one_plaintext(backends):
    b = backends()
    c = b.client()
    key1, key2 = keys(), keys()
    program_user(c, 1, *key1)
    program_user(c, 2, *key2)
    off, n = 16 * PAGE, 4 * PAGE
    plain = os.urandom(n)
    c.map(off, n, 1)
    b.write(off, plain)
    assert c.flush().written >= 4
    media = b.media(off, n)
    assert media != plain
    # Independent check: the media is the XTS ciphertext under key 1, spa tweaks.
    assert xts_fast(key1[0] + key1[1], media, DEFAULT_BASE + off, 64, decrypt=True) == plain

    c.map(off, n, 2)
    seen = b.read(off, n)
    assert seen != plain
    assert all(seen[i:i + PAGE] != plain[i:i + PAGE] for i in range(0, n, PAGE))
    assert [r.keyid for r in c.inspect(off, 4)] == [2] * 4
    assert b.media(off, n) == media  # reading through the wrong KeyID wrote nothing

    c.map(off, n, 1)
    assert b.read(off, n) == plain
    # An unprogrammed KeyID behaves like KeyID 0 (bypass here): the raw ciphertext.
    c.map(off, n, 7)
    assert b.read(off, n) == media


def test_set_keyid_writes_back_under_the_old_keyid_first(backends):
    b = backends()
    c = b.client()
    program_user(c, 1, *keys())
    program_user(c, 2, *keys())
    off, n = 0, 2 * PAGE
    plain = os.urandom(n)
    c.map(off, n, 1)
    b.write(off, plain)  # never flushed: the map itself must write it back under KeyID 1
    c.map(off, n, 2)
    assert b.read(off, n) != plain
    assert b.media(off, n) not in (plain, bytes(n))
    c.map(off, n, 1)
    assert b.read(off, n) == plain


def test_reprogramming_a_keyid_writes_back_under_the_old_key(backends):
    b = backends()
    c = b.client()
    key_a, key_b = keys(), keys()
    program_user(c, 3, *key_a)
    off, n = 8 * PAGE, 3 * PAGE
    c.map(off, n, 3)
    plain = os.urandom(n)
    b.write(off, plain)  # unflushed
    program_user(c, 3, *key_b)
    assert b.read(off, n) != plain
    assert xts_fast(key_a[0] + key_a[1], b.media(off, n), DEFAULT_BASE + off, 64, decrypt=True) == plain
    program_user(c, 3, *key_a)
    assert b.read(off, n) == plain


@pytest.mark.parametrize("tme", ["bypass", "ephemeral"])
def test_clearing_a_key_locks_and_programming_it_again_unlocks(backends, tme):
    b = backends(tme=tme)
    c = b.client()
    key = keys(32)
    program_user(c, 5, *key)
    off, n = 32 * PAGE, 4 * PAGE
    c.map(off, n, 5)
    plain = os.urandom(n)
    b.write(off, plain)
    c.flush(off, n)
    media = b.media(off, n)

    program(c, 5, KeyCommand.CLEAR_KEY, "aes-xts-256")
    seen = b.read(off, n)
    assert seen != plain
    if tme == "bypass":
        assert seen == media  # the CPU sees the cells as they are
    else:
        assert seen != media
    assert [r.kind for r in c.inspect(off, 4)] == ["tme"] * 4
    c.flush()
    assert b.media(off, n) == media  # clearing wrote nothing

    program_user(c, 5, *key)
    assert b.read(off, n) == plain
    assert b.media(off, n) == media


def test_no_encrypt_keyid_shows_the_raw_media(backends):
    b = backends()
    c = b.client()
    program_user(c, 1, *keys())
    program(c, 9, KeyCommand.NO_ENCRYPT)
    off, n = 4 * PAGE, 2 * PAGE
    c.map(off, n, 1)
    b.write(off, os.urandom(n))
    c.flush()
    media = b.media(off, n)
    c.map(off, n, 9)
    assert b.read(off, n) == media
    assert [r.kind for r in c.inspect(off, 2)] == ["no-encrypt"] * 2
    # ... and what is written through it lands on the media verbatim.
    raw = os.urandom(n)
    b.write(off, raw)
    c.flush(off, n)
    assert b.media(off, n) == raw
    # NO_ENCRYPT has no key to lose: after a restart the pages are not locked.
    b.stop()
    b.forget_view()
    b.start()
    with b.client() as c2:
        records = c2.inspect(off, 2)
        assert [(r.keyid, r.kind, r.locked) for r in records] == [(9, "no-encrypt", False)] * 2
        assert b.read(off, n) == raw


def test_map_over_mixed_keyids_writes_each_page_back_under_its_own(backends):
    b = backends()
    c = b.client()
    program_user(c, 1, *keys())
    program_user(c, 2, *keys(32))
    program_user(c, 3, *keys())
    c.map(0, 2 * PAGE, 1)
    c.map(2 * PAGE, 2 * PAGE, 2)
    plain = os.urandom(6 * PAGE)
    b.write(0, plain)  # pages 4 and 5 stay KeyID 0; nothing flushed
    c.map(0, 6 * PAGE, 3)
    assert [r.keyid for r in c.inspect(0, 6)] == [3] * 6
    assert b.read(4 * PAGE, 2 * PAGE) != plain[4 * PAGE:]
    assert b.media(4 * PAGE, 2 * PAGE) == plain[4 * PAGE:]  # bypass: stored as it is
    c.map(0, 2 * PAGE, 1)
    c.map(2 * PAGE, 2 * PAGE, 2)
    c.map(4 * PAGE, 2 * PAGE, 0)
    assert b.read(0, 6 * PAGE) == plain


def test_flush_is_exact_and_inspect_reports_dirty_pages(backends):
    b = backends()
    c = b.client()
    key = keys()
    program_user(c, 1, *key)
    c.map(0, 64 * PAGE, 1)
    assert c.flush().written == 0
    plain = bytearray(b.read(0, 64 * PAGE))
    # One byte in the last unit of some pages, a whole page elsewhere, one byte under KeyID 0.
    for page in (0, 7, 63):
        plain[page * PAGE + PAGE - 1] ^= 0x01
    plain[20 * PAGE:21 * PAGE] = os.urandom(PAGE)
    b.write(0, bytes(plain))
    b.write(100 * PAGE + 5, b"\xff")
    records = c.inspect(0, 64)
    assert [r.offset // PAGE for r in records if not r.consistent] == [0, 7, 20, 63]
    assert c.flush(0, 8 * PAGE).written == 2  # only inside the range
    assert c.flush().written == 3
    assert c.flush().written == 0
    assert all(r.consistent for r in c.inspect(0, 128))
    media = b.media(0, 64 * PAGE)
    assert xts_fast(key[0] + key[1], media, DEFAULT_BASE, 64, decrypt=True) == bytes(plain)
    assert b.media(100 * PAGE + 5, 1) == b"\xff"


def test_random_keys_are_fresh_every_time(backends):
    b = backends()
    c = b.client()
    entropy = os.urandom(32).hex()
    random_prog = p.key_program(2, KeyCommand.SET_KEY_RANDOM, "aes-xts-256", entropy, entropy[::-1])
    assert c.program_key(random_prog) is KeyStatus.PROG_SUCCESS
    c.map(0, 2 * PAGE, 2)
    plain = os.urandom(2 * PAGE)
    b.write(0, plain)
    c.flush()
    assert b.media(0, 2 * PAGE) != plain
    assert [r.kind for r in c.inspect(0, 2)] == ["random"] * 2
    assert c.program_key(random_prog) is KeyStatus.PROG_SUCCESS  # same entropy, new key
    assert b.read(0, 2 * PAGE) != plain


def test_keyid_bits_bound_the_keyids(backends):
    b = backends(keyid_bits=3)
    c = b.client()
    assert c.config().keyid_bits == 3
    assert c.program_key(p.key_program(8, KeyCommand.SET_KEY_RANDOM)) is KeyStatus.INVALID_KEYID
    assert c.program_key(p.key_program(0, KeyCommand.SET_KEY_RANDOM)) is KeyStatus.INVALID_KEYID
    program_user(c, 7, *keys())
    with remote_error(ErrorCode.INVALID):
        c.map(0, PAGE, 8)
    c.map(0, PAGE, 7)


# -- power cycles and TME policies -------------------------------------------------------------

def test_power_cycle_loses_random_and_ephemeral_data_and_keeps_user_data(backends):
    b = backends(tme="ephemeral")
    c = b.client()
    user = keys()
    program_user(c, 1, *user)
    program(c, 2, KeyCommand.SET_KEY_RANDOM)
    tme_off, user_off, rand_off, n = 0, 64 * PAGE, 128 * PAGE, 4 * PAGE
    tme_plain, user_plain, rand_plain = os.urandom(n), os.urandom(n), os.urandom(n)
    c.map(user_off, n, 1)
    c.map(rand_off, n, 2)
    b.write(tme_off, tme_plain)
    b.write(user_off, user_plain)
    b.write(rand_off, rand_plain)
    c.flush()
    assert b.media(tme_off, n) != tme_plain  # ephemeral TME encrypts KeyID 0
    assert b.read(user_off, n) == user_plain

    c.power_cycle()
    records = c.inspect(0, 256)
    assert {r.keyid for r in records} == {0}
    assert {r.kind for r in records} == {"tme"}
    assert b.read(tme_off, n) != tme_plain  # a new platform key: garbage
    assert b.read(user_off, n) != user_plain
    assert b.read(rand_off, n) != rand_plain

    program_user(c, 1, *user)
    c.map(user_off, n, 1)
    assert b.read(user_off, n) == user_plain  # the user key brings it back

    program(c, 2, KeyCommand.SET_KEY_RANDOM)
    c.map(rand_off, n, 2)
    assert b.read(rand_off, n) != rand_plain  # gone for good


def test_pages_locked_by_a_restart_are_never_written_back(backends):
    b = backends()
    c = b.client()
    key = keys()
    program_user(c, 1, *key)
    off, n = 40 * PAGE, 4 * PAGE
    c.map(off, n, 1)
    plain = os.urandom(n)
    b.write(off, plain)
    b.restart()  # SIGTERM writes back; the new process does not know the key
    c = b.client()
    media = b.media()
    assert b.read(off, n) == plain  # the reattached view still shows it
    assert [r.locked for r in c.inspect(off, 4)] == [True] * 4
    assert c.config().locked_pages == 4 and c.stats().locked_pages == 4
    b.write(off, os.urandom(n))  # the guest scribbles over locked pages
    assert c.flush().written == 0
    c.map(0, 4 * PAGE, 0)
    c.relocate(off + PAGE, 0, PAGE, "raw")
    assert b.media(0, PAGE) == media[off + PAGE:off + 2 * PAGE]
    media = b.media()
    with remote_error(ErrorCode.NO_KEY):
        c.relocate(off, 0, PAGE, "keyed")
    c.power_cycle()  # writes back everything, except what it has no key for
    assert b.media() == media
    assert c.config().locked_pages == 0
    program_user(c, 1, *key)
    c.map(off, n, 1)
    assert b.read(off, n) == plain


def test_power_cycle_under_bypass_keeps_keyid0_data(backends):
    b = backends()
    c = b.client()
    plain = os.urandom(2 * PAGE)
    b.write(0, plain)
    c.power_cycle()
    assert b.read(0, len(plain)) == plain
    assert b.media(0, len(plain)) == plain  # bypass: no encryption at all


def test_retained_tme_keeps_keyid0_data_across_power_cycles_and_restarts(backends):
    b = backends(tme="retained")
    c = b.client()
    off, n = 10 * PAGE, 5 * PAGE
    plain = os.urandom(n)
    b.write(off, plain)
    c.flush()
    media = b.media(off, n)
    assert media != plain
    c.power_cycle()
    assert b.read(off, n) == plain
    assert b.media(off, n) == media
    b.restart()
    assert b.read(off, n) == plain
    # Not only through the reattached view: a restart that must refill it.
    b.stop()
    b.forget_view()
    b.start()
    assert b.read(off, n) == plain
    with b.client() as c2:
        assert c2.config().locked_pages == 0
        c2.power_cycle()
    assert b.read(off, n) == plain


def test_ephemeral_tme_data_is_lost_with_the_process_and_never_rewritten(backends):
    b = backends(tme="ephemeral")
    off, n = 0, 2 * PAGE
    plain = os.urandom(n)
    b.write(off, plain)
    b.stop()
    media = b.media()
    b.forget_view()
    b.start()
    assert b.read(off, n) != plain  # the platform key died with the process
    with b.client() as c:
        b.write(off, os.urandom(n))
        c.flush()
        assert b.media() == media  # never written back with another platform key
        c.power_cycle()
        assert b.read(off, n) != plain


# -- relocation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("tweak", ["spa", "dpa", "logical"])
def test_raw_relocation_garbles_under_spa_and_dpa_and_survives_under_logical(backends, tweak):
    b = backends(tweak=tweak)
    c = b.client()
    program_user(c, 4, *keys())
    src, dst, n = 16 * PAGE, 256 * PAGE, 3 * PAGE
    logical = tweak == "logical"
    t_src, t_dst = (0x0000_0042_0000_0010, 0x0000_0099_0000_0000) if logical else (None, None)
    c.map(src, n, 4, t_src)
    c.map(dst, n, 4, t_dst)  # dst keeps its own KeyID (and its own logical tweak)
    plain = os.urandom(n)
    b.write(src, plain)
    c.flush()
    src_media = b.media(src, n)

    c.relocate(src, dst, n, "raw")
    assert b.media(dst, n) == src_media  # a raw move copies the cells as they are
    assert b.read(src, n) == plain  # the source is untouched
    assert [r.keyid for r in c.inspect(dst, 3)] == [4] * 3
    assert b.read(dst, n) != plain  # dst's own tweak: garbage in every mode

    # Map dst with KeyID 4 again, with the logical tweak the data was written with.
    c.map(dst, n, 4, t_src)
    if logical:
        assert b.read(dst, n) == plain
        assert [r.logical_tweak for r in c.inspect(dst, 3)] == [t_src, t_src + 1, t_src + 2]
    else:
        assert b.read(dst, n) != plain
        assert all(b.read(dst + i, PAGE) != plain[i:i + PAGE] for i in range(0, n, PAGE))


@pytest.mark.parametrize("tweak", ["dpa", "logical"])
def test_raw_relocation_between_keyids_leaves_each_page_its_own_keyid(backends, tweak):
    """SPEC 3: a raw move copies cells; dst keeps its KeyID (a mutation carrying the
    source's KeyID along survived the suite until this test)."""
    b = backends(tweak=tweak)
    c = b.client()
    key_src, key_dst = keys(), keys()
    program_user(c, 1, *key_src)
    program_user(c, 2, *key_dst)
    src, dst, n = 8 * PAGE, 300 * PAGE, 2 * PAGE
    t_src, t_dst = (0x77_0000_0000, 0x99_0000_0000) if tweak == "logical" else (None, None)
    c.map(src, n, 1, t_src)
    c.map(dst, n, 2, t_dst)
    b.write(src, os.urandom(n))
    c.relocate(src, dst, n, "raw")
    records = c.inspect(dst, 2)
    assert [(r.keyid, r.kind) for r in records] == [(2, "user")] * 2
    if t_dst is not None:
        assert [r.logical_tweak for r in records] == [t_dst, t_dst + 1]
    assert all(r.consistent for r in records)  # dst was filled under its own KeyID 2
    assert [r.keyid for r in c.inspect(src, 2)] == [1] * 2
    assert b.media(dst, n) == b.media(src, n)
    # What the guest sees at dst is the source's cells decrypted with key 2, not key 1.
    unit_tweak = (t_dst * PAGE) if t_dst is not None else dst
    assert b.read(dst, n) == xts_fast(key_dst[0] + key_dst[1], b.media(dst, n), unit_tweak, 64,
                                      decrypt=True)


@pytest.mark.parametrize("tweak", ["spa", "dpa", "logical"])
def test_keyed_relocation_keeps_data_and_carries_keyid_and_tweak(backends, tweak):
    b = backends(tweak=tweak)
    c = b.client()
    program_user(c, 6, *keys())
    src, dst, n = 2 * PAGE, 600 * PAGE, 4 * PAGE
    t = 0x1234_5678_0000_0000 if tweak == "logical" else None
    c.map(src, n, 6, t)
    plain = os.urandom(n)
    b.write(src, plain)  # not flushed: relocation writes src back first
    c.relocate(src, dst, n, "keyed")
    assert b.read(dst, n) == plain
    records = c.inspect(dst, 4)
    assert [r.keyid for r in records] == [6] * 4
    assert [r.kind for r in records] == ["user"] * 4
    assert all(r.consistent for r in records)
    if t is not None:
        assert [r.logical_tweak for r in records] == [t + k for k in range(4)]
    else:
        assert b.media(dst, n) != b.media(src, n)  # re-encrypted for its new address
    assert b.read(src, n) == plain


def test_keyed_relocation_without_the_key_is_refused_and_changes_nothing(backends):
    b = backends()
    c = b.client()
    program_user(c, 3, *keys())
    src, dst, n = 0, 64 * PAGE, 2 * PAGE
    c.map(src, n, 3)
    b.write(src, os.urandom(n))
    c.flush()
    program(c, 3, KeyCommand.CLEAR_KEY)  # pages stay mapped with KeyID 3, its key is gone
    before = snapshot(b, 0, 128)
    with remote_error(ErrorCode.NO_KEY):
        c.relocate(src, dst, n, "keyed")
    assert snapshot(b, 0, 128) == before
    # A KeyID that was never programmed has no key either.
    c.map(8 * PAGE, PAGE, 11)
    before = snapshot(b, 0, 128)
    with remote_error(ErrorCode.NO_KEY):
        c.relocate(8 * PAGE, dst, PAGE, "keyed")
    assert snapshot(b, 0, 128) == before
    c.relocate(src, dst, n, "raw")  # a KeyID-unaware mover does not care
    assert b.media(dst, n) == b.media(src, n)


# -- the NVDIMM moving in the physical map -------------------------------------------------------

@pytest.mark.parametrize(("tweak", "new_base", "survives"), [
    ("spa", DEFAULT_BASE + 0x4000_0000, False),
    ("dpa", DEFAULT_BASE + 0x4000_0000, True),
    ("spa", DEFAULT_BASE, True),
])
def test_base_change_across_restart(backends, tweak, new_base, survives):
    b = backends(tweak=tweak)
    c = b.client()
    key = keys()
    program_user(c, 1, *key)
    off, n = 20 * PAGE, 4 * PAGE
    c.map(off, n, 1)
    plain = os.urandom(n)
    b.write(off, plain)
    c.flush()
    media = b.media(off, n)
    b.stop()
    b.forget_view()  # the host rebooted too
    b.start(base=new_base)
    c = b.client()
    config = c.config()
    assert config.base == new_base
    if new_base != DEFAULT_BASE:
        assert hex(new_base) in b.logs[-1].read_text()  # the move is logged
    # The user key died with the old process: the pages are locked, and reported.
    assert config.locked_pages == 4
    assert all(r.locked and r.keyid == 1 for r in c.inspect(off, 4))
    program_user(c, 1, *key)
    assert c.config().locked_pages == 0
    assert (b.read(off, n) == plain) is survives
    assert b.media(off, n) == media


def test_set_base_request_moves_the_tweaks_under_spa(backends):
    b = backends()
    c = b.client()
    program_user(c, 1, *keys())
    c.map(0, PAGE, 1)
    plain = os.urandom(PAGE)
    b.write(0, plain)
    c.set_base(DEFAULT_BASE + 0x20_0000)
    assert c.config().base == DEFAULT_BASE + 0x20_0000
    assert b.read(0, PAGE) != plain
    c.set_base(DEFAULT_BASE)
    assert b.read(0, PAGE) == plain
    with remote_error(ErrorCode.INVALID):
        c.set_base(DEFAULT_BASE + 100)
    assert c.config().base == DEFAULT_BASE


# -- refused requests change nothing --------------------------------------------------------------

def test_unaligned_and_out_of_range_requests_are_refused_with_range(backends):
    b = backends(tweak="logical")
    c = b.client()
    program_user(c, 1, *keys())
    c.map(0, 4 * PAGE, 1, 77)
    b.write(0, os.urandom(4 * PAGE))
    c.flush()
    size = b.size
    before = snapshot(b)
    refused = [
        lambda: c.map(100, PAGE, 1),
        lambda: c.map(0, PAGE + 1, 1),
        lambda: c.map(0, 0, 1),
        lambda: c.map(size - PAGE, 2 * PAGE, 1),
        lambda: c.map(size, PAGE, 1),
        lambda: c.map((1 << 64) - PAGE, 2 * PAGE, 1),
        lambda: c.relocate(1, 8 * PAGE, PAGE, "raw"),
        lambda: c.relocate(0, 8 * PAGE + 512, PAGE, "keyed"),
        lambda: c.relocate(0, 8 * PAGE, 100, "raw"),
        lambda: c.relocate(0, size - PAGE, 2 * PAGE, "raw"),
        lambda: c.relocate(size, 0, PAGE, "raw"),
        lambda: c.relocate(0, 2 * PAGE, 4 * PAGE, "raw"),  # overlapping
        lambda: c.flush(100, PAGE),
        lambda: c.flush(size, PAGE),
        lambda: c.inspect(size, 1),
    ]
    for request in refused:
        with remote_error(ErrorCode.RANGE):
            request()
        assert c.features().version == p.VERSION  # the connection stays usable
    assert snapshot(b) == before
    # Other bad arguments: refused too (INVALID), nothing changed. Two pages from
    # page tweak 2^64 - 1 would need tweak 2^64 for the second page.
    for request in (lambda: c.map(0, PAGE, 64), lambda: c.map(0, 2 * PAGE, 1, (1 << 64) - 1)):
        with remote_error(ErrorCode.INVALID):
            request()
    assert snapshot(b) == before
    c.map(0, PAGE, 1, (1 << 64) - 1)  # the last 64-bit page tweak itself is valid
    assert c.inspect(0)[0].logical_tweak == (1 << 64) - 1


def test_logical_tweak_outside_logical_mode_is_refused(backends):
    b = backends(tweak="spa")
    c = b.client()
    before = snapshot(b)
    with remote_error(ErrorCode.INVALID):
        c.map(0, PAGE, 1, 5)
    assert snapshot(b) == before


# -- the label area ---------------------------------------------------------------------------------

def test_label_area_is_never_encrypted_and_persists(backends):
    b = backends(tme="retained", label_size="128K")
    label = b.label_size
    assert label == 128 * 1024
    assert len(b.view) == b.size + label
    c = b.client()
    program_user(c, 1, *keys())
    c.map(0, b.size, 1)  # every data page encrypted under a user key
    pattern = os.urandom(label)
    data = os.urandom(8 * PAGE)
    b.write(b.size, pattern)
    b.write(0, data)
    c.flush()
    assert b.media_path.stat().st_size == b.size  # the media holds the data area, nothing else
    assert pattern not in b.media() and data not in b.media()
    stored = b.state_files()
    assert any(pattern in content for content in stored.values())  # stored as it is
    assert not any(data[:64] in content for content in stored.values())

    b.restart()
    assert b.read(b.size, label) == pattern
    b.stop()
    b.forget_view()
    b.start()
    assert b.read(b.size, label) == pattern

    # Written and not flushed: SIGTERM writes it back too; power cycles leave it.
    pattern2 = os.urandom(label)
    b.write(b.size, pattern2)
    b.stop()
    b.forget_view()
    b.start()
    assert b.read(b.size, label) == pattern2
    with b.client() as c2:
        c2.power_cycle()
    assert b.read(b.size, label) == pattern2
