"""The four user scenarios end to end in real VMs (TCG), plus their host-side checks.

The VM part runs `run_scenarios` once for all four (about two minutes under
TCG, nine boots) and asserts the whole table; a separate boot checks one DAX
mapping's media with an XTS computed independently of the project's engine.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from backend_helpers import xts_reference
from mktme_emu.scenarios import SCENARIOS, Row, format_table, run_scenarios
from mktme_emu.scenarios.checks import media_outcome, plaintext_on_media, relocation_model
from mktme_emu.scenarios.session import Dimm, SessionOptions, guest_pattern
from mktme_emu.vm.kernel import cache_dir, load_kernel

needs_kernel = pytest.mark.skipif(load_kernel(cache_dir()) is None,
                                  reason="no guest kernel: run `mktme-emu kernel fetch`")


def independent_xts(key: bytes, data: bytes, tweak: int, unit: int = 64) -> bytes:
    """One `cryptography` XTS call per data unit: nothing shared with mktme_emu.crypto."""
    return xts_reference(key, data, range(tweak, tweak + len(data), unit), unit)


# -- host-side pieces, no VM ------------------------------------------------------

def test_relocation_model_follows_the_spec() -> None:
    table = {(case, tweak, tme): relocation_model(case, tweak, tme)
             for case in ("raw", "copy-keyid0", "keyed") for tweak in ("spa", "dpa", "logical")
             for tme in ("bypass", "ephemeral")}
    assert all(table[("keyed", t, m)] == "intact" for t in ("spa", "dpa", "logical")
               for m in ("bypass", "ephemeral"))
    assert all(table[(c, t, m)] == "garbage" for c in ("raw", "copy-keyid0")
               for t in ("spa", "dpa") for m in ("bypass", "ephemeral"))
    assert table[("raw", "logical", "ephemeral")] == "intact"
    assert table[("copy-keyid0", "logical", "bypass")] == "intact"
    assert table[("copy-keyid0", "logical", "ephemeral")] == "garbage"


def test_media_outcome_agrees_with_an_independent_xts() -> None:
    key = os.urandom(32)
    plaintext = os.urandom(3 * 4096)
    base = 0x1_0000_0000
    extents = [{"pa": base + 8192, "offset": 8192, "length": 4096},
               {"pa": base + 40960, "offset": 40960, "length": 8192}]
    media = bytearray(64 * 1024)
    media[8192:12288] = independent_xts(key, plaintext[:4096], base + 8192)
    media[40960:49152] = independent_xts(key, plaintext[4096:], base + 40960)
    assert media_outcome(bytes(media), key, extents, plaintext, "spa", 64) == "exact"
    assert media_outcome(bytes(media), key, extents, plaintext, "dpa", 64) == "differs"
    media[41000] ^= 1
    assert media_outcome(bytes(media), key, extents, plaintext, "spa", 64) == "differs"
    assert plaintext_on_media(bytes(media), [plaintext]) == "absent"
    media[0:4096] = plaintext[:4096]
    assert plaintext_on_media(bytes(media), [plaintext]) == "found"


def test_guest_pattern_is_the_documented_formula() -> None:
    import hashlib
    assert guest_pattern(7, 100) == hashlib.shake_256(b"mktme-emu pattern 7").digest(100)


def test_table_marks_differences() -> None:
    rows = [Row("s", "a", "intact", "intact"), Row("s", "b", "garbage", "intact", "host")]
    text = format_table(rows)
    assert "DIFFERS" in text.splitlines()[2] and text.endswith("1 as modelled, 1 differ")


# -- in real VMs -----------------------------------------------------------------------

@pytest.mark.vm
@needs_kernel
def test_all_scenarios_match_the_model(tmp_path: Path) -> None:
    names = [name for name in SCENARIOS if name != "fscrypt-offload"]  # its own test below
    rows = run_scenarios(names, SessionOptions(workdir=tmp_path))
    table = format_table(rows)
    assert all(r.ok for r in rows), table
    per_scenario = {name: [r for r in rows if r.scenario == name] for name in names}
    assert {k: len(v) for k, v in per_scenario.items()} == {
        "namespace-key": 5, "dax-mmap": 12, "relocation": 6, "lost-keys": 9}, table
    host_rows = [r for r in rows if r.where == "host"]
    assert len(host_rows) == 8, table
    observed = {(r.scenario, r.case): r.observed for r in rows}
    assert observed[("namespace-key", "after power cycle, mount without the key")] == "failed"
    assert observed[("relocation", "spa: raw")] == "garbage"
    assert observed[("relocation", "logical: raw")] == "intact"
    assert observed[("lost-keys", "random-key-after-power-cycle")] == "garbage"
    assert observed[("lost-keys", "user-key-reprogrammed")] == "intact"


@pytest.mark.vm
@needs_kernel
def test_devdax_media_holds_independently_computed_ciphertext(tmp_path: Path) -> None:
    dimm = Dimm(SessionOptions(workdir=tmp_path), "devdax-check")
    (result,) = dimm.boot([("devdax", "--user", dimm.user_key, "--pages", "8")], ns_mode="devdax")
    assert result["tweak_mode"] == "spa" and result["unit"] == 64
    plaintext = guest_pattern(int(result["seed"]), int(result["length"]))
    media = dimm.media()
    position = 0
    for extent in result["extents"]:
        chunk = plaintext[position:position + extent["length"]]
        stored = media[extent["offset"]:extent["offset"] + extent["length"]]
        assert stored == independent_xts(dimm.key_bytes, chunk, extent["pa"])
        assert extent["pa"] == dimm.base + extent["offset"]
        position += extent["length"]
    assert position == len(plaintext) and media.find(plaintext[:64]) < 0


@pytest.mark.vm
@needs_kernel
def test_fscrypt_offload_matches_the_model(tmp_path: Path) -> None:
    """Two boots (dun, spa): the kernel's fscrypt ciphertext = the dun KeyID's, byte for byte."""
    rows = run_scenarios(["fscrypt-offload"], SessionOptions(workdir=tmp_path))
    table = format_table(rows)
    assert all(r.ok for r in rows), table
    observed = {r.case: r.observed for r in rows}
    assert len(rows) == 14 and sum(r.where == "host" for r in rows) == 9, table
    assert observed["files' blocks = XTS(derived key, DUN (ino<<32)|lblk)"] == "exact"
    assert observed["dun: media = fscrypt's ciphertext, byte for byte"] == "identical"
    assert observed["dun: raw move to another address, read back"] == "intact"
    assert observed["spa: raw move to another address, read back"] == "garbage"
    assert observed["a filesystem passes per mapping"] == "key + first DUN"
