"""asyncpg through Topeng, in both relay modes: what its users do with it.

asyncpg speaks only the extended protocol, binary formats wherever it can, prepares every
statement (named statements, cached), and uses COPY for its bulk methods.
"""

from __future__ import annotations

import asyncio
import decimal
import io
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, date, datetime

import asyncpg
import pytest
import rawpg
from harness import TEST_CUSTOMERS, TEST_USERS, PgServer, TopengProcess

from proxy.sampledata import DEMO_USERS


@pytest.fixture(scope="module", params=rawpg.MODES)
def proxy(
    request: pytest.FixtureRequest, pg: PgServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TopengProcess]:
    process = rawpg.start_mode(pg, request.param, tmp_path_factory.mktemp(f"apg-{request.param}"))
    yield process
    process.stop()


@pytest.fixture
async def conn(proxy: TopengProcess) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(proxy.dsn("alice", TEST_USERS["alice"]))
    try:
        yield connection
    finally:
        await connection.close()


async def test_binary_types_round_trip(conn: asyncpg.Connection) -> None:
    values = (
        42,
        2**40,
        decimal.Decimal("12345678901234567890.123456789"),
        date(1990, 7, 17),
        datetime(2024, 2, 29, 13, 45, 1, 123456, tzinfo=UTC),
        uuid.UUID("12345678-1234-5678-1234-567812345678"),
        {"nik": "3273010101900001", "tags": [1, 2, None]},
        [1, 2, 3],
        ["a", None, "c"],
        b"\x00\x01\xffbytes",
        None,
        "Ibu Siti Ñ ✓",
        True,
        3.5,
    )
    row = await conn.fetchrow(
        "SELECT $1::int4, $2::int8, $3::numeric, $4::date, $5::timestamptz, $6::uuid,"
        " $7::jsonb, $8::int[], $9::text[], $10::bytea, $11::int, $12::text, $13::bool,"
        " $14::float8",
        *[json.dumps(v) if isinstance(v, dict) else v for v in values],
    )
    got = list(row)
    got[6] = json.loads(got[6])
    assert got == list(values)


async def test_bank_rows_and_types(conn: asyncpg.Connection) -> None:
    rows = await conn.fetch(
        "SELECT id, nik, birth_date, penghasilan, created_at FROM customers WHERE id <= $1 "
        "ORDER BY id",
        10,
    )
    assert [r["id"] for r in rows] == list(range(1, 11))
    assert all(len(r["nik"]) == 16 for r in rows)
    assert all(isinstance(r["birth_date"], date) for r in rows)
    assert all(isinstance(r["penghasilan"], decimal.Decimal) for r in rows)
    assert all(r["created_at"].tzinfo is not None for r in rows)
    assert await conn.fetchval("SELECT count(*) FROM customers") == TEST_CUSTOMERS


async def test_prepared_statements(conn: asyncpg.Connection) -> None:
    stmt = await conn.prepare("SELECT full_name FROM customers WHERE id = $1")
    assert [a.name for a in stmt.get_attributes()] == ["full_name"]
    assert [t.name for t in stmt.get_parameters()] == ["int8"]
    names = [await stmt.fetchval(i) for i in range(1, 21)]
    assert all(isinstance(n, str) and n for n in names)
    assert len(set(names)) > 10
    # The statement cache: the same query text many times, one server-side statement.
    for i in range(30):
        assert await conn.fetchval("SELECT $1::int * 2", i) == 2 * i


async def test_executemany_and_copy(conn: asyncpg.Connection, proxy: TopengProcess) -> None:
    table = f"apg_copy_{proxy.port}"
    await conn.execute(f"DROP TABLE IF EXISTS public.{table}")
    await conn.execute(f"CREATE TABLE public.{table} (id int PRIMARY KEY, name text, n numeric)")
    try:
        await conn.executemany(
            f"INSERT INTO public.{table} VALUES ($1, $2, $3)",
            [(i, f"name {i}", decimal.Decimal(i) / 4) for i in range(1, 101)],
        )
        assert await conn.fetchval(f"SELECT count(*) FROM public.{table}") == 100
        result = await conn.copy_records_to_table(
            table,
            schema_name="public",
            records=[(i, f"copied {i}", decimal.Decimal("0.5")) for i in range(101, 1101)],
        )
        assert result == "COPY 1000"
        assert await conn.fetchval(f"SELECT count(*) FROM public.{table}") == 1100
        out = io.BytesIO()
        result = await conn.copy_from_query(
            f"SELECT id, name FROM public.{table} WHERE id <= $1 ORDER BY id", 3, output=out
        )
        assert result == "COPY 3"
        assert out.getvalue() == b"1\tname 1\n2\tname 2\n3\tname 3\n"
        text = io.BytesIO(b"".join(f"{i}\tfrom file {i}\t1\n".encode() for i in range(2000, 2500)))
        assert await conn.copy_to_table(table, source=text, schema_name="public") == "COPY 500"
        out = io.BytesIO()
        await conn.copy_from_table(table, schema_name="public", output=out, format="csv")
        assert out.getvalue().count(b"\n") == 1600
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS public.{table}")


async def test_cursor_in_a_transaction(conn: asyncpg.Connection) -> None:
    async with conn.transaction():
        ids = conn.cursor("SELECT id FROM customers ORDER BY id", prefetch=7)
        seen = [r["id"] async for r in ids]
        assert seen == list(range(1, TEST_CUSTOMERS + 1))
        cur = await conn.cursor("SELECT g FROM generate_series(1, 100) g")
        assert [r[0] for r in await cur.fetch(5)] == [1, 2, 3, 4, 5]
        await cur.forward(10)
        assert await cur.fetchrow() == (16,)


async def test_transactions_and_rollback(conn: asyncpg.Connection) -> None:
    await conn.execute("CREATE TEMP TABLE t (v int)")
    async with conn.transaction():
        await conn.execute("INSERT INTO t VALUES (1)")
    with pytest.raises(RuntimeError, match="boom"):
        async with conn.transaction():
            await conn.execute("INSERT INTO t VALUES (2)")
            raise RuntimeError("boom")
    async with conn.transaction():
        await conn.execute("INSERT INTO t VALUES (3)")
        sp = conn.transaction()  # a savepoint
        await sp.start()
        await conn.execute("INSERT INTO t VALUES (4)")
        await sp.rollback()
    assert [r[0] for r in await conn.fetch("SELECT v FROM t ORDER BY v")] == [1, 3]
    assert not conn.is_in_transaction()


async def test_errors_keep_the_connection_usable(conn: asyncpg.Connection) -> None:
    with pytest.raises(asyncpg.DivisionByZeroError):
        await conn.fetchval("SELECT 1 / $1::int", 0)
    with pytest.raises(asyncpg.UndefinedTableError):
        await conn.fetch("SELECT * FROM no_such_table")
    with pytest.raises(asyncpg.PostgresSyntaxError):
        await conn.execute("SELEC 1")
    async with conn.transaction():
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute("CREATE TEMP TABLE u (v int UNIQUE); INSERT INTO u VALUES (1), (1)")
    with pytest.raises(asyncpg.InFailedSQLTransactionError):
        async with conn.transaction():
            with pytest.raises(asyncpg.DivisionByZeroError):
                await conn.execute("SELECT 1/0")
            await conn.execute("SELECT 1")
    assert await conn.fetchval("SELECT 'still usable'") == "still usable"


async def test_concurrent_connections(proxy: TopengProcess) -> None:
    async def one(i: int) -> int:
        c = await asyncpg.connect(proxy.dsn("alice", TEST_USERS["alice"]))
        try:
            return int(await c.fetchval("SELECT count(*) FROM accounts WHERE customer_id = $1", i))
        finally:
            await c.close()

    counts = await asyncio.gather(*(one(i) for i in range(1, 21)))
    assert all(c >= 1 for c in counts)


async def test_wrong_password(proxy: TopengProcess) -> None:
    with pytest.raises(asyncpg.InvalidPasswordError) as caught:
        await asyncpg.connect(proxy.dsn("alice", "not-the-password"))
    assert caught.value.sqlstate == "28P01"
    assert 'password authentication failed for user "alice"' in str(caught.value)


@pytest.mark.parametrize("user", ["md5user", "plainuser", "dba_ani"])
async def test_other_authentication_methods(pg: PgServer, proxy: TopengProcess, user: str) -> None:
    if user != "dba_ani" and not pg.own_cluster:
        pytest.skip("needs our own pg_hba.conf")
    password = TEST_USERS.get(user) or DEMO_USERS[user]
    c = await asyncpg.connect(proxy.dsn(user, password))
    try:
        assert await c.fetchval("SELECT current_user") == user
        assert await c.fetchval("SELECT count(*) FROM customers") == TEST_CUSTOMERS
    finally:
        await c.close()
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(proxy.dsn(user, "wrong"))
