"""No raw protected value reaches a restricted user, whatever the query.

Every policy fixture case, and adversarial queries written here, run through Topeng as the
restricted demo users: agent_citra (asyncpg: extended protocol, binary rows; psycopg: simple
protocol, text rows), ai_helper (psql) and spv_budi (psycopg, against the labels a supervisor
must not see in full). Everything that comes back (rows, errors with detail and hint, notices,
notifications, parameter statuses, COPY data) is scanned by `policykit.LeakMatcher` for every
NIK, KK number, multi-word mother's maiden name, exact income, full phone number (and its
digits-only and 0-prefixed forms) and e-mail address of the sample bank, also reversed, hex-
and base64-encoded. Values the query itself sent are not counted.

The rules are rules/bank.yaml without the agent's per-minute row budget: with it, most queries
would be refused 53400 after the first few hundred rows and the test would prove little.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import harness
import policykit as kit
import psycopg
import pytest
from harness import PgServer, TopengProcess

from proxy.sampledata import DEMO_USERS


@dataclass
class LeakWorld:
    pg: PgServer
    topeng: TopengProcess
    agent: kit.LeakMatcher
    supervisor: kit.LeakMatcher
    nik: str  # customer 1's NIK
    phone: str
    email: str


@pytest.fixture(scope="module")
def world(pg: PgServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LeakWorld]:
    directory = tmp_path_factory.mktemp("leaks")
    kit.create_world(pg)
    try:
        rules = kit.bank_rules_without_rate(directory)
        topeng = harness.start_topeng(pg, rules=rules, log_dir=directory)
        protected, unprotected = kit.load_protected(pg.superuser_dsn)
        with psycopg.connect(pg.superuser_dsn) as conn:
            nik, phone, email = conn.execute(
                "SELECT nik, no_hp, email FROM bank.customers WHERE id = 1"
            ).fetchone()  # type: ignore[misc]
        try:
            yield LeakWorld(
                pg,
                topeng,
                kit.matcher_for("agent", protected, unprotected),
                kit.matcher_for("supervisor", protected, unprotected),
                nik,
                phone,
                email,
            )
        finally:
            topeng.stop()
    finally:
        kit.drop_world(pg)


def test_matcher_finds_every_form(world: LeakWorld) -> None:
    nik = world.nik
    import base64

    assert world.agent.scan(f"x {nik} y")
    assert world.agent.scan(nik[::-1])
    assert world.agent.scan(nik.encode().hex())
    assert world.agent.scan("\\x" + f"id={nik};".encode().hex())
    assert world.agent.scan(base64.b64encode(f"ab{nik}".encode()).decode())
    assert world.agent.scan(world.phone.replace("+62", "0"))
    assert world.agent.scan(world.email.upper())
    assert not world.agent.scan(nik[:6] + "**********")
    assert not world.agent.scan(f"x {nik} y", sent=f"WHERE nik = '{nik}'")


# -- the fixture cases ------------------------------------------------------------------------


def _scan(matcher: kit.LeakMatcher, outcome: kit.Outcome, sql: str, where: str) -> list[str]:
    return [f"{where}: {leak}" for leak in matcher.scan_outcome(outcome, sent=sql)]


async def test_fixture_cases_asyncpg_agent(world: LeakWorld) -> None:
    leaks: list[str] = []
    answered = 0
    notices: list[str] = []
    dsn = world.topeng.dsn("agent_citra", DEMO_USERS["agent_citra"])
    conn = await kit.apg_connect(dsn, notices)
    try:
        for case in kit.CASES:
            params = [world.nik] * 3 if kit.has_params(case.sql) else []
            if "ANY(" in case.sql:
                continue  # asyncpg's type introspection is refused: see test_policy_clients
            outcome = await kit.run_asyncpg(conn, case.sql, params)
            outcome.notices, notices[:] = list(notices), []
            answered += bool(outcome.results and any(r.rows for r in outcome.results))
            leaks += _scan(world.agent, outcome, case.sql, case.id)
            if outcome.error is not None and outcome.error.sqlstate is None:
                await conn.close()
                conn = await kit.apg_connect(dsn, notices)
            elif kit.stateful(case.sql) or conn.is_in_transaction():
                await conn.close()
                conn = await kit.apg_connect(dsn, notices)
    finally:
        await conn.close()
    assert not leaks, "\n".join(leaks)
    assert answered >= 60  # the scan saw real rows


@pytest.mark.parametrize(("user", "role"), [("agent_citra", "agent"), ("spv_budi", "supervisor")])
def test_fixture_cases_psycopg(world: LeakWorld, user: str, role: str) -> None:
    matcher = world.agent if role == "agent" else world.supervisor
    leaks: list[str] = []
    answered = 0
    sink: list[str] = []
    dsn = world.topeng.dsn(user, DEMO_USERS[user])
    conn = kit.pc_connect(dsn, sink)
    try:
        for case in kit.CASES:
            params = [world.nik] * 3 if kit.has_params(case.sql) else []
            if "ANY(" in case.sql:
                params = [[world.nik]]
            outcome = kit.run_psycopg(conn, case.sql, params)
            outcome.notices, sink[:] = list(sink), []
            if not conn.closed:
                outcome.extra += kit.parameter_statuses(conn)
            answered += bool(outcome.results and any(r.rows for r in outcome.results))
            leaks += _scan(matcher, outcome, case.sql, case.id)
            idle = not conn.closed and (
                conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            )
            if conn.closed or not idle or kit.stateful(case.sql):
                conn.close()
                conn = kit.pc_connect(dsn, sink)
    finally:
        conn.close()
    assert not leaks, "\n".join(leaks)
    assert answered >= 60


# -- adversarial queries ----------------------------------------------------------------------

#: {nik}, {phone}, {email}: customer 1's values (sent by the client, so not counted).
ADVERSARIAL: list[str] = [
    # casts and errors that print values
    "SELECT nik::int FROM customers WHERE id = 1",
    "SELECT nik::bigint::int FROM customers WHERE id = 1",
    "SELECT id FROM customers WHERE id = 1 AND nik::int = 1",
    "SELECT 1/(nik::bigint - {nik}) FROM customers WHERE id = 1",
    "SELECT id FROM customers WHERE 1/(nik::bigint - {nik}) = 1",
    "SELECT id FROM customers WHERE nik = '{nik}' AND 1/(id - id) = 1",
    "SELECT CAST(email AS int) FROM customers WHERE id = 1",
    "SELECT no_hp::numeric::int2 FROM customers WHERE id = 1",
    "SELECT penghasilan::int2 FROM customers WHERE id = 1",
    "SELECT to_date(nik, 'YYYY') FROM customers WHERE id = 1",
    "SELECT nama_ibu_kandung::int FROM customers WHERE id = 1",
    "SELECT id FROM customers WHERE nama_ibu_kandung::int = 1",
    "SELECT 1 / (length(email) - length(email)) FROM customers WHERE id = 1",
    "SELECT id FROM customers WHERE id = 1 AND CASE WHEN nik LIKE '3%' THEN 1/0 ELSE 1 END = 1",
    "SELECT id FROM customers WHERE nik = '{nik}' AND "
    "(SELECT 1/0 FROM customers WHERE nik LIKE '3%' LIMIT 1) = 1",
    "SELECT ('x' || nik)::int FROM customers WHERE id = 1",
    "SELECT json_build_object('n', nik)::jsonb -> 'n' FROM customers WHERE id = 1",
    # string functions, concatenation, CASE
    "SELECT reverse(nik) FROM customers WHERE id = 1",
    "SELECT substr(nik, 7), substring(nik from 13) FROM customers WHERE id = 1",
    "SELECT right(nik, 10) FROM customers WHERE id = 1",
    "SELECT encode(nik::bytea, 'hex'), encode(nik::bytea, 'base64') FROM customers WHERE id = 1",
    "SELECT md5(nik), translate(nik, '0123456789', 'abcdefghij') FROM customers WHERE id = 1",
    "SELECT nik || '' FROM customers WHERE id = 1",
    "SELECT concat(nik), concat_ws(',', nik, email) FROM customers WHERE id = 1",
    "SELECT format('%s', nik) FROM customers WHERE id = 1",
    "SELECT CASE WHEN true THEN nik END FROM customers WHERE id = 1",
    "SELECT CASE WHEN nik > '3' THEN full_name END FROM customers WHERE id = 1",
    "SELECT coalesce(nik, 'x'), nullif(email, '') FROM customers WHERE id = 1",
    "SELECT regexp_replace(nik, '(.)', '\\1 ', 'g') FROM customers WHERE id = 1",
    "SELECT regexp_matches(email, '(.*)@') FROM customers WHERE id = 1",
    "SELECT id FROM customers WHERE nik ~ '^32' LIMIT 5",
    "SELECT id FROM customers WHERE no_hp SIMILAR TO '%1%' LIMIT 5",
    "SELECT lpad(no_hp, 20), upper(email), lower(nama_ibu_kandung) FROM customers WHERE id = 1",
    "SELECT penghasilan + 0, penghasilan * 1, round(penghasilan, -3) FROM customers WHERE id = 1",
    "SELECT (penghasilan / 1000)::int FROM customers WHERE id = 1",
    # JSON / XML / arrays
    "SELECT to_json(nik), to_jsonb(email) FROM customers WHERE id = 1",
    "SELECT row_to_json(c) FROM customers c WHERE id = 1",
    "SELECT row_to_json(s) FROM (SELECT id, nik FROM customers) s WHERE id = 1",
    "SELECT json_agg(c) FROM (SELECT nik FROM customers WHERE id < 3) c",
    "SELECT jsonb_build_object('p', no_hp) FROM customers WHERE id = 1",
    "SELECT array_agg(nik), string_agg(email, ',') FROM customers WHERE id < 5",
    "SELECT ARRAY[nik] FROM customers WHERE id = 1",
    "SELECT (ARRAY[nik])[1] FROM customers WHERE id = 1",
    "SELECT unnest(ARRAY[nik, no_kk]) FROM customers WHERE id = 1",
    "SELECT xmlforest(nik, email) FROM customers WHERE id = 1",
    "SELECT query_to_xml('select nik from bank.customers limit 3', true, false, '')",
    "SELECT table_to_xml('bank.customers', true, false, '')",
    "SELECT c::text FROM customers c WHERE id = 1",
    "SELECT (c.*)::text FROM customers c WHERE id = 1",
    "SELECT ROW(nik, email) FROM customers WHERE id = 1",
    # subqueries, CTEs, set operations, lateral, windows
    "SELECT (SELECT nik FROM customers WHERE id = 1)",
    "SELECT s.n FROM (SELECT upper(nik) AS n FROM customers WHERE id = 1) s",
    "WITH x AS (SELECT nik::text AS n FROM customers WHERE id = 1) SELECT n FROM x",
    "WITH x AS (SELECT nik FROM customers WHERE id = 1) SELECT nik || '' FROM x",
    "WITH RECURSIVE r(n) AS (SELECT nik::text FROM customers WHERE id = 1 "
    "UNION ALL SELECT n FROM r WHERE false) SELECT n FROM r",
    "SELECT nik FROM customers WHERE id = 1 UNION ALL SELECT full_name FROM customers WHERE id = 1",
    "SELECT full_name FROM customers WHERE id = 1 UNION SELECT nik FROM customers WHERE id = 1",
    "SELECT email FROM customers WHERE id = 1 UNION SELECT no_hp FROM customers WHERE id = 1",
    "SELECT nik FROM customers WHERE id = 1 EXCEPT SELECT '0'",
    "SELECT 1 FROM customers WHERE id = 1 INTERSECT SELECT length(nik) FROM customers",
    "SELECT l.x FROM customers c, LATERAL (SELECT c.nik || '' AS x) l WHERE c.id = 1",
    "SELECT l.x FROM customers c CROSS JOIN LATERAL (SELECT c.nik AS x) l WHERE c.id = 1",
    "SELECT lag(nik) OVER (ORDER BY id), lead(email) OVER () FROM customers WHERE id < 3",
    "SELECT first_value(penghasilan) OVER (ORDER BY id) FROM customers WHERE id < 3",
    "SELECT id, max(nik) OVER () FROM customers WHERE id < 3",
    "SELECT min(nik), max(no_kk) FROM customers",
    "SELECT id FROM customers ORDER BY nik LIMIT 3",
    "SELECT id, nik FROM customers WHERE id < 4 ORDER BY 2",
    "SELECT DISTINCT nik FROM customers WHERE id < 3",
    "SELECT count(*) FROM customers GROUP BY nik HAVING count(*) > 0 LIMIT 3",
    "SELECT id FROM customers WHERE nik IN (SELECT nik FROM customers WHERE id = 1)",
    "SELECT id FROM customers WHERE nik = ANY(SELECT nik FROM customers WHERE id = 1)",
    "SELECT id FROM customers WHERE nik BETWEEN '3' AND '4' LIMIT 3",
    # catalogs, explain, settings
    "EXPLAIN (VERBOSE) SELECT nik FROM customers WHERE nik = '{nik}'",
    "EXPLAIN (ANALYZE, VERBOSE) SELECT * FROM customers WHERE id = 1",
    "SELECT most_common_vals::text, histogram_bounds::text FROM pg_stats "
    "WHERE tablename = 'customers'",
    "SELECT * FROM pg_catalog.pg_stats WHERE attname = 'nik'",
    "SELECT s.most_common_vals FROM pg_stats s",
    "SELECT query FROM pg_stat_activity",
    "SELECT stxdmcv FROM pg_statistic_ext_data",
    "SELECT stavalues1 FROM pg_statistic",
    "SELECT * FROM ts_stat('SELECT to_tsvector(nama_ibu_kandung) FROM bank.customers')",
    "SELECT pg_notify('c', nik) FROM customers WHERE id = 1",
    "NOTIFY c, '{nik}'",
    "LISTEN c",
    "SET ROLE dba_ani",
    "SET SESSION AUTHORIZATION dba_ani",
    "SELECT set_config('application_name', nik, false) FROM customers WHERE id = 1",
    "SET application_name = 'probe'",
    "SELECT current_setting('application_name')",
    # comments, quoting, escapes
    'SELECT U&"\\006Eik"::text FROM customers WHERE id = 1',
    'SELECT "nik" || \'\' FROM "bank"."customers" WHERE id = 1',
    "SELECT /* nik */ upper(/**/nik) FROM customers WHERE id = 1",
    "SELECT nik -- comment\n || '' FROM customers WHERE id = 1",
    "SELECT $q$x$q$ || nik FROM customers WHERE id = 1",
    "SELECT E'\\x41' || nik FROM customers WHERE id = 1",
    "SELECT U&'\\0041' || email FROM customers WHERE id = 1",
    # statements the agent may not run
    "COPY (SELECT nik FROM customers WHERE id = 1) TO STDOUT",
    "COPY customers (nik) TO STDOUT",
    "COPY (SELECT id FROM customers WHERE nik = '{nik}') TO STDOUT WITH (FORMAT binary)",
    "DO $$ BEGIN RAISE NOTICE '%', (SELECT nik FROM bank.customers WHERE id = 1); END $$",
    "DO $$ BEGIN RAISE EXCEPTION '%', (SELECT email FROM bank.customers WHERE id = 1); END $$",
    "PREPARE p AS SELECT nik::text FROM customers WHERE id = 1",
    "DECLARE c CURSOR FOR SELECT nik::text FROM customers",
    "CREATE TEMP TABLE t AS SELECT nik FROM customers",
    "SELECT nik INTO TEMP t2 FROM customers",
    "SELECT * FROM pg_temp.t",
    # multi-statement strings
    "SELECT 1; SELECT nik::text FROM customers WHERE id = 1",
    "SELECT nik FROM customers WHERE id = 1; SELECT email || '' FROM customers WHERE id = 1",
    "BEGIN; SELECT nik FROM customers WHERE id = 1; "
    "SELECT reverse(nik) FROM customers WHERE id = 1; COMMIT",
    # plain masked selects (must come back masked)
    "SELECT nik, no_kk, penghasilan, no_hp, email FROM customers WHERE id < 40",
    "SELECT c.nik AS a, c.email AS b FROM customers c WHERE c.id = 1",
    "SELECT nik FROM customers WHERE nik = '{nik}'",
    "SELECT email FROM customers WHERE email = '{email}'",
    "SELECT no_hp FROM customers WHERE no_hp = '{phone}'",
    "SELECT nama_ibu_kandung FROM customers WHERE id < 3",
    "SELECT * FROM customers WHERE id = 1",
    "TABLE customers",
    "SELECT nik FROM customers",
]


def _fill(sql: str, world: LeakWorld) -> str:
    return (
        sql.replace("{nik}", world.nik)
        .replace("{phone}", world.phone)
        .replace("{email}", world.email)
    )


@pytest.mark.parametrize("template", ADVERSARIAL)
async def test_adversarial_asyncpg(world: LeakWorld, template: str) -> None:
    sql = _fill(template, world)
    notices: list[str] = []
    conn = await kit.apg_connect(
        world.topeng.dsn("agent_citra", DEMO_USERS["agent_citra"]), notices
    )
    try:
        outcome = await kit.run_asyncpg(conn, sql)
        # the same statements once more: a cached analysis must judge the same
        again = await kit.run_asyncpg(conn, sql) if not conn.is_closed() else kit.Outcome()
    finally:
        if not conn.is_closed():
            await conn.close()
    outcome.notices += notices
    leaks = world.agent.scan_outcome(outcome, sent=sql) + world.agent.scan_outcome(again, sent=sql)
    assert not leaks, leaks


@pytest.mark.parametrize("template", ADVERSARIAL)
def test_adversarial_psycopg(world: LeakWorld, template: str) -> None:
    sql = _fill(template, world)
    for user, matcher in (("ai_helper", world.agent), ("spv_budi", world.supervisor)):
        sink: list[str] = []
        conn = kit.pc_connect(world.topeng.dsn(user, DEMO_USERS[user]), sink)
        try:
            outcome = kit.run_psycopg(conn, sql)
            if not conn.closed:
                outcome.extra += kit.parameter_statuses(conn)
        finally:
            conn.close()
        outcome.notices += sink
        leaks = matcher.scan_outcome(outcome, sent=sql)
        assert not leaks, (user, leaks)


def test_adversarial_psql(world: LeakWorld) -> None:
    """All adversarial queries in one psql script (simple protocol, errors do not stop it)."""
    script = "\n".join(_fill(t, world).rstrip(";") + ";" for t in ADVERSARIAL if "\n" not in t)
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGPASSWORD"] = DEMO_USERS["ai_helper"]
    done = subprocess.run(
        [kit.psql_binary(world.pg), "-X", "-v", "VERBOSITY=verbose", "-h", world.topeng.host,
         "-p", str(world.topeng.port), "-U", "ai_helper", "-d", world.pg.database, "-f", "-"],
        input=script, capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    output = done.stdout + "\n" + done.stderr
    assert "topeng:" in output  # refusals came back
    leaks = world.agent.scan(output, sent=script)
    assert not leaks, leaks


# -- paths beyond one statement ---------------------------------------------------------------


async def test_prepared_statements_and_pipeline_asyncpg(world: LeakWorld) -> None:
    conn = await kit.apg_connect(world.topeng.dsn("agent_citra", DEMO_USERS["agent_citra"]))
    texts: list[str] = []
    try:
        stmt = await conn.prepare(
            "SELECT id, nik, no_kk, penghasilan, no_hp, email FROM customers WHERE id = $1"
        )
        for i in range(1, 6):
            row = await stmt.fetchrow(i)
            texts += [str(v) for v in row.values()]
        rows = await conn.fetch("SELECT nik, email FROM customers WHERE nik = $1", world.nik)
        texts += [str(v) for r in rows for v in r.values()]
        assert rows and rows[0]["nik"] != world.nik
        cursor_rows = []
        async with conn.transaction():
            async for record in conn.cursor(
                "SELECT nik, no_hp FROM customers WHERE id < $1", 30, prefetch=7
            ):
                cursor_rows.append(record)
        texts += [str(v) for r in cursor_rows for v in r.values()]
        assert len(cursor_rows) == 29
        await conn.executemany("SELECT nik FROM customers WHERE id = $1", [(1,), (2,)])
    finally:
        await conn.close()
    leaks = [leak for t in texts for leak in world.agent.scan(t)]
    assert not leaks, leaks


def test_pipeline_and_prepared_psycopg(world: LeakWorld) -> None:
    sink: list[str] = []
    conn = kit.pc_connect(world.topeng.dsn("agent_citra", DEMO_USERS["agent_citra"]), sink)
    texts: list[str] = []
    try:
        with conn.pipeline():
            cursors = []
            for i in range(1, 8):
                cur = conn.cursor()
                cur.execute("SELECT nik, email, no_hp FROM customers WHERE id = %s", (i,))
                cursors.append(cur)
            for cur in cursors:
                texts += [str(v) for r in cur.fetchall() for v in r]
        for _ in range(3):
            cur = conn.execute(
                "SELECT nik, penghasilan FROM customers WHERE id = %s", (3,), prepare=True
            )
            texts += [str(v) for r in cur.fetchall() for v in r]
        with pytest.raises(psycopg.Error):
            with conn.pipeline():
                conn.execute("SELECT nik FROM customers WHERE id = 1")
                conn.execute("SELECT nik::text FROM customers WHERE id = 1")
                conn.execute("SELECT email FROM customers WHERE id = 1")
        texts += sink
    finally:
        conn.close()
    assert len(texts) >= 21
    leaks = [leak for t in texts for leak in world.agent.scan(t)]
    assert not leaks, leaks


SWAPS = [
    (
        "SELECT a.account_number, (SELECT c.nik FROM bank.customers c "
        "WHERE c.id = a.customer_id) AS n FROM bank.accounts a WHERE a.id = 3",
        "SELECT (SELECT c.nik FROM bank.customers c WHERE c.id = a.customer_id) AS n, "
        "a.account_number FROM bank.accounts a WHERE a.id = 3",
    ),
    (
        "SELECT (SELECT nik FROM customers WHERE id = 5) AS n, 'x' AS y",
        "SELECT 'x' AS y, (SELECT nik FROM customers WHERE id = 5) AS n",
    ),
]


@pytest.mark.parametrize(("first", "swapped"), SWAPS)
async def test_select_list_order_does_not_reuse_masks(
    world: LeakWorld, first: str, swapped: str
) -> None:
    conn = await kit.apg_connect(world.topeng.dsn("agent_citra", DEMO_USERS["agent_citra"]))
    try:
        outcomes = [await kit.run_asyncpg(conn, sql) for sql in (first, swapped)]
    finally:
        await conn.close()
    assert outcomes[0].results and outcomes[0].results[0].rows
    leaks = [leak for o in outcomes for leak in world.agent.scan_outcome(o)]
    assert not leaks, leaks
