"""copy_out: deny | allow | mask through Topeng, with psycopg's COPY support.

Under `mask`, COPY (query) TO STDOUT and COPY table (columns) TO STDOUT are masked exactly as
the same SELECT would be, in text, CSV (with HEADER) and binary; raw protected values never
reach the client.
"""

from __future__ import annotations

import csv
import io
import struct
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
from harness import PgServer, StartTopeng, TopengProcess, wait_until
from psycopg import errors
from test_metrics import scrape, value

from proxy.sampledata import DEMO_USERS

RULES = """
version: 1
roles:
  dba: {users: [postgres, "dba_*"], unrestricted: true}
  exporter: {users: ["spv_*"], copy_out: mask, max_rows_per_query: 5000}
  plain_copier: {users: ["ai_*"], copy_out: allow, max_rows_per_query: 5000}
  agent: {users: ["agent_*"], copy_out: deny, max_rows_per_query: 5000}
default_role: agent
labels:
  nik: ["*.*.nik"]
  phone: ["*.*.no_hp"]
  income: ["*.*.penghasilan"]
  mother_maiden_name: ["*.*.nama_ibu_kandung"]
policies:
  "*":
    nik: {mask: partial, keep_first: 6}
    phone: {mask: partial, keep_last: 3}
    income: {mask: round, to: 1000000}
    mother_maiden_name: deny
"""

MASKER = "spv_budi"
ALLOWER = "ai_helper"
DENIED = "agent_citra"
COLUMNS = "id, nik, no_hp, penghasilan"


@pytest.fixture
def proxy(start_topeng: StartTopeng, tmp_path: Path) -> TopengProcess:
    rules = tmp_path / "copy.yaml"
    rules.write_text(RULES)
    return start_topeng(rules=rules)


@pytest.fixture(scope="module")
def raw(pg: PgServer) -> dict[int, tuple[str, str | None, Decimal]]:
    """id -> (nik, no_hp, penghasilan), read directly from PostgreSQL."""
    with psycopg.connect(pg.superuser_dsn) as conn:
        rows = conn.execute(f"SELECT {COLUMNS} FROM bank.customers").fetchall()
    return {int(r[0]): (str(r[1]), r[2], r[3]) for r in rows}


def connect(proxy: TopengProcess, user: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(proxy.dsn(user, DEMO_USERS[user]), autocommit=True)


def copy_out(conn: psycopg.Connection[tuple[object, ...]], sql: str) -> bytes:
    with conn.cursor() as cur, cur.copy(sql) as copy:
        return b"".join(bytes(chunk) for chunk in copy)


def expected_masks(
    raw: dict[int, tuple[str, str | None, Decimal]],
) -> dict[int, tuple[str, str | None, Decimal]]:
    out = {}
    for key, (nik, phone, income) in raw.items():
        masked_phone = None if phone is None else "*" * (len(phone) - 3) + phone[-3:]
        rounded = (income // 1_000_000) * 1_000_000
        out[key] = (nik[:6] + "*" * 10, masked_phone, Decimal(rounded))
    return out


def assert_no_raw(data: bytes, raw: dict[int, tuple[str, str | None, Decimal]]) -> None:
    for nik, phone, _ in raw.values():
        assert nik.encode() not in data
        if phone is not None and len(phone) > 6:
            assert phone.encode() not in data


def test_copy_out_denied(proxy: TopengProcess) -> None:
    with connect(proxy, DENIED) as conn:
        with pytest.raises(errors.InsufficientPrivilege) as info:
            copy_out(conn, "COPY (SELECT id FROM bank.customers) TO STDOUT")
        assert info.value.diag.message_primary is not None
        assert "COPY" in info.value.diag.message_primary
        assert "topeng" in info.value.diag.message_primary
        assert conn.execute("SELECT 1").fetchone() == (1,)  # the session goes on


def test_copy_out_allowed_for_unprotected_columns(proxy: TopengProcess) -> None:
    with connect(proxy, ALLOWER) as conn:
        data = copy_out(conn, "COPY (SELECT id, city FROM bank.customers) TO STDOUT")
        assert len(data.splitlines()) == 2000
        with pytest.raises(errors.InsufficientPrivilege) as info:
            copy_out(conn, "COPY bank.customers (id, nik) TO STDOUT")
        assert "masked" in str(info.value.diag.message_primary)
        assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize(
    "sql",
    [
        f"COPY (SELECT {COLUMNS} FROM bank.customers) TO STDOUT",
        f"COPY bank.customers ({COLUMNS}) TO STDOUT",
    ],
)
def test_copy_masked_text(
    proxy: TopengProcess, raw: dict[int, tuple[str, str | None, Decimal]], sql: str
) -> None:
    expected = expected_masks(raw)
    with connect(proxy, MASKER) as conn:
        data = copy_out(conn, sql)
    assert_no_raw(data, raw)
    lines = data.decode().splitlines()
    assert len(lines) == len(raw)
    for line in lines:
        key, nik, phone, income = line.split("\t")
        want = expected[int(key)]
        assert nik == want[0]
        assert (None if phone == "\\N" else phone) == want[1]
        assert Decimal(income) == want[2]


def test_copy_masked_csv_with_header(
    proxy: TopengProcess, raw: dict[int, tuple[str, str | None, Decimal]]
) -> None:
    expected = expected_masks(raw)
    with connect(proxy, MASKER) as conn:
        data = copy_out(
            conn,
            f"COPY (SELECT {COLUMNS} FROM bank.customers) TO STDOUT "
            "WITH (FORMAT csv, HEADER true, DELIMITER ';')",
        )
    assert_no_raw(data, raw)
    rows = list(csv.reader(io.StringIO(data.decode()), delimiter=";"))
    assert rows[0] == ["id", "nik", "no_hp", "penghasilan"]
    assert len(rows) == len(raw) + 1
    for key, nik, phone, income in rows[1:]:
        want = expected[int(key)]
        assert nik == want[0]
        assert (phone or None) == want[1]
        assert Decimal(income) == want[2]


def _pgcopy_rows(data: bytes) -> list[list[bytes | None]]:
    """Parse PostgreSQL's binary COPY format."""
    assert data[:11] == b"PGCOPY\n\xff\r\n\x00"
    _flags, ext = struct.unpack("!ii", data[11:19])
    pos = 19 + ext
    rows: list[list[bytes | None]] = []
    while True:
        (count,) = struct.unpack("!h", data[pos : pos + 2])
        pos += 2
        if count == -1:
            break
        fields: list[bytes | None] = []
        for _ in range(count):
            (size,) = struct.unpack("!i", data[pos : pos + 4])
            pos += 4
            if size == -1:
                fields.append(None)
                continue
            fields.append(data[pos : pos + size])
            pos += size
        rows.append(fields)
    assert pos == len(data)
    return rows


def test_copy_masked_binary(
    proxy: TopengProcess, raw: dict[int, tuple[str, str | None, Decimal]]
) -> None:
    expected = expected_masks(raw)
    with connect(proxy, MASKER) as conn:
        data = copy_out(conn, "COPY bank.customers (id, nik, no_hp) TO STDOUT (FORMAT binary)")
    assert_no_raw(data, raw)
    rows = _pgcopy_rows(data)
    assert len(rows) == len(raw)
    for key, nik, phone in rows:
        assert key is not None and nik is not None
        want = expected[struct.unpack("!q", key)[0]]
        assert nik.decode() == want[0]
        assert (None if phone is None else phone.decode()) == want[1]


def test_copy_masked_refuses_what_it_cannot_mask(proxy: TopengProcess) -> None:
    with connect(proxy, MASKER) as conn:
        with pytest.raises(errors.FeatureNotSupported) as info:
            copy_out(conn, "COPY bank.customers (id, nik) TO STDOUT (FORMAT csv, FORCE_QUOTE *)")
        assert "FORCE_QUOTE" in str(info.value.diag.message_detail)
        with pytest.raises(errors.InsufficientPrivilege):
            copy_out(conn, "COPY (SELECT nama_ibu_kandung FROM bank.customers) TO STDOUT")
        with pytest.raises(errors.InsufficientPrivilege):
            copy_out(conn, "COPY bank.customers TO '/tmp/topeng-copy-test'")
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_copy_masked_values_are_counted(
    proxy: TopengProcess, raw: dict[int, tuple[str, str | None, Decimal]]
) -> None:
    def masked(label: str) -> float:
        return value(scrape(proxy)[1], "topeng_masked_values_total", role="exporter", label=label)

    before = {label: masked(label) for label in ("nik", "phone", "income")}
    with connect(proxy, MASKER) as conn:
        copy_out(conn, f"COPY (SELECT {COLUMNS} FROM bank.customers) TO STDOUT")
    phones = sum(1 for _, phone, _ in raw.values() if phone is not None)
    expected = {"nik": len(raw), "phone": phones, "income": len(raw)}
    wait_until(
        lambda: all(masked(k) - before[k] == n for k, n in expected.items()),
        f"masked COPY values counted: {expected}",
    )
