"""pg8000 (pure Python; its own SCRAM, md5 and cleartext code) through Topeng, both relay modes."""

from __future__ import annotations

import decimal
from collections.abc import Iterator
from datetime import date

import pg8000.native
import pytest
import rawpg
from harness import TEST_CUSTOMERS, TEST_USERS, PgServer, TopengProcess


@pytest.fixture(scope="module", params=rawpg.MODES)
def proxy(
    request: pytest.FixtureRequest, pg: PgServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TopengProcess]:
    process = rawpg.start_mode(pg, request.param, tmp_path_factory.mktemp(f"p8k-{request.param}"))
    yield process
    process.stop()


def _connect(
    proxy: TopengProcess, user: str = "alice", password: str | None = None
) -> pg8000.native.Connection:
    return pg8000.native.Connection(
        user,
        host=proxy.host,
        port=proxy.port,
        database=proxy.pg.database,
        password=TEST_USERS[user] if password is None else password,
        timeout=30,
    )


@pytest.fixture
def conn(proxy: TopengProcess) -> Iterator[pg8000.native.Connection]:
    connection = _connect(proxy)
    try:
        yield connection
    finally:
        connection.close()


def test_basic_queries(conn: pg8000.native.Connection) -> None:
    assert conn.run("SELECT 1 AS one, 'x' AS t") == [[1, "x"]]
    assert [c["name"] for c in conn.columns] == ["one", "t"]
    assert conn.run("SELECT count(*) FROM customers") == [[TEST_CUSTOMERS]]
    rows = conn.run("SELECT id, birth_date, penghasilan FROM customers ORDER BY id LIMIT 5")
    assert [r[0] for r in rows] == [1, 2, 3, 4, 5]
    assert all(isinstance(r[1], date) and isinstance(r[2], decimal.Decimal) for r in rows)
    conn.run("CREATE TEMP TABLE t (v int)")
    conn.run("INSERT INTO t SELECT generate_series(1, 10)")
    assert conn.row_count == 10


def test_parameters(conn: pg8000.native.Connection) -> None:
    rows = conn.run(
        "SELECT full_name FROM customers WHERE id = :id OR city = :city ORDER BY id LIMIT :n",
        id=3,
        city="no such city",
        n=5,
    )
    assert len(rows) == 1
    values = conn.run(
        "SELECT :a::int + 1, :b::text, :c::numeric, :d::date, :e::int[], :f::bytea",
        a=41,
        b="Ñ ✓",
        c=decimal.Decimal("1.50"),
        d=date(2020, 2, 29),
        e=[1, 2],
        f=b"\x00\x01",
    )
    assert values == [[42, "Ñ ✓", decimal.Decimal("1.50"), date(2020, 2, 29), [1, 2], b"\x00\x01"]]
    stmt = conn.prepare("SELECT :x::int * 2")
    assert [stmt.run(x=i)[0][0] for i in range(5)] == [0, 2, 4, 6, 8]
    stmt.close()


def test_errors(conn: pg8000.native.Connection) -> None:
    with pytest.raises(pg8000.native.DatabaseError) as caught:
        conn.run("SELECT 1 / 0")
    assert caught.value.args[0]["C"] == "22012"
    with pytest.raises(pg8000.native.DatabaseError) as caught:
        conn.run("SELECT * FROM no_such_table")
    assert caught.value.args[0]["C"] == "42P01"
    conn.run("START TRANSACTION")
    with pytest.raises(pg8000.native.DatabaseError):
        conn.run("SELECT nope")
    with pytest.raises(pg8000.native.DatabaseError) as caught:
        conn.run("SELECT 1")
    assert caught.value.args[0]["C"] == "25P02"
    conn.run("ROLLBACK")
    assert conn.run("SELECT 'usable'") == [["usable"]]


@pytest.mark.parametrize("user", ["alice", "md5user", "plainuser"])
def test_authentication_methods(pg: PgServer, proxy: TopengProcess, user: str) -> None:
    if user != "alice" and not pg.own_cluster:
        pytest.skip("needs our own pg_hba.conf")
    c = _connect(proxy, user)
    try:
        assert c.run("SELECT current_user") == [[user]]
    finally:
        c.close()
    with pytest.raises(pg8000.native.DatabaseError) as caught:
        _connect(proxy, user, "wrong")
    assert caught.value.args[0]["C"] == "28P01"
    assert caught.value.args[0]["M"] == f'password authentication failed for user "{user}"'
