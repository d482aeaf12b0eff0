"""``NamedTuple`` for the wire records: typing's for mypy, a lighter twin at run time.

The guest helpers import the protocol for every ``mktme-guest`` call, and
under TCG ``import typing`` costs ~45 ms and each ``typing.NamedTuple`` class
~4 ms more (it compiles every string annotation into a ForwardRef), against
~1.5 ms for the ``collections.namedtuple`` that typing builds underneath.
So mypy sees ``typing.NamedTuple`` (and checks the records as such), and
the interpreter runs :func:`NamedTuple` below, which makes the very same
class as typing's does, minus the annotation checks mypy already did:

    class Header(NamedTuple):       # as with typing.NamedTuple: fields with
        request: int                # annotations, defaults after the fields
        tag: int = 0                # without one, methods, properties and
        def pack(self) -> bytes:    # classmethods; no generics, no super()
            ...
"""

from __future__ import annotations

import collections

TYPE_CHECKING = False  # not typing's: that import is what this module avoids
if TYPE_CHECKING:
    from typing import NamedTuple as NamedTuple
else:
    # Class attributes the namedtuple makes or needs: the class body may not set them.
    _PROHIBITED = frozenset({"__new__", "__init__", "__slots__", "__getnewargs__", "_fields",
                             "_field_defaults", "_make", "_replace", "_asdict", "_source"})
    _SPECIAL = frozenset({"__module__", "__name__", "__annotations__"})

    class _RecordMeta(type):
        """Turns a class statement into a namedtuple with the body's methods (typing's way)."""

        def __new__(mcs, typename: str, bases: tuple[type, ...], ns: dict[str, object]) -> type:
            fields = list(ns.get("__annotations__", {}))
            with_default = [name for name in fields if name in ns]
            if with_default != fields[len(fields) - len(with_default):]:
                raise TypeError(f"{typename}: a field without a default follows one with a default")
            record = collections.namedtuple(typename, fields, module=str(ns["__module__"]),
                                            defaults=[ns[name] for name in with_default])
            for key, value in ns.items():
                if key in _PROHIBITED:
                    raise AttributeError(f"{typename}: cannot overwrite NamedTuple attribute {key}")
                if key not in _SPECIAL and key not in fields:
                    setattr(record, key, value)
            record.__annotations__ = dict(ns.get("__annotations__", {}))
            return record

    _Record = type.__new__(_RecordMeta, "NamedTuple", (), {})

    def NamedTuple(*_: object, **__: object) -> None:
        """Only a base class here: ``class Name(NamedTuple): ...``."""
        raise TypeError("NamedTuple is only a base class in mktme_emu.protocol")

    NamedTuple.__mro_entries__ = lambda bases: (_Record,)

__all__ = ["NamedTuple"]
