"""psycopg 3 (libpq underneath) through Topeng, in both relay modes."""

from __future__ import annotations

import decimal
import threading
from collections.abc import Iterator
from datetime import date

import psycopg
import pytest
import rawpg
from harness import TEST_CUSTOMERS, TEST_USERS, PgServer, TopengProcess
from psycopg import errors, sql


@pytest.fixture(scope="module", params=rawpg.MODES)
def proxy(
    request: pytest.FixtureRequest, pg: PgServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TopengProcess]:
    process = rawpg.start_mode(pg, request.param, tmp_path_factory.mktemp(f"pcg-{request.param}"))
    yield process
    process.stop()


def _dsn(proxy: TopengProcess, user: str = "alice") -> str:
    return proxy.dsn(user, TEST_USERS[user])


@pytest.fixture
def conn(proxy: TopengProcess) -> Iterator[psycopg.Connection]:
    with psycopg.connect(_dsn(proxy)) as connection:
        yield connection


def test_text_and_binary_results(conn: psycopg.Connection) -> None:
    query = (
        "SELECT id, nik, birth_date, penghasilan, created_at FROM customers "
        "WHERE id BETWEEN %s AND %s ORDER BY id"
    )
    with conn.cursor() as cur:
        text_rows = cur.execute(query, (1, 50)).fetchall()
    with conn.cursor(binary=True) as cur:
        binary_rows = cur.execute(query, (1, 50)).fetchall()
        res = cur.pgresult
        assert res is not None and [res.fformat(i) for i in range(res.nfields)] == [1] * 5
    assert text_rows == binary_rows
    assert len(text_rows) == 50
    assert isinstance(text_rows[0][2], date)
    assert isinstance(text_rows[0][3], decimal.Decimal)
    with conn.cursor(binary=True) as cur:
        row = cur.execute(
            "SELECT %b::int[], %b::jsonb, %b::bytea, %b::numeric",
            ([1, None, 3], psycopg.types.json.Jsonb({"a": [1, "x"]}), b"\x00\xff", 1.25),
        ).fetchone()
    assert row == ([1, None, 3], {"a": [1, "x"]}, b"\x00\xff", decimal.Decimal("1.25"))


def test_pipeline_mode(conn: psycopg.Connection) -> None:
    conn.execute("CREATE TEMP TABLE pipe (v int)")
    conn.commit()
    with conn.pipeline() as pipeline, conn.cursor() as cur:
        for i in range(50):
            cur.execute("INSERT INTO pipe VALUES (%s)", (i,))
        counts = conn.execute("SELECT count(*) FROM pipe")
        pipeline.sync()
        names = conn.execute("SELECT full_name FROM customers WHERE id = %s", (7,))
        assert counts.fetchone() == (50,)
        assert names.fetchone()[0]  # type: ignore[index]
    conn.commit()
    # An error in the middle of a pipeline: later statements are skipped until the sync.
    with pytest.raises(errors.DivisionByZero), conn.pipeline():
        conn.execute("INSERT INTO pipe VALUES (%s)", (100,))
        conn.execute("SELECT 1 / %s", (0,))
        conn.execute("INSERT INTO pipe VALUES (%s)", (101,))
    conn.rollback()
    assert conn.execute("SELECT count(*), max(v) FROM pipe").fetchone() == (50, 49)


def test_server_side_cursor(conn: psycopg.Connection) -> None:
    with conn.cursor(name="customers_cur") as cur:
        cur.itersize = 100
        cur.execute("SELECT id FROM customers ORDER BY id")
        ids = [r[0] for r in cur]
    assert ids == list(range(1, TEST_CUSTOMERS + 1))
    with conn.cursor(name="scroll_cur", scrollable=True, binary=True) as cur:
        cur.execute("SELECT g FROM generate_series(1, 10) g")
        assert cur.fetchmany(3) == [(1,), (2,), (3,)]
        cur.scroll(5)
        assert cur.fetchone() == (9,)
        cur.scroll(0, mode="absolute")
        assert cur.fetchone() == (1,)
    conn.commit()


def test_copy_in_and_out(conn: psycopg.Connection, proxy: TopengProcess) -> None:
    table = sql.Identifier(f"pcg_copy_{proxy.port}")
    conn.execute(sql.SQL("DROP TABLE IF EXISTS public.{}").format(table))
    conn.execute(sql.SQL("CREATE TABLE public.{} (id int, name text, d date)").format(table))
    try:
        rows = [(i, f"nama {i}\twith tab", date(2000, 1, 1 + i % 28)) for i in range(3000)]
        with conn.cursor() as cur:
            with cur.copy(sql.SQL("COPY public.{} FROM STDIN").format(table)) as copy:
                for r in rows:
                    copy.write_row(r)
            with cur.copy(
                sql.SQL("COPY public.{} (id, name, d) FROM STDIN (FORMAT binary)").format(table)
            ) as copy:
                copy.set_types(["int4", "text", "date"])
                copy.write_row((-1, None, date(1999, 12, 31)))
            out = []
            with cur.copy(
                sql.SQL("COPY (SELECT id, name, d FROM public.{} ORDER BY id) TO STDOUT").format(
                    table
                )
            ) as copy:
                copy.set_types(["int4", "text", "date"])
                while (row := copy.read_row()) is not None:
                    out.append(row)
        assert out == [(-1, None, date(1999, 12, 31)), *rows]
        conn.commit()
        # An error raised while copying in: psycopg sends CopyFail; the session carries on.
        with pytest.raises(ValueError, match="changed my mind"), conn.cursor() as cur:
            with cur.copy(sql.SQL("COPY public.{} FROM STDIN").format(table)) as copy:
                copy.write_row((1, "x", date(2000, 1, 1)))
                raise ValueError("changed my mind")
        conn.rollback()
        assert conn.execute(sql.SQL("SELECT count(*) FROM public.{}").format(table)).fetchone() == (
            3001,
        )
    finally:
        conn.rollback()
        conn.execute(sql.SQL("DROP TABLE IF EXISTS public.{}").format(table))
        conn.commit()


def test_copy_in_with_the_extended_protocol(conn: psycopg.Connection) -> None:
    """libpq's PQsendQueryParams: Parse/Bind/Describe/Execute/Sync, then data, CopyDone, Sync."""
    conn.autocommit = True
    conn.execute("CREATE TEMP TABLE xcopy (v int)")
    pgconn = conn.pgconn
    pgconn.send_query_params(b"COPY xcopy FROM STDIN", None)
    result = pgconn.get_result()
    assert result is not None and result.status == psycopg.pq.ExecStatus.COPY_IN
    assert pgconn.put_copy_data(b"1\n2\n3\n") == 1
    assert pgconn.put_copy_end() == 1
    result = pgconn.get_result()
    assert result is not None and result.status == psycopg.pq.ExecStatus.COMMAND_OK, (
        result and result.error_message
    )
    assert result.command_status == b"COPY 3"
    while pgconn.get_result() is not None:
        pass
    assert conn.execute("SELECT sum(v) FROM xcopy").fetchone() == (6,)


def test_notices(conn: psycopg.Connection) -> None:
    seen: list[tuple[str | None, str | None]] = []
    conn.add_notice_handler(lambda d: seen.append((d.severity, d.message_primary)))
    conn.execute("DO $$BEGIN RAISE NOTICE 'first %', 1; RAISE WARNING 'second'; END$$")
    conn.execute("DROP TABLE IF EXISTS surely_not_here")
    assert seen == [
        ("NOTICE", "first 1"),
        ("WARNING", "second"),
        ("NOTICE", 'table "surely_not_here" does not exist, skipping'),
    ]


def test_client_encoding_latin9(conn: psycopg.Connection) -> None:
    """After SET client_encoding every string on the wire (SQL, statement names, column names,
    error and notice text) is in that encoding: Topeng must not read it as UTF-8."""
    conn.autocommit = True
    conn.execute("SET client_encoding TO latin9")
    assert conn.info.encoding == "iso8859-15"
    euro = "\u20ac"  # 0xA4 in LATIN9
    cur = conn.execute(f"SELECT '{euro}' AS \"{euro}\", %s::text", (f"x{euro}",), prepare=True)
    assert cur.fetchone() == (euro, f"x{euro}")
    assert cur.description is not None and cur.description[0].name == euro
    with pytest.raises(errors.UndefinedTable) as caught:
        conn.execute(f'SELECT 1 FROM "foo{euro}bar"')
    assert caught.value.diag.message_primary == f'relation "foo{euro}bar" does not exist'
    seen: list[str | None] = []
    conn.add_notice_handler(lambda d: seen.append(d.message_primary))
    conn.execute(f"DO $$BEGIN RAISE NOTICE '{euro}'; END$$")
    assert seen == [euro]
    assert conn.execute("SELECT 1").fetchone() == (1,)  # the session is still there


def test_listen_notify(proxy: TopengProcess) -> None:
    with (
        psycopg.connect(_dsn(proxy), autocommit=True) as listener,
        psycopg.connect(_dsn(proxy, "plainuser"), autocommit=True) as sender,
    ):
        listener.execute("LISTEN topeng_events")
        sender_pid = sender.info.backend_pid

        def send() -> None:
            sender.execute("NOTIFY topeng_events, 'one'")
            sender.execute("SELECT pg_notify('topeng_events', 'two')")

        thread = threading.Thread(target=send)
        thread.start()
        got = list(listener.notifies(timeout=5, stop_after=2))
        thread.join(5)
        assert [(n.channel, n.payload, n.pid) for n in got] == [
            ("topeng_events", "one", sender_pid),
            ("topeng_events", "two", sender_pid),
        ]
        # A notification that arrives while the listener runs a query of its own.
        sender.execute("NOTIFY topeng_events, 'three'")
        listener.execute("SELECT pg_sleep(0.1)")
        got = list(listener.notifies(timeout=2, stop_after=1))
        assert [n.payload for n in got] == ["three"]


def test_autocommit_and_transactions(conn: psycopg.Connection, proxy: TopengProcess) -> None:
    conn.execute("CREATE TEMP TABLE tx (v int) ON COMMIT PRESERVE ROWS")
    conn.commit()
    conn.execute("INSERT INTO tx VALUES (1)")
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
    conn.rollback()
    with conn.transaction():
        conn.execute("INSERT INTO tx VALUES (2)")
        with pytest.raises(errors.UniqueViolation), conn.transaction():
            conn.execute("CREATE UNIQUE INDEX ON tx (v)")
            conn.execute("INSERT INTO tx VALUES (2)")
    assert conn.execute("SELECT array_agg(v) FROM tx").fetchone() == ([2],)
    conn.commit()
    conn.autocommit = True
    conn.execute("INSERT INTO tx VALUES (3)")
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    with pytest.raises(errors.UndefinedColumn):
        conn.execute("SELECT nope FROM tx")
    assert conn.execute("SELECT count(*) FROM tx").fetchone() == (2,)
    assert conn.info.parameter_status("application_name") is not None
    conn.execute("SET application_name = 'psycopg-through-topeng'")
    assert conn.info.parameter_status("application_name") == "psycopg-through-topeng"


def test_wrong_password(proxy: TopengProcess) -> None:
    with pytest.raises(psycopg.OperationalError) as caught:
        psycopg.connect(proxy.dsn("alice", "wrong"))
    assert 'password authentication failed for user "alice"' in str(caught.value)


@pytest.mark.parametrize("user", ["md5user", "plainuser"])
def test_md5_and_cleartext_users(pg: PgServer, proxy: TopengProcess, user: str) -> None:
    if not pg.own_cluster:
        pytest.skip("needs our own pg_hba.conf")
    with psycopg.connect(_dsn(proxy, user)) as c:
        assert c.execute("SELECT current_user").fetchone() == (user,)
