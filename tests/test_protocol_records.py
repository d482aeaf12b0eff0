"""The wire records' run-time NamedTuple (protocol/record.py) makes what typing's makes.

mypy checks the records as ``typing.NamedTuple``s; the interpreter builds them
with a lighter twin (the guest's CLI must not import typing).  These tests hold
the twin to typing's behaviour, class for class.
"""

from __future__ import annotations

import pickle
import typing

import pytest
from mktme_emu.protocol import record
from mktme_emu.protocol.framing import FLAG_REPLY, Header
from mktme_emu.protocol.messages import DeviceConfig, FlushReply, FlushRequest, InspectRequest, Stats
from mktme_emu.vocabulary import TmePolicy, TweakMode


class Light(record.NamedTuple):
    """A record."""

    a: int
    b: str
    c: int | None = None
    d: bytes = b"d"

    def total(self) -> int:
        return self.a + (self.c or 0)

    @property
    def doubled(self) -> int:
        return 2 * self.a

    @classmethod
    def parse(cls, text: str) -> Light:
        return cls(int(text), text)


class Typed(typing.NamedTuple):
    """A record."""

    a: int
    b: str
    c: int | None = None
    d: bytes = b"d"

    def total(self) -> int:
        return self.a + (self.c or 0)


def test_the_twin_builds_typings_namedtuple() -> None:
    assert Light._fields == Typed._fields == ("a", "b", "c", "d")
    assert Light._field_defaults == Typed._field_defaults == {"c": None, "d": b"d"}
    assert Light.__doc__ == Typed.__doc__ == "A record."
    assert Light.__module__ == Typed.__module__ == __name__
    assert Light.__qualname__ == "Light" and list(Light.__annotations__) == list(Typed._fields)
    x, y = Light(1, "b", 2), Typed(1, "b", 2)
    assert repr(x) == repr(y).replace("Typed", "Light") == "Light(a=1, b='b', c=2, d=b'd')"
    assert tuple(x) == tuple(y) and x.total() == y.total() == 3
    assert x.doubled == 2 and Light.parse("7") == Light(7, "7")
    assert x._replace(c=None).total() == 1 and x._asdict() == y._asdict()
    assert pickle.loads(pickle.dumps(x)) == x  # found again by module and name
    with pytest.raises(AttributeError):
        x.a = 5  # type: ignore[misc]


def test_the_twin_refuses_what_typing_refuses() -> None:
    with pytest.raises(TypeError):
        class _Misordered(record.NamedTuple):
            a: int = 0
            b: int  # type: ignore[misc]
    with pytest.raises(AttributeError):
        class _Clobbers(record.NamedTuple):
            a: int

            def _asdict(self) -> dict[str, object]:  # type: ignore[override]
                return {}
    with pytest.raises(TypeError):
        record.NamedTuple("Functional", [("a", int)])  # type: ignore[call-overload]


def test_wire_records_behave_as_before() -> None:
    header = Header(4, 2 | FLAG_REPLY, 8, 99)
    assert header.is_reply and not header.need_reply and Header.unpack(header.pack()) == header
    assert FlushRequest() == FlushRequest(0, 0) and InspectRequest(0x1000).count == 1
    config = DeviceConfig(1 << 20, 0, 1 << 32, 64, TweakMode.SPA, 6, TmePolicy.BYPASS, 4096, 0)
    assert config.as_dict()["tweak"] == "spa" and "view" in config.as_dict()
    assert config._replace(locked_pages=1).locked_pages == 1 and config.locked_pages == 0
    stats = Stats(1, 2, 3, 4, 5, 6, 7, 8, 0.5, 0.25, "flush 3/4")
    assert Stats.unpack(stats.pack()) == stats and stats.as_dict()["busy"] == "flush 3/4"
    assert FlushReply.unpack(FlushReply(3).pack()) == FlushReply(3, 0)
    assert {header: 1}[Header(4, 2 | FLAG_REPLY, 8, 99)] == 1  # hashable, by value
