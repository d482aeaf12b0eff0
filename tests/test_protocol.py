"""The protocol's framing, payloads and client, over fake transports (no backend).

The layout tests compare with bytes written by hand from docs/protocol.md
(hex literals), not with a round trip through the same module.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from mktme_emu import protocol as p
from mktme_emu.errors import ErrorCode, KeyProgramError, ProtocolError, RemoteError
from mktme_emu.vocabulary import RelocateMode, TmePolicy, TweakMode

TAG = 0x1122334455667788
TAG_LE = "8877665544332211"


def h(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


class FakeTransport:
    """A backend stand-in: ``answer`` turns each sent request into the bytes that come back.

    ``before`` is queued first, as if left on the stream by someone else.
    """

    def __init__(self, answer: Callable[[p.Header, bytes], bytes], before: bytes = b"") -> None:
        self.answer = answer
        self.incoming = before
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.sent.append(data)
        header = p.Header.unpack(data[:p.HEADER.size])
        self.incoming += self.answer(header, data[p.HEADER.size:])

    def recv_exact(self, size: int) -> tuple[bytes, list[int]]:
        if len(self.incoming) < size:
            raise ProtocolError("closed")
        data, self.incoming = self.incoming[:size], self.incoming[size:]
        return data, []

    def close(self) -> None:
        pass


def answer_with(body: bytes) -> Callable[[p.Header, bytes], bytes]:
    return lambda header, _: p.ok_reply(header.request, header.tag, body)


FEATURES_GUEST = h("0000000000000000 02000000 01000000")


# -- the header and the client's tags ---------------------------------------------------------

def test_header_layout_from_the_docs() -> None:
    raw = p.encode(p.Request.GET_FEATURES, tag=TAG, need_reply=True)
    assert raw == h("01000000 0a000000 00000000 00000000" + TAG_LE)
    reply = p.error_reply(p.Request.MAP, TAG, ErrorCode.RANGE, "x")
    assert reply == h("04000000 06000000 05000000 00000000" + TAG_LE + "02000000 78")
    assert p.Header.unpack(reply[:24]) == p.Header(4, 6, 5, TAG)


def test_each_request_gets_its_own_nonzero_tag_and_version_2() -> None:
    transport = FakeTransport(answer_with(FEATURES_GUEST))
    client = p.Client(transport)
    assert client.features() == p.Features(0, 2, p.Role.GUEST)
    client.features()
    first, second = (p.Header.unpack(sent[:24]) for sent in transport.sent)
    assert (first.request, first.size, first.flags) == (p.Request.GET_FEATURES, 0, 2 | p.FLAG_NEED_REPLY)
    assert first.tag != 0 and second.tag != 0 and first.tag != second.tag


def test_a_leftover_reply_with_the_same_request_but_another_tag_is_never_taken() -> None:
    """Data-loss bug 1: the dead caller's FLUSH reply must not answer the next FLUSH."""
    stale = p.ok_reply(p.Request.FLUSH, 0xDEAD, h("0500000000000000 0000000000000000"))
    transport = FakeTransport(answer_with(h("0200000000000000 0000000000000000")), before=stale)
    assert p.Client(transport).flush(0, 8192) == p.FlushReply(written=2, unwritable=0)
    assert transport.incoming == b""


def test_a_reply_with_our_tag_but_another_request_is_a_protocol_error() -> None:
    transport = FakeTransport(lambda header, _: p.ok_reply(p.Request.MAP, header.tag))
    with pytest.raises(ProtocolError, match="unexpected reply 4 to request FLUSH"):
        p.Client(transport).flush()


def test_a_connection_error_notice_is_a_protocol_error_with_its_text() -> None:
    transport = FakeTransport(lambda *_: p.error_reply(0, p.NO_TAG, ErrorCode.INVALID, "unknown flag bits"))
    with pytest.raises(ProtocolError, match="dropped the connection: unknown flag bits"):
        p.Client(transport).features()


def test_refusal_carries_its_code_and_message() -> None:
    transport = FakeTransport(lambda header, _: p.error_reply(header.request, header.tag, ErrorCode.RANGE,
                                                              "not whole pages"))
    with pytest.raises(RemoteError, match="not whole pages") as info:
        p.Client(transport).map(1, 4096, 1)
    assert info.value.code == ErrorCode.RANGE


@pytest.mark.parametrize("raw", [
    h("01000000 00000000 00000000 00000000 0100000000000000"),  # version 0
    h("01000000 03000000 00000000 00000000 0100000000000000"),  # version 3
    h("01000000 12000000 00000000 00000000 0100000000000000"),  # unknown flag bit 4
    h("01000000 0a000000 00000000 01000000 0100000000000000"),  # reserved field
    h("01000000 0a000000 01000100 00000000 0100000000000000"),  # size 65537
])
def test_headers_that_cannot_be_version_2_are_refused(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        p.Header.unpack(raw)


def test_a_version_1_header_is_recognised_as_legacy() -> None:
    with pytest.raises(p.LegacyClient, match="version 2"):
        p.check_prefix(h("01000000 09000000 00000000"))
    notice = p.legacy_error_reply("old")
    assert notice == h("00000000 05000000 07000000 01000000") + b"old"


def test_oversize_payloads_are_refused_both_ways() -> None:
    with pytest.raises(ProtocolError):
        p.check_prefix(p.PREFIX.pack(1, p.VERSION, p.MAX_PAYLOAD + 1))
    with pytest.raises(ProtocolError):
        p.encode(p.Request.KEY_PROGRAM, bytes(p.MAX_PAYLOAD + 1))


# -- request payloads -------------------------------------------------------------------------

def test_request_layouts_from_the_docs() -> None:
    assert p.MapRequest(0x3000, 0x2000, 5, 7).pack() == h(
        "0030000000000000 0020000000000000 05000000 01000000 0700000000000000")
    assert p.MapRequest(0x3000, 0x2000, 5).pack() == h(
        "0030000000000000 0020000000000000 05000000 00000000 0000000000000000")
    assert p.FlushRequest(0x1000, 0x2000).pack() == h("0010000000000000 0020000000000000")
    assert p.RelocateRequest(0x1000, 0x9000, 0x2000, RelocateMode.KEYED).pack() == h(
        "0010000000000000 0090000000000000 0020000000000000 01000000 00000000")
    assert p.InspectRequest(0x4000, 3).pack() == h("0040000000000000 03000000 00000000")


@pytest.mark.parametrize(("parse", "raw"), [
    (p.MapRequest.unpack, h("0030000000000000 0020000000000000 05000000 02000000 0000000000000000")),
    (p.MapRequest.unpack, h("0030000000000000 0020000000000000 05000000 00000000 0100000000000000")),
    (p.MapRequest.unpack, h("0030000000000000 0020000000000000 05000000 00000000 00000000000000")),
    (p.FlushRequest.unpack, h("0010000000000000 0000000000000000")),
    (p.RelocateRequest.unpack, h("00" * 24 + "02000000 00000000")),
    (p.RelocateRequest.unpack, h("00" * 24 + "00000000 01000000")),
    (p.InspectRequest.unpack, h("0000000000000000 01000000 01000000")),
    (p.InspectRequest.unpack, h("0000000000000000 01010000 00000000")),
    (p.unpack_base, h("00000000000001")),
    (p.check_key_program, bytes(191)),
    (p.check_key_program, bytes(2) + h("00010001") + bytes(186)),  # KEYID_CTRL bit 24
    (p.check_key_program, bytes(40) + b"\x01" + bytes(151)),  # reserved byte 40
])
def test_malformed_request_payloads_are_payload_errors(parse: Callable[[bytes], object], raw: bytes) -> None:
    with pytest.raises(p.PayloadError):
        parse(raw)


def test_well_formed_request_payloads_decode() -> None:
    assert p.FlushRequest.unpack(bytes(16)) == p.FlushRequest(0, 0)
    raw_map = h("00" * 16 + "03000000 01000000 0900000000000000")
    assert p.MapRequest.unpack(raw_map) == p.MapRequest(0, 0, 3, 9)
    key = bytes(2) + h("00010000") + bytes(58) + b"\x11" * 64 + b"\x22" * 64
    assert p.check_key_program(key) == key


# -- reply bodies -----------------------------------------------------------------------------

def test_features_flush_and_stats_layouts_from_the_docs() -> None:
    assert p.Features(0, 2, p.Role.GUEST).pack() == FEATURES_GUEST
    assert p.FlushReply(3, 2).pack() == h("0300000000000000 0200000000000000")
    assert p.FlushReply.unpack(h("0300000000000000 0200000000000000")) == p.FlushReply(3, 2)
    stats_raw = h("".join(f"{i:02x}00000000000000" for i in range(1, 9))
                  + "000000000000e03f 000000000000d03f")
    stats = p.Stats(1, 2, 3, 4, 5, 6, 7, 8, 0.5, 0.25)
    assert stats.pack() == stats_raw and p.Stats.unpack(stats_raw) == stats


def test_config_layout_from_the_docs() -> None:
    raw = h("0000800000000000 0000020000000000 0000000001000000 40000000 02000000"
            "06000000 01000000 00100000 01000000") + b"/v"
    config = p.DeviceConfig(8 << 20, 128 << 10, 1 << 32, 64, TweakMode.LOGICAL, 6, TmePolicy.EPHEMERAL,
                            4096, 1, "/v")
    assert config.pack() == raw
    assert p.DeviceConfig.unpack(raw) == config
    assert len(raw) == 48 + 2 and p.DeviceConfig.unpack(raw[:48]).view is None
    dun = bytearray(raw)
    dun[28] = 3
    assert p.DeviceConfig.unpack(bytes(dun)).tweak is TweakMode.DUN
    assert config.as_dict()["tweak"] == "logical" and config.as_dict()["tme"] == "ephemeral"


def test_page_record_layout_from_the_docs() -> None:
    locked = h("0030000000000000 0000000007000000 0500 02 01 00000000") + b"v" * 16 + b"m" * 16
    record = p.PageRecord(0x3000, 7 << 32, 5, "random", True, None, b"v" * 16, b"m" * 16)
    assert record.pack() == locked and p.PageRecord.unpack_from(locked) == record
    checked = h("0010000000000000 0000000000000000 0100 01 06 00000000") + b"a" * 16 + b"b" * 16
    assert p.PageRecord.unpack_from(checked) == p.PageRecord(0x1000, 0, 1, "user", False, True,
                                                             b"a" * 16, b"b" * 16)
    body = h("02000000") + locked + checked
    assert p.unpack_inspect(body) == [record, p.PageRecord.unpack_from(checked)]
    with pytest.raises(ProtocolError):
        p.unpack_inspect(body[:-1])


# -- key programs -----------------------------------------------------------------------------

@pytest.mark.parametrize(("form", "command"), [
    ({"user": "00" * 15 + "01:" + "02" * 16}, 0), ({"random": True}, 1), ({"clear": True}, 2),
    ({}, 3), ({"options": "type=cpu algorithm=aes-xts-256"}, 1)])
def test_key_command_forms_build_the_right_struct(form: dict[str, object], command: int) -> None:
    program = p.key_program_from_choice(9, "aes-xts-128", **form)  # type: ignore[arg-type]
    raw = program.pack()
    assert len(raw) == 192 and int.from_bytes(raw[0:2], "little") == 9
    assert raw[2] == command
    assert p.check_key_program(raw) == raw


def test_a_user_key_without_a_colon_is_refused_without_echoing_it() -> None:
    secret = "ab" * 32
    with pytest.raises(KeyProgramError) as info:
        p.key_program_from_choice(1, user=secret)
    assert secret not in str(info.value)
