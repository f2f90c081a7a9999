"""max_rows_per_query through Topeng against a real server, with psycopg.

A restricted role selecting 100,000 rows gets exactly max_rows_per_query rows (on_row_limit:
truncate, with a NOTICE) or SQLSTATE 54000; its next statement succeeds; the cancelled
statement is gone from the server (pg_stat_activity, read directly as superuser); inside an
explicit transaction the transaction is failed as PostgreSQL would leave it (25P02, ROLLBACK).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from harness import PgServer, StartTopeng, TopengProcess, wait_until
from psycopg import errors

from proxy.sampledata import DEMO_USERS

LIMIT = 1000
BIG_ROWS = 100_000

RULES = f"""
version: 1
roles:
  dba: {{users: [postgres, "dba_*"], unrestricted: true}}
  cutter: {{users: ["ai_*"], max_rows_per_query: {LIMIT}, on_row_limit: truncate}}
  agent: {{users: ["agent_*"], max_rows_per_query: {LIMIT}}}
default_role: agent
labels:
  nik: ["*.*.nik"]
policies:
  "*":
    nik: {{mask: partial, keep_first: 6}}
"""

ERROR_USER = "agent_citra"  # on_row_limit: error (the default)
TRUNCATE_USER = "ai_helper"  # on_row_limit: truncate


@pytest.fixture(scope="module")
def big_table(pg: PgServer) -> Iterator[str]:
    pg.execute(
        "DROP TABLE IF EXISTS bank.big;"
        "CREATE TABLE bank.big AS SELECT g AS id, lpad(g::text, 16, '0') AS nik, "
        f"'note ' || g AS note FROM generate_series(1, {BIG_ROWS}) g;"
        "GRANT SELECT ON bank.big TO agents, ai_helper, dba_ani;"
    )
    try:
        yield "bank.big"
    finally:
        pg.execute("DROP TABLE IF EXISTS bank.big")


@pytest.fixture
def proxy(start_topeng: StartTopeng, tmp_path: Path, big_table: str) -> TopengProcess:
    rules = tmp_path / "rows.yaml"
    rules.write_text(RULES)
    return start_topeng(rules=rules)


def connect(proxy: TopengProcess, user: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(proxy.dsn(user, DEMO_USERS[user]), autocommit=True)


def running_on_server(pg: PgServer, user: str, marker: str) -> list[str]:
    """Active statements of `user` containing `marker`, read directly from PostgreSQL."""
    with psycopg.connect(pg.superuser_dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT query FROM pg_stat_activity WHERE usename = %s AND state <> 'idle' "
            "AND query LIKE %s AND pid <> pg_backend_pid()",
            (user, f"%{marker}%"),
        ).fetchall()
    return [str(r[0]) for r in rows]


def test_truncate_returns_exactly_the_limit_with_a_notice(proxy: TopengProcess) -> None:
    notices: list[str] = []
    with connect(proxy, TRUNCATE_USER) as conn:
        conn.add_notice_handler(lambda d: notices.append(str(d.message_primary)))
        rows = conn.execute("SELECT id, nik FROM bank.big").fetchall()
        assert len(rows) == LIMIT
        assert all(str(nik).endswith("*" * 10) for _, nik in rows)
        assert any("truncated" in n and str(LIMIT) in n for n in notices), notices
        # the next statement succeeds, the session is in step
        assert conn.execute("SELECT count(*) FROM bank.big").fetchone() == (BIG_ROWS,)
        # extended protocol, too
        cur = conn.execute("SELECT id FROM bank.big WHERE id > %s", (0,))
        assert len(cur.fetchall()) == LIMIT


def test_truncate_inside_a_transaction_keeps_it_usable(proxy: TopengProcess) -> None:
    with connect(proxy, TRUNCATE_USER) as conn:
        conn.execute("BEGIN")
        assert len(conn.execute("SELECT id FROM bank.big").fetchall()) == LIMIT
        assert conn.execute("SELECT 1").fetchone() == (1,)
        conn.execute("COMMIT")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_error_at_the_limit_and_the_session_goes_on(proxy: TopengProcess, pg: PgServer) -> None:
    with connect(proxy, ERROR_USER) as conn:
        with pytest.raises(errors.ProgramLimitExceeded) as info:
            conn.execute("SELECT id, nik FROM bank.big").fetchall()
        diag = info.value.diag
        assert diag.sqlstate == "54000"
        assert diag.message_primary is not None and "max_rows_per_query" in diag.message_primary
        assert diag.message_hint is not None and "LIMIT" in diag.message_hint
        assert conn.execute("SELECT count(*) FROM bank.big").fetchone() == (BIG_ROWS,)
        with pytest.raises(errors.ProgramLimitExceeded):
            conn.execute("SELECT id FROM bank.big WHERE id > %s", (0,)).fetchall()
        assert conn.execute("SELECT %s::int", (7,)).fetchone() == (7,)
        assert len(conn.execute("SELECT id FROM bank.big LIMIT 1000").fetchall()) == LIMIT
    wait_until(
        lambda: not running_on_server(pg, ERROR_USER, "bank.big"),
        "the statement to leave the server",
    )


def test_cancelled_statement_is_gone_from_the_server(proxy: TopengProcess, pg: PgServer) -> None:
    # 100,000 x 1,000 rows: without the cancel this runs for minutes
    marker = "topeng_row_limit_cancel_probe"
    sql = f"SELECT b.id, b.note AS {marker} FROM bank.big b CROSS JOIN generate_series(1, 1000) g"
    with connect(proxy, ERROR_USER) as conn:
        with pytest.raises(errors.ProgramLimitExceeded):
            conn.execute(sql).fetchall()
        wait_until(
            lambda: not running_on_server(pg, ERROR_USER, marker), "the cancelled statement to go"
        )
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_error_inside_a_transaction_fails_it(proxy: TopengProcess, pg: PgServer) -> None:
    with connect(proxy, ERROR_USER) as conn:
        conn.execute("BEGIN")
        assert conn.execute("SELECT 1").fetchone() == (1,)
        with pytest.raises(errors.ProgramLimitExceeded):
            conn.execute("SELECT id FROM bank.big").fetchall()
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        with pytest.raises(errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.execute("ROLLBACK")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert conn.execute("SELECT 2").fetchone() == (2,)
    wait_until(
        lambda: not running_on_server(pg, ERROR_USER, "bank.big"),
        "the statement to leave the server",
    )


def test_unrestricted_user_is_not_limited(proxy: TopengProcess) -> None:
    with connect(proxy, "dba_ani") as conn:
        assert len(conn.execute("SELECT id FROM bank.big").fetchall()) == BIG_ROWS
