"""mktme_guest.dax with a recording fake client: offsets, tweaks, alignment, MAP_SYNC fallback."""

from __future__ import annotations

import mmap
from pathlib import Path
from typing import Any

import pytest
from mktme_emu.protocol import DeviceConfig, FlushReply
from mktme_emu.vocabulary import TmePolicy, TweakMode
from mktme_guest import dax, physaddr
from mktme_guest.errors import ResolveError
from mktme_guest.physaddr import PAGE_SIZE, Extent

BASE, SIZE = 0x100000000, 64 << 20


class FakeClient:
    """Answers config(); records map and flush calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def config(self) -> DeviceConfig:
        return DeviceConfig(SIZE, 0, BASE, 64, TweakMode.SPA, 6, TmePolicy.BYPASS, PAGE_SIZE, 0)

    def map(self, offset: int, length: int, keyid: int, logical_tweak: int | None = None) -> None:
        self.calls.append(("map", offset, length, keyid, logical_tweak))

    def flush(self, offset: int = 0, length: int = 0) -> FlushReply:
        self.calls.append(("flush", offset, length))
        return FlushReply(length // PAGE_SIZE)


def test_map_extents_converts_pa_to_offsets_and_spreads_the_tweak() -> None:
    client = FakeClient()
    extents = [Extent(BASE + 0x5000, 0x2000, 0), Extent(BASE + 0x9000, 0x1000, 0x2000)]
    done = dax.map_extents(client, extents, 3, logical_tweak=100)  # type: ignore[arg-type]
    assert done == [(0x5000, 0x2000), (0x9000, 0x1000)]
    assert client.calls == [("map", 0x5000, 0x2000, 3, 100), ("map", 0x9000, 0x1000, 3, 102)]


def test_map_extents_refuses_what_is_not_on_the_nvdimm() -> None:
    client = FakeClient()
    with pytest.raises(ResolveError, match="not on the NVDIMM"):
        dax.map_extents(client, [Extent(0x7000, 0x1000)], 1)  # type: ignore[arg-type]
    with pytest.raises(ResolveError, match="not on the NVDIMM"):
        dax.map_extents(client, [Extent(BASE + SIZE - 0x1000, 0x2000)], 1)  # type: ignore[arg-type]
    assert client.calls == []


def test_map_extents_checks_every_extent_before_the_first_map() -> None:
    # encrypt_mprotect over several extents is all or nothing: a bad third extent
    # must not leave the first two with the new KeyID (issue 8).
    client = FakeClient()
    extents = [Extent(BASE, 0x1000, 0), Extent(BASE + 0x3000, 0x1000, 0x1000), Extent(0x7000, 0x1000, 0x2000)]
    with pytest.raises(ResolveError, match="not on the NVDIMM"):
        dax.map_extents(client, extents, 1)  # type: ignore[arg-type]
    assert client.calls == []


def test_page_extents() -> None:
    tail = [Extent(BASE, 0x1000, 0), Extent(BASE + 0x4000, 0x800, 0x1000)]
    assert dax.page_extents(tail, round_tail=True)[-1] == Extent(BASE + 0x4000, 0x1000, 0x1000)
    with pytest.raises(ResolveError, match="not whole 4 KiB pages"):
        dax.page_extents(tail)
    with pytest.raises(ResolveError, match="block size"):
        dax.page_extents([Extent(BASE + 0x400, 0x1000)], round_tail=True, hint=dax.FILE_HINT)


def test_flush_extents_rounds_out_to_pages() -> None:
    client = FakeClient()
    written = dax.flush_extents(client, [Extent(BASE + 0x1010, 0x20), Extent(BASE + 0x3ff0, 0x20)])  # type: ignore[arg-type]
    assert client.calls == [("flush", 0x1000, 0x1000), ("flush", 0x3000, 0x2000)]
    assert written == FlushReply(3, 0)
    assert str(written) == "3 pages written back"
    assert str(FlushReply(3, 2)) == "3 pages written back, 2 not (their KeyID's key is lost)"


def test_encrypt_mprotect_touches_resolves_and_maps(monkeypatch: pytest.MonkeyPatch) -> None:
    mm = mmap.mmap(-1, 3 * PAGE_SIZE)
    mm[:4] = b"keep"
    address = physaddr.mmap_address(mm)
    seen: list[tuple[int, int]] = []

    def fake_pagemap(addr: int, length: int) -> list[Extent]:
        seen.append((addr, length))
        return [Extent(BASE + 0x20000, length)]

    monkeypatch.setattr(physaddr, "pagemap_extents", fake_pagemap)
    client = FakeClient()
    try:
        got = dax.encrypt_mprotect(mm, 2 * PAGE_SIZE + 1, 5, client=client)  # type: ignore[arg-type]
        assert seen == [(address, 3 * PAGE_SIZE)]  # length rounded up to pages
        assert got == [Extent(BASE + 0x20000, 3 * PAGE_SIZE)]
        assert client.calls == [("map", 0x20000, 3 * PAGE_SIZE, 5, None)]
        assert mm[:4] == b"keep"  # touching rewrites bytes with themselves
        with pytest.raises(ResolveError, match="page-aligned start"):
            dax.encrypt_mprotect(address + 8, PAGE_SIZE, 5, client=client)  # type: ignore[arg-type]
    finally:
        mm.close()


def test_flush_range_msyncs_then_flushes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(physaddr, "pagemap_extents", lambda a, n: [Extent(BASE + 0x3000, n)])
    mm = mmap.mmap(-1, 2 * PAGE_SIZE)
    client = FakeClient()
    try:
        assert dax.flush_range(mm, 2 * PAGE_SIZE, client=client) == 2  # type: ignore[arg-type]
    finally:
        mm.close()
    assert client.calls == [("flush", 0x3000, 2 * PAGE_SIZE)]


def test_mmap_dax_falls_back_without_map_sync(tmp_path: Path) -> None:
    """A file on a non-DAX filesystem refuses MAP_SYNC: plain MAP_SHARED, map_sync False."""
    path = tmp_path / "f"
    path.write_bytes(bytes(2 * PAGE_SIZE))
    with dax.mmap_dax(path, 2 * PAGE_SIZE) as m:
        assert not m.map_sync
        m.write(PAGE_SIZE, b"hello")
        assert m.read(PAGE_SIZE, 5) == b"hello"
        assert m.at(PAGE_SIZE) == m.address + PAGE_SIZE
        with pytest.raises(ResolveError, match="outside this mapping"):
            m.at(3 * PAGE_SIZE)
        dax.msync(m.mm)
    assert path.read_bytes()[PAGE_SIZE:PAGE_SIZE + 5] == b"hello"


def test_msync_tolerates_device_dax() -> None:
    class NoFsync:
        def flush(self) -> None:
            raise OSError(22, "Invalid argument")

    dax.msync(NoFsync())  # type: ignore[arg-type]

    class Broken:
        def flush(self) -> None:
            raise OSError(5, "Input/output error")

    with pytest.raises(OSError):
        dax.msync(Broken())  # type: ignore[arg-type]


def test_namespace_extents_of_a_devdax_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(physaddr, "dax_ranges", lambda dev: [physaddr.DaxRange(BASE, BASE + 0x200000, 0)])
    assert dax.namespace_extents("/dev/dax0.0") == [Extent(BASE, 0x200000, 0)]
