"""The control protocol (version 2): framing, request/reply payloads, roles, a blocking client.

Shared by the host tools and the guest helpers (which reach the backend over
a virtio-serial port), so it depends on nothing heavier than the key-program
struct (:mod:`mktme_emu.pconfig`) and the shared vocabulary, both pure
Python.  The wire format is specified in ``docs/protocol.md``; this package
is its reference implementation:

- :mod:`.framing`: the 24-byte header with its tag, request numbers, roles;
- :mod:`.messages`: request payloads (strictly checked) and reply bodies as
  immutable, typed records (NamedTuples) with pack/unpack;
- :mod:`.client`: transports and the tag-matching :class:`Client`;
- :mod:`.record`: the records' NamedTuple (typing's for mypy, a lighter twin at run time).

The public names are loaded on first use (PEP 562 ``__getattr__``):
``from mktme_emu.protocol import Client`` imports the client and what it
needs (framing, messages), not the key-program struct, which only the
commands that program keys load.  Under TCG each module costs the guest's
``mktme-guest status`` 5 to 50 ms (tests/test_guest_imports.py).
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing's: importing typing costs the guest's CLI ~0.1 s under TCG
if TYPE_CHECKING:
    from ..errors import ErrorCode
    from ..pconfig import (
        STRUCT_SIZE,
        Algorithm,
        KeyCommand,
        KeyProgram,
        KeyStatus,
        build_program,
        parse_key_options,
    )
    from .client import (
        Client,
        FileTransport,
        SocketTransport,
        key_program,
        key_program_from_choice,
    )
    from .framing import (
        ACK_ONLY,
        FLAG_NEED_REPLY,
        FLAG_REPLY,
        FLAG_VERSION_MASK,
        GUEST_REQUESTS,
        HEADER,
        KNOWN_FLAGS,
        LEGACY_VERSION,
        MAX_PAYLOAD,
        NO_TAG,
        PREFIX,
        U32,
        U64,
        VERSION,
        Header,
        LegacyClient,
        Request,
        Role,
        check_prefix,
        encode,
        error_reply,
        legacy_error_reply,
        new_tag,
        ok_reply,
    )
    from .messages import (
        CONFIG_REPLY,
        FEATURES,
        FEATURES_REPLY,
        FLUSH_REPLY,
        INSPECT_MAX_PAGES,
        INSPECT_REQ,
        KINDS,
        MAP_FLAG_TWEAK,
        MAP_REQ,
        PAGE_RECORD,
        RANGE_REQ,
        RELOCATE_MODES,
        RELOCATE_REQ,
        STATS_REPLY,
        TME_POLICIES,
        TWEAK_MODES,
        DeviceConfig,
        Features,
        FlushReply,
        FlushRequest,
        InspectRequest,
        MapRequest,
        PageRecord,
        PayloadError,
        RelocateRequest,
        Stats,
        check_key_program,
        expect_empty,
        pack_inspect,
        unpack_base,
        unpack_inspect,
    )

#: Where each public name lives, relative to this package (imported on first use).
_HOMES: dict[str, tuple[str, ...]] = {
    "..errors": ("ErrorCode",),
    "..pconfig": (
        "STRUCT_SIZE", "Algorithm", "KeyCommand", "KeyProgram", "KeyStatus", "build_program",
        "parse_key_options",
    ),
    ".client": (
        "Client", "FileTransport", "SocketTransport", "key_program", "key_program_from_choice",
    ),
    ".framing": (
        "ACK_ONLY", "FLAG_NEED_REPLY", "FLAG_REPLY", "FLAG_VERSION_MASK", "GUEST_REQUESTS",
        "HEADER", "KNOWN_FLAGS", "LEGACY_VERSION", "MAX_PAYLOAD", "NO_TAG", "PREFIX", "U32", "U64",
        "VERSION", "Header", "LegacyClient", "Request", "Role", "check_prefix", "encode",
        "error_reply", "legacy_error_reply", "new_tag", "ok_reply",
    ),
    ".messages": (
        "CONFIG_REPLY", "FEATURES", "FEATURES_REPLY", "FLUSH_REPLY", "INSPECT_MAX_PAGES",
        "INSPECT_REQ", "KINDS", "MAP_FLAG_TWEAK", "MAP_REQ", "PAGE_RECORD", "RANGE_REQ",
        "RELOCATE_MODES", "RELOCATE_REQ", "STATS_REPLY", "TME_POLICIES", "TWEAK_MODES",
        "DeviceConfig", "Features", "FlushReply", "FlushRequest", "InspectRequest", "MapRequest",
        "PageRecord", "PayloadError", "RelocateRequest", "Stats", "check_key_program",
        "expect_empty", "pack_inspect", "unpack_base", "unpack_inspect",
    ),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = [
    "ACK_ONLY", "CONFIG_REPLY", "FEATURES", "FEATURES_REPLY", "FLAG_NEED_REPLY", "FLAG_REPLY",
    "FLAG_VERSION_MASK", "FLUSH_REPLY", "GUEST_REQUESTS", "HEADER", "INSPECT_MAX_PAGES", "INSPECT_REQ",
    "KINDS", "KNOWN_FLAGS", "LEGACY_VERSION", "MAP_FLAG_TWEAK", "MAP_REQ", "MAX_PAYLOAD", "NO_TAG",
    "PAGE_RECORD", "PREFIX", "RANGE_REQ", "RELOCATE_MODES", "RELOCATE_REQ", "STATS_REPLY", "STRUCT_SIZE",
    "TME_POLICIES", "TWEAK_MODES", "U32", "U64", "VERSION", "Algorithm", "Client", "DeviceConfig",
    "ErrorCode", "Features", "FileTransport", "FlushReply", "FlushRequest", "Header", "InspectRequest",
    "KeyCommand", "KeyProgram", "KeyStatus", "LegacyClient", "MapRequest", "PageRecord", "PayloadError",
    "RelocateRequest", "Request", "Role", "SocketTransport", "Stats", "build_program",
    "check_key_program", "check_prefix", "encode", "error_reply", "expect_empty", "key_program",
    "key_program_from_choice", "legacy_error_reply", "new_tag", "ok_reply", "pack_inspect",
    "parse_key_options", "unpack_base", "unpack_inspect",
]


if not TYPE_CHECKING:  # hidden from mypy, which would otherwise accept any p.Misspelling

    def __getattr__(name: str) -> object:
        """Import a public name's submodule on first use (PEP 562), then keep the name here."""
        module = _HOME_OF.get(name)
        if module is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        import importlib

        value = getattr(importlib.import_module(module, __name__), name)
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
