"""The C masking loop (proxy/policy/_splice.c via fastmask) against the Python RowMasker.

The Python RowMasker is the reference: for random rows of random values (plain, padded,
non-ASCII, odd number forms, NULLs, malformed rows), every mask the C loop knows and some it
hands back to Python, the two must give the same bytes, the same counts and the same errors.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

import pytest
from harness import needs_tool
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wirekit import (
    MASK_MARKER,
    MarkerPolicy,
    complete,
    data_row,
    query,
    ready,
    ready_session,
    row_desc,
)

from proxy.policy import fastmask
from proxy.policy import pgtypes as pt
from proxy.policy.decision import Mask
from proxy.policy.fastmask import FastOp, SplicedRowMasker, fast_op, row_masker
from proxy.policy.masks import RowMasker, build_field_masker
from proxy.wire.framing import ProtocolViolation

KEY = b"k" * 32


def varchar_n(n: int) -> int:
    return n + 4


def char_n(n: int) -> int:
    return n + 4


NUMERIC_15_2 = (15 << 16 | 2) + 4

# (mask, params, type oid, typmod, format, does the C loop mask it itself?)
COLUMNS: list[tuple[str, dict[str, object], int, int, int, bool]] = [
    ("partial", {"keep_first": 6}, pt.BPCHAR, char_n(16), 0, True),
    ("partial", {"keep_last": 3}, pt.VARCHAR, varchar_n(20), 0, True),
    ("partial", {"keep_first": 2, "keep_last": 2, "char": "#"}, pt.TEXT, -1, 0, True),
    ("partial", {"keep_first": 1}, pt.TEXT, -1, 1, True),
    ("partial", {"keep_first": 3}, pt.NAME, -1, 0, True),
    ("partial", {"keep_first": 2}, pt.BPCHAR, -1, 0, True),
    ("partial", {"keep_first": 2, "char": "\u2022"}, pt.TEXT, -1, 0, False),
    ("redact", {}, pt.BPCHAR, char_n(16), 0, True),
    ("redact", {"char": "x"}, pt.VARCHAR, varchar_n(10), 1, True),
    ("redact", {}, pt.TEXT, -1, 0, True),
    ("email", {}, pt.VARCHAR, varchar_n(12), 0, True),
    ("email", {}, pt.TEXT, -1, 0, True),
    ("email", {}, pt.BPCHAR, char_n(20), 0, True),
    ("round", {"to": 1_000_000}, pt.NUMERIC, NUMERIC_15_2, 0, True),
    ("round", {"to": 1000}, pt.NUMERIC, -1, 0, True),
    ("round", {"to": 0.5}, pt.NUMERIC, -1, 0, False),
    ("round", {"to": 1_000_000}, pt.NUMERIC, NUMERIC_15_2, 1, False),
    ("round", {"to": 100}, pt.INT4, -1, 0, True),
    ("round", {"to": 7}, pt.INT2, -1, 0, True),
    ("round", {"to": 10}, pt.INT8, -1, 0, True),
    ("null", {}, pt.TEXT, -1, 0, True),
    ("hash", {}, pt.TEXT, -1, 0, False),
    ("fake", {"kind": "name"}, pt.VARCHAR, varchar_n(30), 0, False),
    ("constant", {"value": "n/a"}, pt.TEXT, -1, 0, False),
]

STRINGS = st.one_of(
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=30),
    st.text(max_size=12).filter(lambda s: "\x00" not in s),
    st.builds(
        lambda local, domain, pad: f"{local}@{domain}" + " " * pad,
        st.text(alphabet="abc.xyz@", max_size=8),
        st.text(alphabet="gmail.co@", max_size=14),
        st.integers(0, 4),
    ),
    st.builds(
        lambda s, pad: s + " " * pad,
        st.text(alphabet="0123456789 ", max_size=16),
        st.integers(0, 8),
    ),
)
NUMBERS = st.one_of(
    st.integers(-(10**20), 10**20).map(str),
    st.builds(
        lambda whole, frac, neg: ("-" if neg else "") + whole + ("." + frac if frac else ""),
        st.text(alphabet="0123456789", min_size=1, max_size=21),
        st.text(alphabet="0123456789", max_size=20),
        st.booleans(),
    ),
    st.sampled_from(
        [
            "-0",
            "0.00",
            "-0.50",
            "007",
            "+5",
            " 5",
            "5.",
            ".5",
            "1e5",
            "NaN",
            "Infinity",
            "-Infinity",
            "",
            "-",
            "32767",
            "32768",
            "-32768",
            "-32769",
            "9223372036854775807",
            "-9223372036854775808",
            "99999999999999999.99",
        ]
    ),
)
VALUES = st.one_of(
    st.none(), STRINGS.map(str.encode), NUMBERS.map(str.encode), st.binary(max_size=10)
)


def maskers_for(picks: list[int]) -> dict[int, tuple[object, str, FastOp | None]]:
    out: dict[int, tuple[object, str, FastOp | None]] = {}
    for index, pick in enumerate(picks):
        if pick < 0:
            continue
        mask, params, oid, typmod, fmt, _ = COLUMNS[pick]
        call = build_field_masker(mask, params, type_oid=oid, typmod=typmod, fmt=fmt, hash_key=KEY)
        op = fast_op(mask, params, type_oid=oid, typmod=typmod, fmt=fmt)
        out[index] = (call, f"label{pick}", op)
    return out


def both(picks: list[int]) -> tuple[RowMasker, SplicedRowMasker]:
    if not fastmask.AVAILABLE:
        needs_tool("the C module proxy.policy._splice is not built (pip install -e . builds it)")
    maskers = maskers_for(picks)
    py = RowMasker(
        {i: (call, label) for i, (call, label, _) in maskers.items()},  # type: ignore[misc]
        len(picks),
    )
    c = SplicedRowMasker(maskers, len(picks))  # type: ignore[arg-type]
    return py, c


def body_of(fields: list[bytes | None]) -> bytes:
    parts = [struct.pack("!h", len(fields))]
    for f in fields:
        parts.append(b"\xff\xff\xff\xff" if f is None else struct.pack("!i", len(f)) + f)
    return b"".join(parts)


def message(body: bytes) -> bytes:
    return b"D" + struct.pack("!I", len(body) + 4) + body


def outcome(fn: object, *args: object) -> object:
    try:
        return fn(*args)  # type: ignore[operator]
    except ProtocolViolation as exc:
        return ("error", str(exc))


def test_fast_ops_cover_what_the_table_says() -> None:
    for mask, params, oid, typmod, fmt, fast in COLUMNS:
        op = fast_op(mask, params, type_oid=oid, typmod=typmod, fmt=fmt)
        assert (op is not None) == fast, (mask, params, oid, fmt)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    picks=st.lists(st.integers(-1, len(COLUMNS) - 1), min_size=1, max_size=6),
    rows=st.lists(st.lists(VALUES, min_size=6, max_size=6), min_size=1, max_size=5),
)
def test_c_loop_matches_python_row_by_row_and_in_runs(
    picks: list[int], rows: list[list[bytes | None]]
) -> None:
    py, c = both(picks)
    bodies = [body_of(r[: len(picks)]) for r in rows]
    for body in bodies:
        assert outcome(c, memoryview(body)) == outcome(py, memoryview(body))
    # the same rows as one run of messages, behind a prefix, followed by another message
    buf = b"xyz" + b"".join(message(b) for b in bodies) + b"C\x00\x00\x00\x0dSELECT 1\x00"
    one_by_one = [outcome(py, memoryview(b)) for b in bodies]
    big = 1 << 30
    got = outcome(c.run, buf, 3, big, big)
    errors = [o for o in one_by_one if isinstance(o, tuple)]
    if errors:
        assert got == errors[0]  # the first bad row stops the run with the same error
    else:
        assert got == (b"".join(one_by_one), len(buf) - 14, len(bodies))  # type: ignore[arg-type]
    assert c.masked_counts == py.masked_counts
    assert c.take_masked_counts() == py.take_masked_counts()
    assert c.masked_counts == py.masked_counts == {f"label{p}": 0 for p in picks if p >= 0}


TRICKY = [
    "",
    " ",
    "a",
    "ab",
    "a@b",
    "@b",
    "a@",
    "ab@",
    "@",
    "a@@b",
    "ab@c@d.e",
    "x@gmail.com",
    "budi.santoso@gmail.com",
    "budi.santoso@a-very-long-domain-name.example.co.id",
    "3273014501900001",
    "3273014501900001    ",
    "3273   ",
    "  32  ",
    "Siti Rahayu",
    "Siti Rahayué",
    "é",
    "0",
    "-0",
    "12",
    "-12",
    "12345678.90",
    "-12345678.90",
    "0.001",
    "-0.001",
    "999999999999999999",
    "9999999999999999999",
    "1.5e3",
    "NaN",
    "007",
    "007.50",
    "32767",
    "-32768",
    "32768",
    "2147483647",
    "-2147483649",
]


@pytest.mark.parametrize("column", range(len(COLUMNS)))
def test_tricky_values_for_every_column(column: int) -> None:
    py, c = both([column])
    for value in TRICKY:
        body = memoryview(body_of([value.encode()]))
        assert outcome(c, body) == outcome(py, body), value


def test_known_values_through_c() -> None:
    py, c = both([0, 13, 11, -1])
    body = body_of([b"3273014501900001", b"-12345678.90", b"budi.santoso@gmail.com", b"ok"])
    out = c(memoryview(body))
    assert out == py(memoryview(body))
    assert b"327301**********" in out and b"-12000000.00" in out and b"b***@gmail.com" in out
    assert out.endswith(b"\x00\x00\x00\x02ok")


def test_run_stops_where_it_must() -> None:
    _, c = both([0, -1])
    row = message(body_of([b"3273014501900001", b"x"]))
    # max_rows
    out, end, rows = c.run(row * 3, 0, 2, 1 << 30)
    assert (end, rows) == (2 * len(row), 2)
    # an incomplete message at the end stays unread
    out, end, rows = c.run(row * 2 + row[:-1], 0, 10, 1 << 30)
    assert (end, rows) == (2 * len(row), 2)
    # a message over the length limit is left to the framing layer
    out, end, rows = c.run(row, 0, 10, len(row) - 2)
    assert (out, end, rows) == (b"", 0, 0)
    # another kind of message
    out, end, rows = c.run(b"Z\x00\x00\x00\x05I" + row, 0, 10, 1 << 30)
    assert (out, end, rows) == (b"", 0, 0)
    out, end, rows = c.run(row + b"Z\x00\x00\x00\x05I", 0, 10, 1 << 30)
    assert rows == 1 and end == len(row) and out.count(b"**********") == 1
    # a start outside the buffer is a caller's bug
    with pytest.raises(ValueError):
        c.run(row, len(row) + 1, 10, 1 << 30)


def test_malformed_rows_give_the_same_errors() -> None:
    py, c = both([0, 20])
    cases = [
        b"\x00",
        body_of([b"a"]),
        body_of([b"a", b"b", b"c"]),
        struct.pack("!hi", 2, 99) + b"short",
        struct.pack("!hi", 2, -2) + b"",
        struct.pack("!h", 2) + struct.pack("!i", 1) + b"a" + b"\x00\x00",
    ]
    for body in cases:
        expected = outcome(py, memoryview(body))
        assert isinstance(expected, tuple) and expected[0] == "error", body
        assert outcome(c, memoryview(body)) == expected


def test_a_masker_error_propagates_and_a_wrong_result_is_refused() -> None:
    if not fastmask.AVAILABLE:
        needs_tool("the C module proxy.policy._splice is not built")

    def boom(value: memoryview) -> bytes | None:
        raise RuntimeError("masker failed")

    def wrong(value: memoryview) -> bytes | None:
        return "text"  # type: ignore[return-value]

    body = memoryview(body_of([b"secret"]))
    with pytest.raises(RuntimeError, match="masker failed"):
        SplicedRowMasker({0: (boom, "x", None)}, 1)(body)
    with pytest.raises(TypeError):
        SplicedRowMasker({0: (wrong, "x", None)}, 1)(body)
    with pytest.raises(ValueError):
        SplicedRowMasker({3: (boom, "x", None)}, 2)


def test_row_masker_picks_c_when_built() -> None:
    maskers: Mapping[int, tuple[object, str, FastOp | None]] = maskers_for([0])
    chosen = row_masker(maskers, 1)  # type: ignore[arg-type]
    assert isinstance(chosen, SplicedRowMasker if fastmask.AVAILABLE else RowMasker)


@settings(max_examples=600, deadline=None)
@given(
    picks=st.lists(st.integers(-1, len(COLUMNS) - 1), min_size=1, max_size=4),
    junk=st.binary(max_size=80),
    start=st.integers(0, 8),
)
def test_arbitrary_bytes_never_get_past_the_c_loop_unchecked(
    picks: list[int], junk: bytes, start: int
) -> None:
    """Whatever the bytes, the C loop agrees with Python row by row (same output or the same
    ProtocolViolation), and a run never reads past a message that is not whole."""
    py, c = both(picks)
    assert outcome(c, memoryview(junk)) == outcome(py, memoryview(junk))
    buf = junk[:start] + b"D" + struct.pack("!I", len(junk) + 4) + junk + junk[:start]
    got = outcome(c.run, buf, min(start, len(buf)), 1 << 30, 1 << 30)
    if isinstance(got, tuple) and got[0] != "error":
        out, end, rows = got
        assert min(start, len(buf)) <= end <= len(buf) and rows in (0, 1)
        if rows == 1:
            assert out == outcome(py, memoryview(junk))


# -- the C loop inside a session ------------------------------------------------------------------


class _CMaskPolicy(MarkerPolicy):
    """MarkerPolicy, but the masked results are rewritten by the C loop (partial, first 6)."""

    def plan_rows(self, decision: object, description: object, formats: object) -> object:
        if not isinstance(decision, Mask):
            return None
        if not fastmask.AVAILABLE:
            needs_tool("the C module proxy.policy._splice is not built")
        return row_masker(maskers_for([2, -1]), 2)  # type: ignore[arg-type]


NIK = "3171011708900001"
MASKED_NIK = b"31" + b"#" * 12 + b"01"  # COLUMNS[2]: keep 2 first, 2 last, '#'


def test_a_chunk_of_rows_goes_through_the_c_loop_masked_and_counted() -> None:
    pb = ready_session(_CMaskPolicy())
    sql = f"SELECT nik, name FROM customer /* {MASK_MARKER} */"
    assert pb.to_server(query(sql)) == query(sql)
    rows = [data_row(NIK, f"name {i}") for i in range(300)]
    out = pb.to_client(row_desc("nik", "name"), *rows, complete("SELECT 300"), ready("I"))
    assert NIK.encode() not in out
    assert out.count(MASKED_NIK) == 300
    assert pb.session.counters.rows == 300
    assert pb.session.records[-1].rows == 300


def test_a_malformed_row_in_a_run_ends_the_session_with_nothing_unmasked_sent() -> None:
    pb = ready_session(_CMaskPolicy())
    sql = f"SELECT nik, name FROM customer /* {MASK_MARKER} */"
    pb.to_server(query(sql))
    good = data_row(NIK, "ok")
    bad = data_row(NIK, "ok", "a third field the description does not have")
    with pytest.raises(ProtocolViolation, match="fields where RowDescription announced 2"):
        pb.to_client(row_desc("nik", "name"), good, good, bad, good, complete("SELECT 4"))
    assert NIK.encode() not in pb.session.take_to_client()
