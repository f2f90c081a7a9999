"""proxy.wire.messages: every message class round-trips, and decoding is strict."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wirekit import field_values, int16s, int32s, pg_text, uint32s

from proxy.wire import messages as m
from proxy.wire.framing import (
    BACKEND_LIMITS,
    FRONTEND_LIMITS,
    Limits,
    MessageReader,
    ProtocolViolation,
)

HYP = settings(deadline=None, max_examples=200)

# Both directions, with every type a class can write (CopyResponse kinds, ErrorFields as 'N').
ANY = Limits(
    max_message=1 << 20,
    allowed_types=FRONTEND_LIMITS.allowed_types | BACKEND_LIMITS.allowed_types,
    small_types=frozenset(),
)


def frame_one(encoded: bytes) -> tuple[int, memoryview]:
    """Frame exactly one message out of encoded, which must hold nothing else."""
    reader = MessageReader(ANY)
    reader.feed(encoded)
    msg = reader.next_message()
    assert msg is not None, "not a whole message"
    assert reader.pending() == 0, "bytes after the message"
    return msg


def round_trip(msg: Any) -> Any:
    mtype, body = frame_one(msg.encode())
    assert bytes([mtype]) == msg.TYPE
    return type(msg).decode(body)


# --------------------------------------------------------------------------- strategies

bytes_values = st.lists(field_values, max_size=6).map(tuple)
int16_lists = st.lists(int16s, max_size=6).map(tuple)

field_descriptions = st.builds(
    m.FieldDescription,
    name=pg_text,
    table_oid=uint32s,
    column=int16s,
    type_oid=uint32s,
    type_size=int16s,
    type_modifier=int32s,
    format=int16s,
)

MESSAGES = st.one_of(
    st.builds(m.Query, sql=pg_text),
    st.builds(
        m.Parse, name=pg_text, sql=pg_text, param_types=st.lists(uint32s, max_size=5).map(tuple)
    ),
    st.builds(
        m.Bind,
        portal=pg_text,
        statement=pg_text,
        param_formats=int16_lists,
        params=bytes_values,
        result_formats=int16_lists,
    ),
    st.builds(m.Describe, kind=st.sampled_from("SP"), name=pg_text),
    st.builds(m.Execute, portal=pg_text, max_rows=int32s),
    st.builds(m.Close, kind=st.sampled_from("SP"), name=pg_text),
    st.builds(
        m.FunctionCall,
        function_oid=uint32s,
        arg_formats=int16_lists,
        args=bytes_values,
        result_format=int16s,
    ),
    st.builds(m.CopyFail, message=pg_text),
    st.builds(m.CopyData, data=st.binary(max_size=50)),
    st.builds(m.Authentication, code=int32s, data=st.binary(max_size=30)),
    st.builds(m.BackendKeyData, process_id=int32s, secret_key=st.binary(min_size=4, max_size=256)),
    st.builds(m.ParameterStatus, name=pg_text, value=pg_text),
    st.builds(m.ReadyForQuery, status=st.sampled_from("ITE")),
    st.builds(m.CommandComplete, tag=pg_text),
    st.builds(m.RowDescription, fields=st.lists(field_descriptions, max_size=4).map(tuple)),
    st.builds(m.ParameterDescription, type_oids=st.lists(uint32s, max_size=8).map(tuple)),
    st.builds(m.NotificationResponse, process_id=int32s, channel=pg_text, payload=pg_text),
    st.builds(
        m.NegotiateProtocolVersion,
        newest_minor=int32s,
        unrecognized=st.lists(pg_text, max_size=4).map(tuple),
    ),
    st.builds(m.FunctionCallResponse, value=field_values),
)


@given(msg=MESSAGES)
@HYP
def test_round_trip(msg: Any) -> None:
    assert round_trip(msg) == msg


@given(values=st.lists(field_values, max_size=8))
@HYP
def test_data_row_round_trip(values: list[bytes | None]) -> None:
    row = m.DataRow(tuple(values))
    mtype, body = frame_one(row.encode())
    assert mtype == ord("D")
    decoded = m.DataRow.decode(body)
    assert [None if v is None else bytes(v) for v in decoded.values] == values
    assert m.encode_data_row(decoded.values) == row.encode()


@given(
    kind=st.sampled_from([b"G", b"H", b"W"]),
    fmt=st.integers(0, 255),
    cols=int16_lists,
)
@HYP
def test_copy_response_round_trip(kind: bytes, fmt: int, cols: tuple[int, ...]) -> None:
    msg = m.CopyResponse(kind, fmt, cols)
    mtype, body = frame_one(msg.encode())
    assert bytes([mtype]) == kind
    assert m.CopyResponse.decode_as(kind, body) == msg


error_codes = st.sampled_from("SVCMDHPpqWstcdnFLR")


@given(
    fields=st.lists(st.tuples(error_codes, pg_text), max_size=8).map(tuple),
    mtype=st.sampled_from([b"E", b"N"]),
)
@HYP
def test_error_fields_round_trip(fields: tuple[tuple[str, str], ...], mtype: bytes) -> None:
    encoded = m.ErrorFields(fields).encode_as(mtype)
    got_type, body = frame_one(encoded)
    assert bytes([got_type]) == mtype
    assert m.ErrorFields.decode(body) == m.ErrorFields(fields)


def test_constant_messages_are_well_formed() -> None:
    for const, letter in [
        (m.SYNC, "S"),
        (m.FLUSH, "H"),
        (m.TERMINATE, "X"),
        (m.COPY_DONE, "c"),
        (m.EMPTY_QUERY_RESPONSE, "I"),
        (m.PARSE_COMPLETE, "1"),
        (m.BIND_COMPLETE, "2"),
        (m.CLOSE_COMPLETE, "3"),
        (m.NO_DATA, "n"),
        (m.PORTAL_SUSPENDED, "s"),
    ]:
        mtype, body = frame_one(const)
        assert chr(mtype) == letter and bytes(body) == b""
    assert m.AUTHENTICATION_OK == b"R\x00\x00\x00\x08\x00\x00\x00\x00"


def test_known_encodings() -> None:
    assert m.Query("SELECT 1").encode() == b"Q\x00\x00\x00\x0dSELECT 1\x00"
    assert m.ReadyForQuery("T").encode() == b"Z\x00\x00\x00\x05T"
    assert m.Execute("", 0).encode() == b"E\x00\x00\x00\x09\x00\x00\x00\x00\x00"
    assert m.DataRow((b"ab", None)).encode() == (
        b"D\x00\x00\x00\x10\x00\x02\x00\x00\x00\x02ab\xff\xff\xff\xff"
    )


# --------------------------------------------------------------------------- strictness

STRINGS_ONLY = [
    (m.Query, b"SELECT 1\0"),
    (m.CommandComplete, b"SELECT 1\0"),
    (m.CopyFail, b"boom\0"),
    (m.ParameterStatus, b"TimeZone\0UTC\0"),
]

FIXED = [
    (m.Parse, m.Parse("s1", "SELECT $1", (23,)).encode()[5:]),
    (m.Bind, m.Bind("p", "s", (0, 1), (b"x", None), (1,)).encode()[5:]),
    (m.Describe, b"Sname\0"),
    (m.Close, b"Pname\0"),
    (m.Execute, b"portal\0\x00\x00\x00\x05"),
    (m.FunctionCall, m.FunctionCall(1234, (0,), (b"a",), 1).encode()[5:]),
    (m.ReadyForQuery, b"I"),
    (m.RowDescription, m.RowDescription((m.FieldDescription("a", 1, 2, 3, 4, 5, 0),)).encode()[5:]),
    (m.ParameterDescription, b"\x00\x02\x00\x00\x00\x17\x00\x00\x00\x19"),
    (m.NotificationResponse, b"\x00\x00\x00\x01chan\0payload\0"),
    (m.NegotiateProtocolVersion, b"\x00\x00\x00\x00\x00\x00\x00\x01_pq_.x\0"),
    (m.FunctionCallResponse, b"\x00\x00\x00\x02ok"),
    (m.ErrorFields, b"SERROR\0C42601\0Mbad\0\0"),
    *STRINGS_ONLY,
]


@pytest.mark.parametrize(("cls", "body"), FIXED, ids=[c.__name__ for c, _ in FIXED])
def test_valid_body_decodes(cls: Any, body: bytes) -> None:
    cls.decode(body)
    cls.decode(memoryview(body))


@pytest.mark.parametrize(("cls", "body"), FIXED, ids=[c.__name__ for c, _ in FIXED])
def test_every_truncation_is_refused(cls: Any, body: bytes) -> None:
    for n in range(len(body)):
        with pytest.raises(ProtocolViolation):
            cls.decode(body[:n])


@pytest.mark.parametrize(("cls", "body"), FIXED, ids=[c.__name__ for c, _ in FIXED])
def test_trailing_bytes_are_refused(cls: Any, body: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        cls.decode(body + b"\0")
    with pytest.raises(ProtocolViolation):
        cls.decode(body + b"xyz")


@pytest.mark.parametrize(("cls", "body"), STRINGS_ONLY, ids=[c.__name__ for c, _ in STRINGS_ONLY])
def test_missing_string_terminator_is_refused(cls: Any, body: bytes) -> None:
    with pytest.raises(ProtocolViolation, match="not terminated"):
        cls.decode(body[:-1])


def test_invalid_utf8_is_refused() -> None:
    with pytest.raises(ProtocolViolation, match="invalid UTF-8"):
        m.Query.decode(b"SELECT '\xff'\0")


def test_trailing_bytes_message() -> None:
    with pytest.raises(ProtocolViolation, match="Query: unexpected trailing bytes"):
        m.Query.decode(b"SELECT 1\0\0")


@pytest.mark.parametrize("cls", [m.Describe, m.Close])
def test_describe_and_close_kind_must_be_s_or_p(cls: Any) -> None:
    with pytest.raises(ProtocolViolation, match="invalid kind 'X'"):
        cls.decode(b"Xname\0")


def test_ready_for_query_status_must_be_known() -> None:
    with pytest.raises(ProtocolViolation, match="invalid status 'Q'"):
        m.ReadyForQuery.decode(b"Q")


@pytest.mark.parametrize("size", [0, 3, 257])
def test_backend_key_secret_length(size: int) -> None:
    with pytest.raises(ProtocolViolation, match="secret key length"):
        m.BackendKeyData.decode(b"\x00\x00\x00\x01" + b"k" * size)


def test_negative_counts_are_refused() -> None:
    neg = struct.pack("!h", -1)
    with pytest.raises(ProtocolViolation, match="negative count"):
        m.Parse.decode(b"\0SELECT 1\0" + neg)
    with pytest.raises(ProtocolViolation, match="negative count"):
        m.Bind.decode(b"\0\0" + neg)
    with pytest.raises(ProtocolViolation, match="negative count"):
        m.RowDescription.decode(neg)
    with pytest.raises(ProtocolViolation, match="negative count"):
        m.NegotiateProtocolVersion.decode(b"\0\0\0\0\xff\xff\xff\xff")
    with pytest.raises(ProtocolViolation, match="negative count"):
        m.CopyResponse.decode_as(b"H", b"\x00" + neg)


def test_bind_negative_parameter_length_is_refused() -> None:
    body = b"\0\0" + b"\x00\x00" + b"\x00\x01" + struct.pack("!i", -2) + b"\x00\x00"
    with pytest.raises(ProtocolViolation, match="negative length"):
        m.Bind.decode(body)


def test_bind_null_parameter() -> None:
    body = b"\0\0" + b"\x00\x00" + b"\x00\x01" + struct.pack("!i", -1) + b"\x00\x00"
    assert m.Bind.decode(body).params == (None,)


def test_error_fields_without_final_terminator() -> None:
    with pytest.raises(ProtocolViolation):
        m.ErrorFields.decode(b"SERROR\0")
    with pytest.raises(ProtocolViolation):
        m.ErrorFields.decode(b"")


def test_authentication_keeps_its_data() -> None:
    sasl = b"SCRAM-SHA-256\0\0"
    auth = m.Authentication.decode(struct.pack("!i", m.AUTH_SASL) + sasl)
    assert auth == m.Authentication(10, sasl)
    with pytest.raises(ProtocolViolation):
        m.Authentication.decode(b"\x00\x00")


# --------------------------------------------------------------------------- split_data_row


def test_split_data_row_nulls_and_empty_values() -> None:
    body = m.encode_data_row([None, b"", b"abc", None])[5:]
    fields = m.split_data_row(body)
    assert len(fields) == 4
    assert fields[0] is None and fields[3] is None
    assert fields[1] is not None and bytes(fields[1]) == b""
    assert fields[2] is not None and bytes(fields[2]) == b"abc"


def test_split_data_row_is_zero_copy() -> None:
    body = memoryview(m.encode_data_row([b"abc"])[5:])
    (field,) = m.split_data_row(body)
    assert isinstance(field, memoryview)
    assert field.obj is body.obj


def test_split_data_row_zero_columns() -> None:
    assert m.split_data_row(b"\x00\x00") == ()


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"", "too short"),
        (b"\x00", "too short"),
        (b"\xff\xff", "negative count"),
        (b"\x00\x01", "too short"),
        (b"\x00\x01\x00\x00\x00", "too short"),
        (b"\x00\x01\x00\x00\x00\x05abc", "invalid field length"),
        (b"\x00\x01\xff\xff\xff\xfe", "invalid field length"),
        (b"\x00\x01\x80\x00\x00\x00", "invalid field length"),
        (b"\x00\x01\x00\x00\x00\x01ab", "trailing bytes"),
        (b"\x00\x00\x00", "trailing bytes"),
        (b"\x00\x02\x00\x00\x00\x01a", "too short"),
    ],
)
def test_split_data_row_refuses_bad_bodies(body: bytes, why: str) -> None:
    with pytest.raises(ProtocolViolation, match=why):
        m.split_data_row(body)


# --------------------------------------------------------------------------- Bind.result_format


def test_result_format_none_given_means_text() -> None:
    bind = m.Bind("", "")
    assert [bind.result_format(i) for i in range(3)] == [0, 0, 0]


def test_result_format_one_given_applies_to_all() -> None:
    bind = m.Bind("", "", result_formats=(1,))
    assert [bind.result_format(i) for i in range(5)] == [1] * 5


def test_result_format_per_column() -> None:
    bind = m.Bind("", "", result_formats=(0, 1, 1))
    assert [bind.result_format(i) for i in range(3)] == [0, 1, 1]


# --------------------------------------------------------------------------- error_response


def test_error_response_fields() -> None:
    raw = m.error_response("42501", "topeng: no", detail="the detail", hint="the hint")
    mtype, body = frame_one(raw)
    assert mtype == ord("E")
    fields = m.ErrorFields.decode(body)
    assert fields.fields == (
        ("S", "ERROR"),
        ("V", "ERROR"),
        ("C", "42501"),
        ("M", "topeng: no"),
        ("D", "the detail"),
        ("H", "the hint"),
    )
    assert fields.sqlstate == "42501"
    assert fields.message == "topeng: no"
    assert fields.severity == "ERROR"
    assert fields.get("P", "none") == "none"


def test_error_response_without_detail_or_hint() -> None:
    fields = m.ErrorFields.decode(frame_one(m.error_response("0A000", "x", severity="FATAL"))[1])
    assert [k for k, _ in fields.fields] == ["S", "V", "C", "M"]
    assert fields.severity == "FATAL"


def test_severity_prefers_the_nonlocalized_field() -> None:
    fields = m.ErrorFields((("S", "FEHLER"), ("V", "ERROR")))
    assert fields.severity == "ERROR"
    assert m.ErrorFields((("S", "FEHLER"),)).severity == "FEHLER"


def test_notice_response() -> None:
    mtype, body = frame_one(m.notice_response("careful"))
    fields = m.ErrorFields.decode(body)
    assert mtype == ord("N")
    assert fields.message == "careful" and fields.sqlstate == "00000"
    assert fields.severity == "NOTICE"


# --------------------------------------------------------------------------- Cursor


def test_cursor_reads_signed_and_unsigned() -> None:
    c = m.Cursor(b"\xff" * 10, "t")
    assert c.int16() == -1
    assert c.uint16() == 0xFFFF
    assert c.int32() == -1
    with pytest.raises(ProtocolViolation, match="t: message too short"):
        c.uint32()


def test_cursor_raw_negative() -> None:
    with pytest.raises(ProtocolViolation, match="negative length"):
        m.Cursor(b"abc", "t").raw(-1)


# --------------------------------------------------------------------------- fast decoders

# Decoders with an unchecked fast path fall back to the checked (Cursor) one on anything odd.
FAST = {
    m.Query: st.builds(m.Query, sql=pg_text),
    m.Bind: st.builds(
        m.Bind,
        portal=pg_text,
        statement=pg_text,
        param_formats=int16_lists,
        params=bytes_values,
        result_formats=int16_lists,
    ),
    m.Describe: st.builds(m.Describe, kind=st.sampled_from("SP"), name=pg_text),
    m.Execute: st.builds(m.Execute, portal=pg_text, max_rows=int32s),
    m.ReadyForQuery: st.builds(m.ReadyForQuery, status=st.sampled_from("ITE")),
}


def _outcome(decode: Any, body: bytes | memoryview) -> object:
    try:
        return decode(body)
    except ProtocolViolation as exc:
        return ("refused", str(exc))


@pytest.mark.parametrize("cls", list(FAST), ids=[c.__name__ for c in FAST])
@given(data=st.data(), noise=st.binary(max_size=40))
@HYP
def test_fast_decoders_agree_with_the_checked_ones(cls: Any, data: Any, noise: bytes) -> None:
    """Valid bodies, their truncations, extensions and byte flips, and noise: the same message
    or the same refusal either way."""
    msg = data.draw(FAST[cls])
    body = msg.encode()[5:]
    cut = data.draw(st.integers(0, len(body)))
    flipped = bytearray(body)
    if flipped:
        flipped[data.draw(st.integers(0, len(body) - 1))] ^= data.draw(st.integers(1, 255))
    for candidate in (body, body[:cut], body + noise[:3], bytes(flipped), noise):
        fast = _outcome(cls.decode, candidate)
        assert fast == _outcome(cls._decode_checked, candidate)
        assert _outcome(cls.decode, memoryview(candidate)) == fast
    assert cls.decode(body) == msg


@given(msg=FAST[m.Bind], data=st.data())
@HYP
def test_bind_target_reads_what_bind_decode_reads(msg: m.Bind, data: Any) -> None:
    body = msg.encode()[5:]
    cut = data.draw(st.integers(0, len(body)))
    for candidate in (body, body[:cut], body + b"\0"):
        bind = _outcome(m.Bind.decode, candidate)
        expected = (
            (bind.portal, bind.statement, bind.result_formats) if isinstance(bind, m.Bind) else bind
        )
        assert _outcome(m.bind_target, candidate) == expected


def test_error_severity_reads_no_text() -> None:
    # The text fields are in the client_encoding (here LATIN9's euro sign, not UTF-8).
    body = b"SFATAL\0VFATAL\0C57P01\0Mterminating \xa4\0\0"
    assert m.error_severity(body) == "FATAL"
    assert m.error_severity(b"SFATAL\0Mx\0\0") == "FATAL"  # before PostgreSQL 9.6: no V
    assert m.error_severity(b"SSCHWERWIEGEND\0VFATAL\0\0") == "FATAL"  # V beats localized S
    assert m.error_severity(m.error_response("42601", "syntax error")[5:]) == "ERROR"
    assert m.error_severity(b"SFATAL") == ""  # malformed
    assert m.error_severity(b"") == ""


def test_strings_in_another_encoding() -> None:
    body = "select '\u20ac'".encode("iso8859-15") + b"\0"
    assert m.Query.decode(body, "iso8859-15").sql == "select '\u20ac'"
    with pytest.raises(ProtocolViolation, match="invalid UTF-8"):
        m.Query.decode(body)
    parse = m.frame(b"P", "s\u20ac\0select 1\0\0\0".encode("iso8859-15"))
    assert m.Parse.decode(parse[5:], "iso8859-15").name == "s\u20ac"
    fields = m.ErrorFields((("S", "ERROR"), ("M", "\u20ac")))
    raw = fields.encode_as(b"E", "iso8859-15")
    assert raw.endswith(b"M\xa4\0\0")
    assert m.ErrorFields.decode(raw[5:], "iso8859-15") == fields
