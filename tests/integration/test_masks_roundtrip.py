"""Masked values are valid for their type according to PostgreSQL itself.

For each type, the server produces a value's text (`::text`) and binary (`typsend`) forms; the
masker rewrites them; the masked bytes go back to the server: text as `$1::text::type`, binary
as a parameter of that type in binary format (psycopg with a raw binary dumper, so the server's
`typreceive` parses the bytes exactly as it would from a client). The server echoes the value as
text, which must equal the masked text form.

The server: TOPENG_MASKS_TEST_DSN if set, else the test session's `pg` fixture.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.adapt import Dumper
from psycopg.pq import Format

from proxy.policy import pgtypes as pt
from proxy.policy.masks import MaskNotApplicable, build_field_masker, mask_applies

KEY = b"integration-key"


class Raw:
    """Bytes to send as a binary parameter of type `oid`."""

    __slots__ = ("data", "oid")

    def __init__(self, data: bytes, oid: int) -> None:
        self.data = data
        self.oid = oid


def _dumper_for(oid: int) -> type[Dumper]:
    class RawDumper(Dumper):
        format = Format.BINARY

        def dump(self, obj: Any) -> bytes:
            assert isinstance(obj, Raw)
            return obj.data

    RawDumper.oid = oid
    return RawDumper


@pytest.fixture(scope="module")
def dsn(request: pytest.FixtureRequest) -> str:
    env = os.environ.get("TOPENG_MASKS_TEST_DSN")
    if env:
        return env
    return str(request.getfixturevalue("pg").superuser_dsn)


@pytest.fixture(scope="module")
def conn(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("SET TimeZone = 'UTC'")
        yield c


# (SQL type, typsend function, SQL literal)
VALUES = [
    ("bool", "boolsend", "true"),
    ("bytea", "byteasend", "'\\x00736563726574ff'"),
    ('"char"', "charsend", "'x'"),
    ("name", "namesend", "'budi_santoso'"),
    ("int2", "int2send", "12345"),
    ("int4", "int4send", "-123456789"),
    ("int8", "int8send", "1234567890123"),
    ("oid", "oidsend", "4000000000"),
    ("text", "textsend", "'Siti Rahayu'"),
    ("char(16)", "bpcharsend", "'3273014501900001'"),
    ("char(12)", "bpcharsend", "'abc'"),
    ("varchar(14)", "varcharsend", "'budi@gmail.com'"),
    ("json", "json_send", """'{"nik": "3273014501900001"}'"""),
    ("jsonb", "jsonb_send", """'{"nik": "3273014501900001"}'"""),
    ("xml", "xml_send", "'<a>secret</a>'"),
    ("float4", "float4send", "1234.5"),
    ("float8", "float8send", "-98765.4321"),
    ("numeric(15,2)", "numeric_send", "12345678.90"),
    ("numeric", "numeric_send", "-0.000123"),
    ("date", "date_send", "'1990-05-17'"),
    ("time", "time_send", "'12:34:56.5'"),
    ("timestamp", "timestamp_send", "'2024-02-29 12:34:56.789'"),
    ("timestamptz", "timestamptz_send", "'2024-02-29 12:34:56.789+07'"),
    ("interval", "interval_send", "'1 year 2 mons 3 days 01:00:00'"),
    ("uuid", "uuid_send", "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'"),
    ("text[]", "array_send", """'{"a b",NULL,Siti}'"""),
    ("char(16)[]", "array_send", "'{3273014501900001,3273014501900002}'"),
    ("int4[]", "array_send", "'{{1,2},{3,4}}'"),
    ("numeric(15,2)[]", "array_send", "'{1500000.00,NULL}'"),
    ("date[]", "array_send", "'{2024-03-09}'"),
    ("jsonb[]", "array_send", """'{"{\\"a\\": 1}"}'"""),
    ("uuid[]", "array_send", "'{1b4e28ba-2fa1-11d2-883f-0016d3cca427}'"),
    ("float8[]", "array_send", "'{1.5,NaN}'"),
    ("timestamptz[]", "array_send", "'{2024-01-01 10:00:00+00}'"),
    ("bool[]", "array_send", "'{t,f}'"),
]

MASKS: list[tuple[str, dict[str, object]]] = [
    ("partial", {"keep_first": 2, "keep_last": 1, "char": "*"}),
    ("redact", {"char": "*"}),
    ("hash", {}),
    ("email", {}),
    ("round", {"to": 1000}),
    ("round", {"to": "month"}),
    ("fake", {"kind": "name"}),
    ("fake", {"kind": "phone"}),
    ("constant", {"value": "7"}),
]


@pytest.mark.parametrize(
    ("mask", "params"), MASKS, ids=[f"{m}{i}" for i, (m, _) in enumerate(MASKS)]
)
@pytest.mark.parametrize(("sqltype", "send", "literal"), VALUES, ids=[v[0] for v in VALUES])
def test_server_accepts_masked_values(
    conn: psycopg.Connection[Any],
    sqltype: str,
    send: str,
    literal: str,
    mask: str,
    params: dict[str, object],
) -> None:
    if sqltype == "xml" and not _server_has_xml(conn):
        pytest.skip("this PostgreSQL server was built without libxml: it has no xml type")
    out = send.replace("send", "out")  # the type's output function: text exactly as sent
    oid, text, binary = conn.execute(
        f"SELECT pg_typeof(v)::oid::int, {out}(v)::text, {send}(v) "
        f"FROM (SELECT {literal}::{sqltype} AS v) s"
    ).fetchone() or (0, "", b"")
    typmod = _typmod(conn, sqltype)
    maskers = []
    for fmt in (0, 1):
        try:
            maskers.append(
                build_field_masker(mask, params, type_oid=oid, typmod=typmod, fmt=fmt, hash_key=KEY)
            )
        except MaskNotApplicable as exc:
            # Refused when the masker is built (the session then fails closed); the check
            # `topeng check` runs must say the same.
            assert mask_applies(mask, params, oid, typmod) is not None, str(exc)
            return
    masked_text = maskers[0](memoryview(text.encode()))
    masked_bin = maskers[1](memoryview(bytes(binary)))
    assert (masked_text is None) == (masked_bin is None)
    if masked_text is None or masked_bin is None:
        return
    # text: the server parses it as the type (with the column's typmod)
    (echo_text,) = conn.execute(
        f"SELECT {out}(%s::text::{sqltype})::text", (masked_text.decode(),)
    ).fetchone() or ("",)
    assert echo_text == masked_text.decode()
    # binary: the server's typreceive accepts the bytes
    with conn.cursor() as cur:
        cur.adapters.register_dumper(Raw, _dumper_for(oid))
        (echo_bin,) = cur.execute(
            f"SELECT {out}(%b::{sqltype})::text", (Raw(masked_bin, oid),)
        ).fetchone() or ("",)
    assert echo_bin == echo_text or sqltype.startswith("float")
    if sqltype.startswith("char(16)") or sqltype.startswith("varchar"):
        assert text not in echo_text or mask == "constant"


def _server_has_xml(conn: psycopg.Connection[Any]) -> bool:
    try:
        conn.execute("SELECT '<a/>'::xml")
    except psycopg.errors.FeatureNotSupported:
        return False
    return True


def _typmod(conn: psycopg.Connection[Any], sqltype: str) -> int:
    base = sqltype.removesuffix("[]")
    if "(" not in base:
        return -1
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS tm_probe (x int)")
    conn.execute("ALTER TABLE tm_probe DROP COLUMN IF EXISTS c")
    conn.execute(f"ALTER TABLE tm_probe ADD COLUMN c {sqltype}")
    row = conn.execute(
        "SELECT atttypmod FROM pg_attribute WHERE attrelid = 'tm_probe'::regclass AND attname = 'c'"
    ).fetchone()
    assert row is not None
    return int(row[0])


def test_nik_column_masked_as_the_bank_rules_say(conn: psycopg.Connection[Any]) -> None:
    m = build_field_masker(
        "partial",
        {"keep_first": 6, "keep_last": 0, "char": "*"},
        type_oid=pt.BPCHAR,
        typmod=20,
        fmt=1,
        hash_key=KEY,
    )
    (raw,) = conn.execute("SELECT bpcharsend('3273014501900001'::char(16))").fetchone() or (b"",)
    out = m(memoryview(bytes(raw)))
    assert out == b"327301**********"
    with conn.cursor() as cur:
        cur.adapters.register_dumper(Raw, _dumper_for(pt.BPCHAR))
        (n,) = cur.execute(
            "SELECT char_length(%b::char(16))", (Raw(out, pt.BPCHAR),)
        ).fetchone() or (0,)
    assert n == 16
