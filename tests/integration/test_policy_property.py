"""Property: no query from a small grammar over the sample schema leaks a protected value.

Hypothesis draws SELECTs over bank.customers (optionally joined to accounts): select lists
mixing protected and unprotected columns, expressions, aggregates, scalar subqueries; WHERE
clauses with various operators; GROUP BY / ORDER BY / LIMIT; UNION ALL. Each runs through
Topeng as agent_citra with asyncpg (extended protocol, binary rows); whatever comes back,
rows or an error with its detail and hint, is scanned by the leak matcher. Derandomized and
bounded (max_examples, a time budget), so a run is repeatable; a failing query found once is
kept below as an @example.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass

import asyncpg
import harness
import policykit as kit
import psycopg
import pytest
from harness import PgServer, TopengProcess
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxy.sampledata import DEMO_USERS

PROTECTED = ["nik", "no_kk", "penghasilan", "no_hp", "email", "nama_ibu_kandung"]
PLAIN = ["id", "full_name", "city", "province", "birth_date", "gender", "created_at"]
TIME_BUDGET = 60.0  # seconds of examples; later examples are skipped, not failed


@dataclass
class PropWorld:
    topeng: TopengProcess
    matcher: kit.LeakMatcher
    loop: asyncio.AbstractEventLoop
    conn: asyncpg.Connection
    nik: str
    started: float
    ran: int = 0
    answered: int = 0


@pytest.fixture(scope="module")
def world(pg: PgServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PropWorld]:
    directory = tmp_path_factory.mktemp("property")
    topeng = harness.start_topeng(
        pg, rules=kit.bank_rules_without_rate(directory), log_dir=directory
    )
    protected, unprotected = kit.load_protected(pg.superuser_dsn)
    with psycopg.connect(pg.superuser_dsn) as c:
        row = c.execute("SELECT nik FROM bank.customers WHERE id = 1").fetchone()
        assert row is not None
    loop = asyncio.new_event_loop()
    dsn = topeng.dsn("agent_citra", DEMO_USERS["agent_citra"])
    conn = loop.run_until_complete(kit.apg_connect(dsn))
    state = PropWorld(
        topeng, kit.matcher_for("agent", protected, unprotected), loop, conn, row[0],
        time.monotonic(),
    )  # fmt: skip
    try:
        yield state
    finally:
        loop.run_until_complete(state.conn.close())
        loop.close()
        topeng.stop()


# -- the grammar -----------------------------------------------------------------------------

column = st.sampled_from(PROTECTED + PLAIN)
literal = st.sampled_from(["'3275'", "'x'", "1", "'Kota Bandung'", "NULL", "'%0%'"])


@st.composite
def item(draw: st.DrawFn) -> str:
    col = "c." + draw(column)
    form = draw(st.integers(0, 13))
    return [
        col,
        col,
        col,
        f"upper({col}::text)",
        f"{col}::text",
        f"{col}::text || 'x'",
        f"length({col}::text)",
        f"count({col})",
        f"max({col})",
        f"coalesce({col}::text, 'none')",
        f"CASE WHEN {col}::text = 'x' THEN 1 ELSE 0 END",
        f"(SELECT c2.{col[2:]} FROM bank.customers c2 WHERE c2.id = c.id)",
        f"lag({col}) OVER (ORDER BY c.id)",
        "a.balance" if draw(st.booleans()) else "a.product",
    ][form]


@st.composite
def condition(draw: st.DrawFn) -> str:
    col = "c." + draw(column)
    op = draw(st.sampled_from(["=", "<>", "<", ">=", "LIKE", "IN", "IS NULL", "~", "BETWEEN"]))
    value = draw(literal)
    if op == "IN":
        return f"{col}::text IN ({value}, 'y')" if draw(st.booleans()) else f"{col} IN ({value})"
    if op == "IS NULL":
        return f"{col} IS NULL"
    if op == "BETWEEN":
        return f"{col}::text BETWEEN '1' AND '4'"
    if op in ("LIKE", "~"):
        return f"{col}::text {op} {value}::text"
    return f"{col} {op} {value}" if draw(st.booleans()) else f"{col}::text {op} {value}::text"


@st.composite
def select(draw: st.DrawFn, width: int | None = None) -> str:
    n = width if width is not None else draw(st.integers(1, 4))
    items = [draw(item()) for _ in range(n)]
    join = draw(st.booleans())
    sql = "SELECT " + ", ".join(items) + " FROM bank.customers c"
    if join or any(i.startswith("a.") for i in items):
        sql += " JOIN bank.accounts a ON a.customer_id = c.id"
    conditions = [f"c.id < {draw(st.integers(1, 40))}"]
    conditions += [draw(condition()) for _ in range(draw(st.integers(0, 2)))]
    glue = draw(st.sampled_from([" AND ", " OR "]))
    sql += " WHERE " + glue.join(conditions)
    if draw(st.booleans()):
        sql += f" GROUP BY c.{draw(column)}, c.id"
    if draw(st.booleans()):
        sql += f" ORDER BY c.{draw(column)}"
    sql += f" LIMIT {draw(st.integers(1, 30))}"
    return sql


@st.composite
def query(draw: st.DrawFn) -> str:
    if draw(st.integers(0, 4)) == 0:
        width = draw(st.integers(1, 3))
        return f"({draw(select(width))}) UNION ALL ({draw(select(width))})"
    return draw(select())


# -- the property ----------------------------------------------------------------------------


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(sql=query())
@example(sql="SELECT c.nik, c.email FROM bank.customers c WHERE c.id < 3 LIMIT 3")
@example(sql="SELECT c.nik::text FROM bank.customers c WHERE c.id < 3 LIMIT 3")
@example(sql="SELECT max(c.no_hp) FROM bank.customers c WHERE c.id < 3 LIMIT 3")
def test_generated_queries_do_not_leak(world: PropWorld, sql: str) -> None:
    if time.monotonic() - world.started > TIME_BUDGET:
        return
    if world.conn.is_closed():
        dsn = world.topeng.dsn("agent_citra", DEMO_USERS["agent_citra"])
        world.conn = world.loop.run_until_complete(kit.apg_connect(dsn))
    outcome = world.loop.run_until_complete(kit.run_asyncpg(world.conn, sql))
    world.ran += 1
    world.answered += bool(outcome.results and outcome.results[0].rows)
    leaks = world.matcher.scan_outcome(outcome, sent=sql)
    assert not leaks, (sql, leaks)


def test_the_property_ran(world: PropWorld) -> None:
    """The property above saw real queries and real rows (run after it, same module)."""
    assert world.ran >= 20
    assert world.answered >= 5
