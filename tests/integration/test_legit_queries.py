"""Legitimate work keeps working through Topeng, with correct masked results.

Call-centre lookups by id or NIK, joins on ids, counts, GROUP BY on unprotected columns,
LIMITed listings, the supervisor's exact income and hashed mother's maiden name, the row
limit (refuse, and truncate with a custom rules file), both result formats, prepared
statements and cursors. Every expected value comes from PostgreSQL directly (superuser).
"""

from __future__ import annotations

import decimal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import harness
import policykit as kit
import psycopg
import pytest
from harness import PgServer, TopengProcess

from proxy.sampledata import DEMO_USERS


@pytest.fixture(scope="module")
def proxy(pg: PgServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TopengProcess]:
    directory = tmp_path_factory.mktemp("legit")
    process = harness.start_topeng(
        pg, rules=kit.bank_rules_without_rate(directory), log_dir=directory
    )
    yield process
    process.stop()


@pytest.fixture(scope="module")
def raw(pg: PgServer) -> dict[int, dict[str, Any]]:
    """Customers 1..60 as PostgreSQL has them."""
    with psycopg.connect(pg.superuser_dsn) as conn:
        cur = conn.execute("SELECT * FROM bank.customers WHERE id <= 60 ORDER BY id")
        names = [c.name for c in cur.description or ()]
        return {r[0]: dict(zip(names, r, strict=True)) for r in cur.fetchall()}


def _dsn(proxy: TopengProcess, user: str) -> str:
    return proxy.dsn(user, DEMO_USERS[user])


@pytest.fixture
async def agent(proxy: TopengProcess) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(_dsn(proxy, "agent_citra"))
    yield conn
    await conn.close()


def _masked_nik(nik: str) -> str:
    return nik[:6] + "*" * 10


async def test_lookup_by_id(agent: asyncpg.Connection, raw: dict[int, dict[str, Any]]) -> None:
    row = await agent.fetchrow(
        "SELECT id, full_name, nik, city, penghasilan FROM customers WHERE id = $1", 7
    )
    assert row is not None
    assert (row["id"], row["full_name"], row["city"]) == (7, raw[7]["full_name"], raw[7]["city"])
    assert row["nik"] == _masked_nik(raw[7]["nik"])
    assert isinstance(row["nik"], str) and len(row["nik"]) == 16
    assert isinstance(row["penghasilan"], decimal.Decimal)
    assert row["penghasilan"] % 1_000_000 == 0
    assert abs(row["penghasilan"] - raw[7]["penghasilan"]) <= 500_000


async def test_lookup_by_nik(agent: asyncpg.Connection, raw: dict[int, dict[str, Any]]) -> None:
    nik = raw[12]["nik"]
    by_literal = await agent.fetch(f"SELECT id, nik FROM customers WHERE nik = '{nik}'")
    by_param = await agent.fetch("SELECT id, nik FROM customers WHERE nik = $1", nik)
    assert [tuple(r) for r in by_literal] == [(12, _masked_nik(nik))]
    assert [tuple(r) for r in by_param] == [(12, _masked_nik(nik))]
    niks = [raw[i]["nik"] for i in (3, 4, 5)]
    listed = await agent.fetch(
        "SELECT id, nik FROM customers WHERE nik IN ($1, $2, $3) ORDER BY id", *niks
    )
    assert [tuple(r) for r in listed] == [(i, _masked_nik(raw[i]["nik"])) for i in (3, 4, 5)]
    literal = ", ".join(f"'{n}'" for n in niks)
    listed = await agent.fetch(f"SELECT id FROM customers WHERE nik IN ({literal}) ORDER BY id")
    assert [r["id"] for r in listed] == [3, 4, 5]


async def test_lookup_by_nik_array(proxy: TopengProcess, raw: dict[int, dict[str, Any]]) -> None:
    """`nik = ANY($1)` with a list: asyncpg first introspects bpchar[] (not one of its builtin
    codecs), turning jit off around it with set_config('jit', ...) and restoring it with
    set_config('jit', $1, ...); Topeng lets exactly that through for a restricted role."""
    conn = await asyncpg.connect(_dsn(proxy, "agent_citra"))  # fresh: no type cache yet
    try:
        jit_before = await conn.fetchval("SELECT current_setting('jit')")
        niks = [raw[i]["nik"] for i in (8, 9, 31)]
        rows = await conn.fetch(
            "SELECT id, nik, email FROM customers WHERE nik = ANY($1) ORDER BY id", niks
        )
        assert [(r["id"], r["nik"]) for r in rows] == [
            (i, _masked_nik(raw[i]["nik"])) for i in (8, 9, 31)
        ]
        for r in rows:
            email = raw[r["id"]]["email"]
            assert email is None or r["email"] != email
        # asyncpg put jit back the way it was, through Topeng
        assert await conn.fetchval("SELECT current_setting('jit')") == jit_before
        # set_config of anything else is still refused, and changes nothing
        with pytest.raises(asyncpg.InsufficientPrivilegeError) as caught:
            await conn.fetchval("SELECT set_config('search_path', 'public', false)")
        assert "function set_config is not permitted" in caught.value.message
        assert await conn.fetchval("SELECT current_setting('search_path')") != "public"
    finally:
        await conn.close()


async def test_joins_on_ids(agent: asyncpg.Connection, pg: PgServer) -> None:
    sql = (
        "SELECT c.id, c.full_name, a.account_number, t.amount, t.kind FROM customers c "
        "JOIN accounts a ON a.customer_id = c.id JOIN transactions t ON t.account_id = a.id "
        "WHERE c.id = $1 ORDER BY t.id"
    )
    direct = await asyncpg.connect(pg.superuser_dsn)
    try:
        for cid in (1, 2, 3, 5, 8):
            assert await agent.fetch(sql, cid) == await direct.fetch(sql, cid)
    finally:
        await direct.close()


async def test_counts_and_groups(agent: asyncpg.Connection, pg: PgServer) -> None:
    direct = await asyncpg.connect(pg.superuser_dsn)
    try:
        for sql in (
            "SELECT count(*) FROM customers",
            "SELECT count(nik), count(email), count(DISTINCT nik) FROM customers",
            "SELECT city, count(*) FROM customers GROUP BY city ORDER BY city",
            "SELECT province, count(*) AS n FROM customers GROUP BY province ORDER BY n DESC, 1",
            "SELECT id, full_name, created_at FROM customers ORDER BY created_at, id LIMIT 10",
        ):
            mine = await agent.fetch(sql)
            assert mine and mine == await direct.fetch(sql), sql
    finally:
        await direct.close()
    listing = await agent.fetch("SELECT id, nik FROM customers ORDER BY created_at LIMIT 10")
    assert len(listing) == 10 and all(r["nik"].endswith("*" * 10) for r in listing)


async def test_supervisor_sees_income_and_a_stable_hash(
    proxy: TopengProcess, raw: dict[int, dict[str, Any]]
) -> None:
    hashes = []
    for _ in range(2):
        conn = await asyncpg.connect(_dsn(proxy, "spv_budi"))
        try:
            for _ in range(2):
                row = await conn.fetchrow(
                    "SELECT penghasilan, nama_ibu_kandung, nik FROM customers WHERE id = 9"
                )
                assert row is not None
                assert row["penghasilan"] == raw[9]["penghasilan"]
                assert row["nik"] == _masked_nik(raw[9]["nik"])
                assert row["nama_ibu_kandung"] != raw[9]["nama_ibu_kandung"]
                hashes.append(row["nama_ibu_kandung"])
            other = await conn.fetchval("SELECT nama_ibu_kandung FROM customers WHERE id = 10")
            assert other != hashes[0] or raw[10]["nama_ibu_kandung"] == raw[9]["nama_ibu_kandung"]
        finally:
            await conn.close()
    assert len(set(hashes)) == 1 and hashes[0]


async def test_row_limit_refuses_and_session_goes_on(agent: asyncpg.Connection) -> None:
    with pytest.raises(asyncpg.PostgresError) as info:
        await agent.fetch("SELECT id, nik FROM customers WHERE id <= 51")
    assert info.value.sqlstate == "54000"
    assert str(info.value).startswith("topeng:")
    assert len(await agent.fetch("SELECT id FROM customers WHERE id <= 50")) == 50


def test_row_limit_in_a_transaction(proxy: TopengProcess) -> None:
    with psycopg.connect(_dsn(proxy, "agent_citra")) as conn:
        conn.execute("SELECT 1")  # psycopg opens the transaction (BEGIN) here
        with pytest.raises(psycopg.Error) as info:
            conn.execute("SELECT id FROM customers WHERE id <= 51").fetchall()
        assert info.value.sqlstate == "54000"
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        with pytest.raises(psycopg.Error) as again:
            conn.execute("SELECT 1")
        assert again.value.sqlstate == "25P02"
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM customers").fetchone() == (2000,)


async def test_row_limit_in_an_explicit_block(agent: asyncpg.Connection) -> None:
    await agent.execute("BEGIN")
    with pytest.raises(asyncpg.PostgresError) as info:
        await agent.fetch("SELECT id FROM customers WHERE id <= 51")
    assert info.value.sqlstate == "54000"
    with pytest.raises(asyncpg.PostgresError) as again:
        await agent.fetch("SELECT 1")
    assert again.value.sqlstate == "25P02"
    await agent.execute("ROLLBACK")
    assert await agent.fetchval("SELECT 1") == 1


def test_row_limit_truncate(
    pg: PgServer, tmp_path: Path, start_topeng: Any, raw: dict[int, dict[str, Any]]
) -> None:
    rules = kit.bank_rules_without_rate(tmp_path, max_rows_per_query=7, on_row_limit="truncate")
    process = start_topeng(rules=rules)
    notices: list[str] = []
    with psycopg.connect(_dsn(process, "agent_citra"), autocommit=True) as conn:
        conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        rows = conn.execute("SELECT id, nik FROM customers ORDER BY id").fetchall()
    assert [r[0] for r in rows] == list(range(1, 8))
    assert all(r[1] == _masked_nik(raw[r[0]]["nik"]) for r in rows)
    assert notices, "a truncated result comes with a NOTICE"


async def test_binary_and_text_formats_agree(proxy: TopengProcess) -> None:
    sql = (
        "SELECT id, nik, no_kk, penghasilan, no_hp, email FROM customers WHERE id <= 20 ORDER BY id"
    )
    conn = await asyncpg.connect(_dsn(proxy, "agent_citra"))
    try:
        binary = [tuple(r) for r in await conn.fetch(sql)]
    finally:
        await conn.close()
    with psycopg.connect(_dsn(proxy, "agent_citra")) as pconn:
        text = pconn.execute(sql).fetchall()
    assert binary == text
    assert all(len(r[1]) == 16 and len(r[2]) == 16 for r in binary)


async def test_prepared_statement_reused(
    agent: asyncpg.Connection, raw: dict[int, dict[str, Any]]
) -> None:
    stmt = await agent.prepare("SELECT nik, no_hp FROM customers WHERE id = $1")
    for cid in (21, 22, 23):
        row = await stmt.fetchrow(cid)
        assert row is not None and row["nik"] == _masked_nik(raw[cid]["nik"])
        phone = raw[cid]["no_hp"]
        if phone is not None:
            assert row["no_hp"] != phone and row["no_hp"].endswith(phone[-3:])


def test_cursor_is_refused_for_agents(proxy: TopengProcess) -> None:
    with psycopg.connect(_dsn(proxy, "agent_citra")) as conn:
        with pytest.raises(psycopg.Error) as info:
            conn.execute("DECLARE c CURSOR FOR SELECT id, nik FROM customers")
        assert info.value.sqlstate == "42501"
        assert str(info.value).startswith("topeng:")
        conn.rollback()
        assert conn.execute("SELECT 1").fetchone() == (1,)
