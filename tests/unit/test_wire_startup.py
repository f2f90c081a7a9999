"""proxy.wire.startup: the untyped packets of the startup phase."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.wire.framing import ProtocolViolation, StartupReader
from proxy.wire.startup import (
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST,
    PROTOCOL_3_0,
    SSL_REQUEST,
    CancelRequest,
    GSSENCRequest,
    SSLRequest,
    StartupMessage,
    decode_startup_packet,
)

HYP = settings(deadline=None, max_examples=200)

names = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), min_size=1)
values = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"))


def through_reader(packet: bytes) -> tuple[int, bytes]:
    reader = StartupReader(max_packet=1 << 20)
    reader.feed(packet)
    got = reader.next_packet()
    assert got is not None and reader.pending() == 0
    return got


@given(params=st.dictionaries(names, values, max_size=6))
@HYP
def test_startup_message_round_trip(params: dict[str, str]) -> None:
    msg = StartupMessage(PROTOCOL_3_0, tuple(params.items()))
    code, body = through_reader(msg.encode())
    assert code == PROTOCOL_3_0
    assert decode_startup_packet(code, body) == msg


def test_startup_message_encoding() -> None:
    msg = StartupMessage(PROTOCOL_3_0, (("user", "bob"),))
    body = b"user\0bob\0\0"
    assert msg.encode() == struct.pack("!II", 8 + len(body), PROTOCOL_3_0) + body


def test_startup_message_accessors() -> None:
    msg = StartupMessage(PROTOCOL_3_0 + 2, (("user", "budi"), ("application_name", "")))
    assert (msg.major, msg.minor) == (3, 2)
    assert msg.user == "budi"
    assert msg.database == "budi"  # defaults to the user name, as in PostgreSQL
    assert msg.get("application_name") == ""
    assert msg.get("options") is None
    assert msg.get("options", "x") == "x"
    with_db = StartupMessage(PROTOCOL_3_0, (("user", "budi"), ("database", "bank")))
    assert with_db.database == "bank"
    assert StartupMessage(PROTOCOL_3_0, ()).user == ""


def test_empty_parameter_list() -> None:
    assert StartupMessage.decode(PROTOCOL_3_0, b"\0") == StartupMessage(PROTOCOL_3_0, ())


def test_empty_value_is_kept() -> None:
    msg = StartupMessage.decode(PROTOCOL_3_0, b"user\0bob\0options\0\0\0")
    assert msg.params == (("user", "bob"), ("options", ""))


def test_duplicate_parameter_is_refused() -> None:
    # PostgreSQL would take the last "user"; a proxy that read the first would disagree with
    # the server about who is connecting.
    body = b"user\0alice\0user\0postgres\0\0"
    with pytest.raises(ProtocolViolation, match="given twice"):
        StartupMessage.decode(PROTOCOL_3_0, body)


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"", "expected terminator as last byte"),
        (b"user\0bob", "expected terminator as last byte"),
        (b"user\0bob\0", "expected terminator as last byte"),
        (b"user\0bob\0\0x\0", "expected terminator as last byte"),
        (b"user\0\0", "odd number of strings"),
        (b"user\0bob\0\0\0", "odd number of strings"),
        (b"user\0bob\0\0x\0\0", "empty parameter name"),
        (b"user\0b\xffb\0\0", "not UTF-8"),
    ],
)
def test_bad_layouts_are_refused(body: bytes, why: str) -> None:
    with pytest.raises(ProtocolViolation, match=why):
        StartupMessage.decode(PROTOCOL_3_0, body)


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (2 << 16, "unsupported frontend protocol 2.0: server supports 3.0 to 3.0"),
        ((4 << 16) | 1, "unsupported frontend protocol 4.1: server supports 3.0 to 3.0"),
        (1234, "unsupported frontend protocol 0.1234: server supports 3.0 to 3.0"),
    ],
)
def test_unsupported_protocol_version(code: int, text: str) -> None:
    with pytest.raises(ProtocolViolation) as exc:
        decode_startup_packet(code, b"user\0bob\0\0")
    assert str(exc.value) == text


def test_newer_minor_version_is_decoded() -> None:
    msg = decode_startup_packet(PROTOCOL_3_0 + 2, b"user\0bob\0\0")
    assert isinstance(msg, StartupMessage) and msg.minor == 2


def test_ssl_and_gssenc_requests() -> None:
    code, body = through_reader(SSL_REQUEST)
    assert decode_startup_packet(code, body) == SSLRequest()
    assert SSLRequest().encode() == SSL_REQUEST == b"\x00\x00\x00\x08\x04\xd2\x16\x2f"
    code, body = through_reader(GSSENC_REQUEST)
    assert decode_startup_packet(code, body) == GSSENCRequest()
    assert GSSENCRequest().encode() == GSSENC_REQUEST == b"\x00\x00\x00\x08\x04\xd2\x16\x30"


def test_ssl_request_with_a_body_is_refused() -> None:
    code, body = through_reader(struct.pack("!II", 12, 80877103) + b"abcd")
    with pytest.raises(ProtocolViolation, match="SSL request"):
        decode_startup_packet(code, body)
    code, body = through_reader(struct.pack("!II", 9, 80877104) + b"a")
    with pytest.raises(ProtocolViolation, match="GSSENC request"):
        decode_startup_packet(code, body)


@given(pid=st.integers(-(2**31), 2**31 - 1), key=st.binary(min_size=4, max_size=256))
@HYP
def test_cancel_request_round_trip(pid: int, key: bytes) -> None:
    req = CancelRequest(pid, key)
    code, body = through_reader(req.encode())
    assert code == CANCEL_REQUEST_CODE
    assert decode_startup_packet(code, body) == req


def test_cancel_request_encoding() -> None:
    assert CancelRequest(7, b"\x00\x00\x00\x09").encode() == (
        b"\x00\x00\x00\x10\x04\xd2\x16\x2e\x00\x00\x00\x07\x00\x00\x00\x09"
    )


@pytest.mark.parametrize("size", [0, 4, 7, 261])
def test_cancel_request_bad_length(size: int) -> None:
    with pytest.raises(ProtocolViolation, match="cancel request"):
        decode_startup_packet(CANCEL_REQUEST_CODE, b"\x01" * size)
