"""The protocol's framing and client, over a fake transport (no backend)."""

from __future__ import annotations

import pytest
from mktme_emu import protocol as p
from mktme_emu.errors import ErrorCode, ProtocolError, RemoteError


class FakeTransport:
    """Replays canned backend bytes and records what the client sent."""

    def __init__(self, incoming: bytes) -> None:
        self.incoming = incoming
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.sent.append(data)

    def recv_exact(self, size: int) -> tuple[bytes, list[int]]:
        if len(self.incoming) < size:
            raise ProtocolError("closed")
        data, self.incoming = self.incoming[:size], self.incoming[size:]
        return data, []

    def close(self) -> None:
        pass


def features_reply(role: int) -> bytes:
    return p.ok_reply(p.Request.GET_FEATURES, p.FEATURES_REPLY.pack(0, p.VERSION, role))


def test_request_is_framed_with_version_and_need_reply() -> None:
    transport = FakeTransport(features_reply(1))
    assert p.Client(transport).features() == {"features": 0, "version": 1, "role": 1}
    request, flags, size = p.parse_header(transport.sent[0][:12])
    assert (request, size) == (p.Request.GET_FEATURES, 0)
    assert flags == p.VERSION | p.FLAG_NEED_REPLY


def test_a_leftover_reply_to_another_request_is_skipped() -> None:
    stale = p.ok_reply(p.Request.FLUSH, p.U64.pack(3))
    transport = FakeTransport(stale + features_reply(0))
    assert p.Client(transport).features()["role"] == 0
    assert transport.incoming == b""


def test_garbage_error_from_the_backend_is_a_protocol_error() -> None:
    transport = FakeTransport(p.error_reply(0, ErrorCode.INVALID, "unsupported protocol version 2"))
    with pytest.raises(ProtocolError, match="unsupported protocol version 2"):
        p.Client(transport).features()


def test_refusal_carries_its_code_and_message() -> None:
    transport = FakeTransport(p.error_reply(p.Request.MAP, ErrorCode.RANGE, "not whole pages"))
    with pytest.raises(RemoteError, match="not whole pages") as info:
        p.Client(transport).map(1, 4096, 1)
    assert info.value.code == ErrorCode.RANGE


@pytest.mark.parametrize("flags", [0, 2, 3, 1 | 16])
def test_headers_with_bad_version_or_flags_are_refused(flags: int) -> None:
    with pytest.raises(ProtocolError):
        p.parse_header(p.HEADER.pack(1, flags, 0))


def test_oversize_payloads_are_refused_both_ways() -> None:
    with pytest.raises(ProtocolError):
        p.parse_header(p.HEADER.pack(1, p.VERSION, p.MAX_PAYLOAD + 1))
    with pytest.raises(ProtocolError):
        p.encode(p.Request.KEY_PROGRAM, bytes(p.MAX_PAYLOAD + 1))


def test_page_record_round_trip() -> None:
    record = p.PageRecord(0x3000, 7 << 32, 5, "random", True, None, b"v" * 16, b"m" * 16)
    packed = record.pack()
    assert len(packed) == p.PAGE_RECORD.size == 56
    assert p.PageRecord.unpack_from(packed, 0) == record


@pytest.mark.parametrize(("form", "command"), [
    ({"user": "00" * 15 + "01:" + "02" * 16}, 0), ({"random": True}, 1), ({"clear": True}, 2),
    ({}, 3), ({"options": "type=cpu algorithm=aes-xts-256"}, 1)])
def test_key_command_forms_build_the_right_struct(form: dict[str, object], command: int) -> None:
    program = p.key_program_from_choice(9, "aes-xts-128", **form)  # type: ignore[arg-type]
    raw = program.pack()
    assert len(raw) == 192 and int.from_bytes(raw[0:2], "little") == 9
    assert raw[2] == command


def test_a_user_key_without_a_colon_is_refused_without_echoing_it() -> None:
    from mktme_emu.errors import KeyProgramError
    secret = "ab" * 32
    with pytest.raises(KeyProgramError) as info:
        p.key_program_from_choice(1, user=secret)
    assert secret not in str(info.value)
