"""proxy.policy.masks: every mask on every type in both formats keeps the column's type valid;
the NIK case; RowMasker splicing; COPY text, CSV and binary maskers."""

from __future__ import annotations

import struct
import uuid
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.policy import fakedata
from proxy.policy import pgtypes as pt
from proxy.policy.masks import (
    MASK_NAMES,
    FieldMasker,
    MaskNotApplicable,
    RowMasker,
    build_copy_masker,
    build_field_masker,
    mask_applies,
)
from proxy.policy.rules import FAKE_KINDS, MASKS, load_rules
from proxy.wire.framing import ProtocolViolation
from proxy.wire.messages import split_data_row

KEY = b"test-key-0123456789abcdef"
REPO = Path(__file__).resolve().parents[2]
NUMERIC_15_2 = (15 << 16 | 2) + 4


def char_n(n: int) -> int:
    return n + 4


def masker(
    mask: str, params: Mapping[str, object], oid: int, typmod: int = -1, fmt: int = 0
) -> FieldMasker:
    return build_field_masker(mask, params, type_oid=oid, typmod=typmod, fmt=fmt, hash_key=KEY)


def run(m: FieldMasker, value: bytes) -> bytes | None:
    return m(memoryview(value))


# (oid, typmod, python value) - one sample per supported column type
SAMPLES: list[tuple[int, int, object]] = [
    (pt.BOOL, -1, True),
    (pt.BYTEA, -1, b"\x00secret\xff"),
    (pt.CHAR, -1, b"x"),
    (pt.NAME, -1, "budi_santoso"),
    (pt.INT2, -1, 12345),
    (pt.INT4, -1, -123456789),
    (pt.INT8, -1, 1234567890123),
    (pt.OID, -1, 4_000_000_000),
    (pt.TEXT, -1, "Siti Rahayu"),
    (pt.BPCHAR, char_n(16), "3273014501900001"),
    (pt.BPCHAR, char_n(12), "abc         "),
    (pt.VARCHAR, char_n(14), "budi@gmail.com"),
    (pt.JSON, -1, '{"nik": "3273014501900001"}'),
    (pt.JSONB, -1, '{"nik": "3273014501900001"}'),
    (pt.XML, -1, "<a>secret</a>"),
    (pt.FLOAT4, -1, 1234.5),
    (pt.FLOAT8, -1, -98765.4321),
    (pt.NUMERIC, NUMERIC_15_2, Decimal("12345678.90")),
    (pt.NUMERIC, -1, Decimal("-0.000123")),
    (pt.DATE, -1, pt.date_from_ymd(1990, 5, 17)),
    (pt.TIME, -1, 45_296_500_000),
    (pt.TIMESTAMP, -1, 762_000_123_456_789),
    (pt.TIMESTAMPTZ, -1, 762_000_123_456_789),
    (pt.INTERVAL, -1, pt.Interval(14, 3, 3_600_000_000)),
    (pt.UUID, -1, uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")),
    (pt.TEXT_ARRAY, -1, pt.PgArray.of(["a b", None, "Siti"])),
    (pt.BPCHAR_ARRAY, char_n(16), pt.PgArray.of(["3273014501900001", "3273014501900002"])),
    (pt.INT4_ARRAY, -1, pt.PgArray(((1, 2, 3, 4)), (2, 2), (1, 1))),
    (pt.NUMERIC_ARRAY, NUMERIC_15_2, pt.PgArray.of([Decimal("1500000.00"), None])),
    (pt.DATE_ARRAY, -1, pt.PgArray.of([pt.date_from_ymd(2024, 3, 9)])),
    (pt.JSONB_ARRAY, -1, pt.PgArray.of(['{"a": 1}'])),
    (pt.UUID_ARRAY, -1, pt.PgArray.of([uuid.UUID("1b4e28ba-2fa1-11d2-883f-0016d3cca427")])),
]

CONSTANTS: dict[pt.Kind, object] = {
    pt.Kind.BOOL: False,
    pt.Kind.BYTEA: "\\x00",
    pt.Kind.CHAR: "-",
    pt.Kind.STRING: "hidden",
    pt.Kind.XML: "hidden",
    pt.Kind.JSON: "hidden",
    pt.Kind.JSONB: '{"hidden": true}',
    pt.Kind.INT: 7,
    pt.Kind.OID: 7,
    pt.Kind.FLOAT: 1.5,
    pt.Kind.NUMERIC: 1000,
    pt.Kind.DATE: "1970-01-01",
    pt.Kind.TIME: "12:00:00",
    pt.Kind.TIMESTAMP: "1970-01-01 00:00:00",
    pt.Kind.TIMESTAMPTZ: "1970-01-01 00:00:00+00",
    pt.Kind.INTERVAL: "1 day",
    pt.Kind.UUID: "00000000-0000-0000-0000-000000000001",
}


def base_kind(oid: int) -> pt.Kind:
    t = pt.TYPES[oid]
    return pt.TYPES[t.elem_oid].kind if t.kind is pt.Kind.ARRAY else t.kind


def mask_variants(oid: int) -> list[tuple[str, dict[str, object]]]:
    out: list[tuple[str, dict[str, object]]] = [
        ("partial", {"keep_first": 2, "keep_last": 1, "char": "*"}),
        ("redact", {"char": "*"}),
        ("null", {}),
        ("hash", {}),
        ("email", {}),
        ("round", {"to": 1000}),
        ("round", {"to": "month"}),
        ("round", {"to": "year"}),
        ("constant", {"value": CONSTANTS[base_kind(oid)]}),
        ("constant", {"value": None}),
    ]
    out += [("fake", {"kind": k}) for k in FAKE_KINDS]
    return out


CASES = [
    pytest.param(oid, typmod, value, mask, params, fmt, id=f"{pt.TYPES[oid].name}-{mask}{i}-{fmt}")
    for oid, typmod, value in SAMPLES
    for i, (mask, params) in enumerate(mask_variants(oid))
    for fmt in (0, 1)
]


def encode(oid: int, value: object, fmt: int) -> bytes:
    return pt.encode_text(oid, value) if fmt == 0 else pt.encode_binary(oid, value)


def decode(oid: int, data: bytes, fmt: int) -> object:
    return pt.decode_text(oid, data) if fmt == 0 else pt.decode_binary(oid, data)


def check_type_valid(oid: int, typmod: int, out: bytes, fmt: int) -> object:
    """The masked bytes decode as the column's type and respect its length limit."""
    value = decode(oid, out, fmt)
    t = pt.TYPES[oid]
    values = value.elements if isinstance(value, pt.PgArray) else [value]
    elem = t.elem_oid if t.kind is pt.Kind.ARRAY else oid
    for v in values:
        if v is None:
            continue
        if elem == pt.BPCHAR and typmod >= 4:
            assert isinstance(v, str) and len(v) == typmod - 4
        if elem == pt.VARCHAR and typmod >= 4:
            assert isinstance(v, str) and len(v) <= typmod - 4
        if elem == pt.NAME:
            assert isinstance(v, str) and len(v.encode()) <= 63
        if elem == pt.NUMERIC and typmod >= 4 and isinstance(v, Decimal) and v.is_finite():
            precision, scale = pt.numeric_typmod(typmod) or (0, 0)
            assert -v.as_tuple().exponent <= scale  # type: ignore[operator]
            assert v.adjusted() < precision - scale
        if elem in (pt.JSON, pt.JSONB):
            import json

            assert isinstance(v, str)
            json.loads(v)
    return value


@pytest.mark.parametrize(("oid", "typmod", "value", "mask", "params", "fmt"), CASES)
def test_every_mask_on_every_type(
    oid: int, typmod: int, value: object, mask: str, params: dict[str, object], fmt: int
) -> None:
    try:
        m = masker(mask, params, oid, typmod, fmt)
    except MaskNotApplicable as exc:
        assert str(exc)
        assert mask_applies(mask, params, oid, typmod) == str(exc)
        assert mask != "null"
        return
    assert mask_applies(mask, params, oid, typmod) is None
    raw = encode(oid, value, fmt)
    out = run(m, raw)
    if mask == "null" or (mask == "constant" and params["value"] is None):
        assert out is None
        return
    if out is None:  # redact on dates and the like
        assert mask == "redact"
        return
    masked = check_type_valid(oid, typmod, out, fmt)
    if mask in ("partial", "redact", "hash", "fake") and base_kind(oid) in (
        pt.Kind.STRING,
        pt.Kind.BYTEA,
        pt.Kind.JSON,
        pt.Kind.JSONB,
        pt.Kind.UUID,
    ):
        assert masked != value
    # the same value in the other format masks to the same value (timestamptz text keeps its
    # UTC offset, which is +00 here, so it agrees too)
    other = masker(mask, params, oid, typmod, 1 - fmt)
    out2 = run(other, encode(oid, value, 1 - fmt))
    assert out2 is not None
    v2 = decode(oid, out2, 1 - fmt)
    if oid not in (pt.FLOAT4, pt.FLOAT8):
        assert v2 == masked or (oid == pt.INT4_ARRAY and mask == "partial")


def test_applicability_table() -> None:
    assert mask_applies("email", {}, pt.INT4) is not None
    assert mask_applies("round", {"to": 1000}, pt.TEXT) is not None
    assert mask_applies("round", {"to": "month"}, pt.NUMERIC) is not None
    assert mask_applies("round", {"to": 1000}, pt.DATE) is not None
    assert mask_applies("round", {"to": 2.5}, pt.INT4) is not None
    assert mask_applies("round", {"to": 2.5}, pt.NUMERIC) is None
    assert mask_applies("partial", {"keep_first": 1}, pt.DATE) is not None
    assert mask_applies("null", {}, 99999) is None  # unknown types can still be nulled
    assert mask_applies("redact", {}, 99999) is not None
    assert mask_applies("constant", {"value": "too long for it"}, pt.BPCHAR, char_n(4))
    assert mask_applies("constant", {"value": 99999}, pt.INT2) is not None
    assert mask_applies("constant", {"value": "abc"}, pt.DATE) is not None
    assert mask_applies("constant", {"value": 1e20}, pt.NUMERIC, NUMERIC_15_2) is not None
    assert set(MASK_NAMES) == set(MASKS)
    assert tuple(fakedata.FAKE_KINDS) == tuple(FAKE_KINDS)


# -- the NIK case -------------------------------------------------------------------------------

NIKS = st.from_regex(r"[1-9][0-9]{15}", fullmatch=True)


def bank_nik_params() -> dict[str, object]:
    rules = load_rules(REPO / "rules" / "bank.yaml")
    policy = rules.policy_for("agent", "nik")
    assert policy.kind == "mask" and policy.mask == "partial"
    return dict(policy.params)


@given(NIKS, st.sampled_from([0, 1]))
def test_nik_partial_keeps_region_never_serial(nik: str, fmt: int) -> None:
    params = bank_nik_params() if fmt == 0 else {"keep_first": 6, "keep_last": 0, "char": "*"}
    m = masker("partial", params, pt.BPCHAR, char_n(16), fmt)
    out = run(m, nik.encode())
    assert out is not None
    text = out.decode()
    assert len(text) == 16
    assert text[:6] == nik[:6]
    assert text[6:] == "*" * 10
    assert not any(c.isdigit() for c in text[6:])
    assert text != nik


def test_nik_bank_rules_example() -> None:
    assert bank_nik_params()["keep_first"] == 6
    m = masker("partial", bank_nik_params(), pt.BPCHAR, char_n(16))
    assert run(m, b"3273014501900001") == b"327301**********"


@given(NIKS)
def test_nik_hash_is_format_preserving_and_deterministic(nik: str) -> None:
    text_m = masker("hash", {}, pt.BPCHAR, char_n(16), 0)
    bin_m = masker("hash", {}, pt.BPCHAR, char_n(16), 1)
    text_out = run(text_m, nik.encode())
    assert text_out is not None and len(text_out) == 16 and text_out.isdigit()
    assert text_out != nik.encode()
    assert run(text_m, nik.encode()) == text_out
    assert run(bin_m, nik.encode()) == text_out
    # text and varchar columns hash the same NIK the same way (joins still work)
    assert run(masker("hash", {}, pt.TEXT), nik.encode()) == text_out
    # another key, another hash
    other = build_field_masker(
        "hash", {}, type_oid=pt.BPCHAR, typmod=char_n(16), fmt=0, hash_key=b"other"
    )
    assert run(other, nik.encode()) != text_out


# -- properties -----------------------------------------------------------------------------------

STRINGS = st.text(
    alphabet=st.characters(codec="utf-8", blacklist_characters="\x00"),
    max_size=40,
)
STRING_MASKS = [
    ("partial", {"keep_first": 2, "keep_last": 2, "char": "*"}),
    ("redact", {"char": "x"}),
    ("hash", {}),
    ("email", {}),
    ("fake", {"kind": "name"}),
    ("fake", {"kind": "address"}),
    ("fake", {"kind": "email"}),
]


@settings(max_examples=60)
@given(STRINGS, st.sampled_from(STRING_MASKS), st.integers(1, 40), st.sampled_from([0, 1]))
def test_string_lengths_kept(
    s: str, mask_params: tuple[str, dict[str, object]], n: int, fmt: int
) -> None:
    mask, params = mask_params
    s = s[:n]
    bp = masker(mask, params, pt.BPCHAR, char_n(n), fmt)
    out = run(bp, s.ljust(n).encode())
    assert out is not None and len(out.decode()) == n
    vc = masker(mask, params, pt.VARCHAR, char_n(n), fmt)
    out = run(vc, s.encode())
    assert out is not None and len(out.decode()) <= n
    if mask in ("partial", "redact"):
        assert len(out.decode()) == len(s)
    nm = masker(mask, params, pt.NAME, -1, fmt)
    out = run(nm, s.encode()[:63].decode("utf-8", "ignore").encode())
    assert out is not None and len(out) <= 63


INT_TYPES = [pt.INT2, pt.INT4, pt.INT8, pt.OID]
NUM_MASKS = [
    ("partial", {"keep_first": 1, "keep_last": 1, "char": "9"}),
    ("redact", {"char": "*"}),
    ("hash", {}),
    ("round", {"to": 1000}),
]


@given(st.data(), st.sampled_from(INT_TYPES), st.sampled_from(NUM_MASKS), st.sampled_from([0, 1]))
def test_integers_stay_in_range(
    data: st.DataObject, oid: int, mask_params: tuple[str, dict[str, object]], fmt: int
) -> None:
    lo, hi = pt.int_range(oid)
    v = data.draw(st.integers(lo, hi))
    mask, params = mask_params
    out = run(masker(mask, params, oid, -1, fmt), encode(oid, v, fmt))
    assert out is not None
    masked = decode(oid, out, fmt)
    assert isinstance(masked, int) and lo <= masked <= hi
    if mask == "round":
        assert masked % 1000 == 0 and abs(masked) <= abs(v)


@given(
    st.decimals(
        min_value=Decimal("-9999999999999.99"),
        max_value=Decimal("9999999999999.99"),
        places=2,
        allow_nan=False,
    ),
    st.sampled_from(NUM_MASKS + [("round", {"to": 1_000_000}), ("round", {"to": 0.5})]),
    st.sampled_from([0, 1]),
)
def test_numerics_keep_typmod(
    d: Decimal, mask_params: tuple[str, dict[str, object]], fmt: int
) -> None:
    mask, params = mask_params
    out = run(masker(mask, params, pt.NUMERIC, NUMERIC_15_2, fmt), encode(pt.NUMERIC, d, fmt))
    assert out is not None
    masked = check_type_valid(pt.NUMERIC, NUMERIC_15_2, out, fmt)
    assert isinstance(masked, Decimal)
    assert masked.as_tuple().exponent == -2  # the scale is kept
    if mask == "round":
        assert abs(masked) <= abs(d)
        assert masked % Decimal(str(params["to"])) == 0


@given(
    st.integers(-2_451_545, 2_000_000),
    st.sampled_from(["month", "year"]),
    st.sampled_from([0, 1]),
)
def test_dates_round_to_month_or_year(days: int, to: str, fmt: int) -> None:
    out = run(masker("round", {"to": to}, pt.DATE, -1, fmt), encode(pt.DATE, days, fmt))
    assert out is not None
    y, m, d = pt.date_to_ymd(days)
    try:
        expected = pt.date_from_ymd(y, 1 if to == "year" else m, 1)
    except ValueError:  # before 4714-11-24 BC: clamped to the first valid date
        expected = pt.DATE_MIN
    assert decode(pt.DATE, out, fmt) == expected
    hashed = run(masker("hash", {}, pt.DATE, -1, fmt), encode(pt.DATE, days, fmt))
    assert hashed is not None
    decode(pt.DATE, hashed, fmt)


def test_round_examples() -> None:
    m = masker("round", {"to": 1_000_000}, pt.NUMERIC, NUMERIC_15_2)
    assert run(m, b"12345678.90") == b"12000000.00"
    assert run(m, b"-12345678.90") == b"-12000000.00"
    assert run(m, b"999999.99") == b"0.00"
    assert run(m, b"NaN") == b"NaN"
    assert run(masker("round", {"to": 1000}, pt.INT4), b"-1999") == b"-1000"
    tstz = masker("round", {"to": "month"}, pt.TIMESTAMPTZ)
    assert run(tstz, b"2024-03-09 10:11:12.5+07") == b"2024-03-01 00:00:00+07"
    assert run(masker("round", {"to": "year"}, pt.TIMESTAMP), b"infinity") == b"infinity"


def test_partial_and_redact_examples() -> None:
    phone = masker("partial", {"keep_first": 0, "keep_last": 3, "char": "*"}, pt.TEXT)
    assert run(phone, b"+6281234567890") == b"***********890"
    assert run(phone, b"123") == b"***"  # never the whole value
    assert run(masker("partial", {"keep_first": 2}, pt.INT8), b"1234567890") == b"1200000000"
    assert run(masker("partial", {"keep_first": 2}, pt.INT4), b"-1234") == b"-1200"
    assert run(masker("redact", {}, pt.NUMERIC, NUMERIC_15_2), b"123.45") == b"0.00"
    assert run(masker("redact", {}, pt.BPCHAR, char_n(16)), b"3273014501900001") == b"*" * 16
    assert run(masker("redact", {}, pt.DATE), b"2024-01-01") is None
    assert run(masker("redact", {}, pt.JSONB), b'{"a": 1}') == b'"********"'


def test_email_examples() -> None:
    m = masker("email", {}, pt.TEXT)
    assert run(m, b"budi.santoso@gmail.com") == b"b***@gmail.com"
    assert run(m, b"b@x.id") == b"*@x.id"
    assert run(m, b"not an address") == b"*" * 14
    short = masker("email", {}, pt.VARCHAR, char_n(8))
    assert run(short, b"bo@x.com") == b"b*@x.com"


def test_fake_is_deterministic_and_realistic() -> None:
    m = masker("fake", {"kind": "phone"}, pt.TEXT)
    a, b = run(m, b"+6281234567890"), run(m, b"+6281234567890")
    assert a == b and a is not None and a.startswith(b"+628")
    name = masker("fake", {"kind": "name"}, pt.TEXT)
    assert run(name, b"Siti Rahayu") != run(name, b"Budi Santoso") or True
    out = run(masker("fake", {"kind": "city"}, pt.BPCHAR, char_n(5)), b"Bandung".ljust(5)[:5])
    assert out is not None and len(out) == 5


def test_unreadable_value_fails_closed_to_null() -> None:
    m = masker("round", {"to": 10}, pt.INT4, -1, 1)
    assert run(m, b"\x00\x01") is None
    assert run(masker("partial", {"keep_first": 1}, pt.TEXT), b"\xff\xfe") is None


# -- RowMasker ----------------------------------------------------------------------------------


def data_row_body(fields: list[bytes | None]) -> bytes:
    parts = [struct.pack("!h", len(fields))]
    for f in fields:
        parts.append(b"\xff\xff\xff\xff" if f is None else struct.pack("!i", len(f)) + f)
    return b"".join(parts)


ROW = [
    b"12345",
    b"Budi Santoso",
    b"3273014501900001",
    None,
    b"Siti",
    b"1990-01-01",
    b"L",
    b"12345678.90",
    b"+6281234567890",
    b"budi@gmail.com",
]


def row_masker() -> RowMasker:
    nik = masker("partial", {"keep_first": 6}, pt.BPCHAR, char_n(16))
    income = masker("round", {"to": 1_000_000}, pt.NUMERIC, NUMERIC_15_2)
    kk = masker("redact", {}, pt.BPCHAR, char_n(16))
    return RowMasker({2: (nik, "nik"), 3: (kk, "family_card"), 7: (income, "income")}, 10)


def test_row_masker_splices_only_masked_fields() -> None:
    rm = row_masker()
    out = rm(memoryview(data_row_body(ROW)))
    assert out[:1] == b"D"
    assert struct.unpack("!I", out[1:5])[0] == len(out) - 1
    fields = [None if f is None else bytes(f) for f in split_data_row(memoryview(out)[5:])]
    expected = list(ROW)
    expected[2] = b"327301**********"
    expected[7] = b"12000000.00"
    assert fields == expected
    assert rm.masked_counts == {"nik": 1, "family_card": 0, "income": 1}


def test_row_masker_null_result_and_errors() -> None:
    rm = RowMasker({0: (masker("null", {}, pt.TEXT), "x")}, 2)
    out = rm(memoryview(data_row_body([b"secret", b"ok"])))
    assert [None if f is None else bytes(f) for f in split_data_row(memoryview(out)[5:])] == [
        None,
        b"ok",
    ]
    with pytest.raises(ProtocolViolation):
        rm(memoryview(data_row_body([b"a", b"b", b"c"])))
    with pytest.raises(ProtocolViolation):  # the masked field's length runs past the end
        rm(memoryview(struct.pack("!hi", 2, 99) + b"secret"))
    with pytest.raises(ValueError):
        RowMasker({5: (masker("null", {}, pt.TEXT), "x")}, 2)


# -- COPY -----------------------------------------------------------------------------------------


def copy_maskers(fmt: int) -> dict[int, tuple[FieldMasker, str]]:
    return {
        1: (masker("partial", {"keep_first": 6}, pt.BPCHAR, char_n(16), fmt), "nik"),
        2: (masker("redact", {}, pt.TEXT, -1, fmt), "note"),
    }


def test_copy_text_byte_at_a_time() -> None:
    data = b"1\t3273014501900001\ta\\tb\\\\c\n2\t3273014501900002\t\\N\n"
    cm = build_copy_masker("text", copy_maskers(0), column_count=3)
    whole = cm.feed(data) + cm.finish()
    assert whole == b"1\t327301**********\t*****\n2\t327301**********\t\\N\n"
    cm2 = build_copy_masker("text", copy_maskers(0), column_count=3)
    pieces = b"".join(cm2.feed(data[i : i + 1]) for i in range(len(data)))
    assert pieces + cm2.finish() == whole
    assert cm.masked_counts == {"nik": 2, "note": 1}


def test_copy_text_custom_delimiter_and_escapes() -> None:
    m = {2: masker("partial", {"keep_first": 1}, pt.TEXT)}
    cm = build_copy_masker("text", m, delimiter="|", null="NULL")
    assert cm.feed(b"a\\|b|x|a\\|bc\n") == b"a\\|b|x|a***\n"
    assert cm.feed(b"a|b|NULL\n") == b"a|b|NULL\n"
    with pytest.raises(ProtocolViolation):
        cm.feed(b"partial")
        cm.finish()


def test_copy_csv() -> None:
    m = copy_maskers(0)
    m[2] = (masker("constant", {"value": 'say "hi", ok'}, pt.TEXT), "note")
    cm = build_copy_masker("csv", m, column_count=3, header=True)
    data = b'id,nik,note\n1,3273014501900001,"multi\nline ""q"""\n2,3273014501900002,\n'
    out = b"".join(cm.feed(data[i : i + 3]) for i in range(0, len(data), 3)) + cm.finish()
    assert out == (b'id,nik,note\n1,327301**********,"say ""hi"", ok"\n2,327301**********,\n')


def test_copy_csv_null_and_quoting_rules() -> None:
    red = {0: masker("redact", {"char": ","}, pt.TEXT)}
    cm = build_copy_masker("csv", red, null="N")
    assert cm.feed(b'ab,N\n"",x\nN,y\n') == b'",,",N\n,x\nN,y\n'


def copy_binary(rows: list[list[bytes | None]]) -> bytes:
    out = [b"PGCOPY\n\xff\r\n\x00", struct.pack("!ii", 0, 0)]
    for row in rows:
        out.append(struct.pack("!h", len(row)))
        for f in row:
            out.append(b"\xff\xff\xff\xff" if f is None else struct.pack("!i", len(f)) + f)
    out.append(b"\xff\xff")
    return b"".join(out)


def test_copy_binary_byte_at_a_time() -> None:
    data = copy_binary([[b"1", b"3273014501900001", b"note"], [b"2", b"3273014501900002", None]])
    expected = copy_binary(
        [[b"1", b"327301**********", b"****"], [b"2", b"327301**********", None]]
    )
    cm = build_copy_masker("binary", copy_maskers(1), column_count=3)
    assert cm.feed(data) + cm.finish() == expected
    cm2 = build_copy_masker("binary", copy_maskers(1), column_count=3)
    assert b"".join(cm2.feed(data[i : i + 1]) for i in range(len(data))) == expected
    assert cm2.finish() == b""
    bad = build_copy_masker("binary", copy_maskers(1), column_count=4)
    with pytest.raises(ProtocolViolation):
        bad.feed(data)
    with pytest.raises(ProtocolViolation):
        build_copy_masker("binary", {}).feed(b"NOTPGCOPY!\n" + b"\x00" * 8)
