"""Metrics, /healthz and /readyz of a running Topeng, scraped over HTTP as Prometheus would.

Every metric named in DESIGN.md is exported; traffic of known shape moves each one by the
expected amount; with `--workers 2` every scrape (whichever worker answers) is the sum over
both workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import shutil
import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import asyncpg
import psycopg
import pytest
from harness import BANK_RULES, TopengProcess, free_port, needs_tool, wait_until
from prometheus_client.parser import text_string_to_metric_families

from proxy import relay as relays
from proxy.sampledata import DEMO_USERS

StartTopeng = Callable[..., TopengProcess]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

#: The metric families of DESIGN.md ("Metrics"), as exposed (counters get `_total`).
DESIGN_METRICS = {
    "topeng_client_connections": "gauge",
    "topeng_connections": "counter",
    "topeng_queries": "counter",
    "topeng_refusals": "counter",
    "topeng_masked_values": "counter",
    "topeng_rows": "counter",
    "topeng_query_duration_seconds": "histogram",
    "topeng_analysis_duration_seconds": "histogram",
    "topeng_analysis_cache": "counter",
    "topeng_rules_reloads": "counter",
    "topeng_rules_last_reload_success": "gauge",
    "topeng_upstream_errors": "counter",
}
#: What a pgbouncer operator would also look for.
OPERATOR_METRICS = {
    "topeng_bytes": "counter",
    "topeng_sessions": "gauge",
    "topeng_upstream_connect_duration_seconds": "histogram",
    "topeng_tls_handshakes": "counter",
    "topeng_analysis_cache_entries": "gauge",
    "topeng_build_info": "gauge",
    "topeng_relay_handovers": "counter",
    "topeng_relay_handbacks": "counter",
}


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(proxy: TopengProcess) -> tuple[dict[str, str], Samples]:
    """(family name -> type, samples) of one /metrics answer."""
    status, text = http_get(proxy.metrics_url + "/metrics")
    assert status == 200, text
    types: dict[str, str] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return types, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def moved(after: Samples, before: Samples, name: str, **labels: str) -> float:
    """How far a sample moved between two scrapes."""
    return value(after, name, **labels) - value(before, name, **labels)


def moved_since(proxy: TopengProcess, before: Samples, *, ended: int) -> Callable[..., float]:
    """Once `ended` connections are counted as ended ok: how far a sample (name, labels) has
    moved since the scrape `before`."""
    wait_until(
        lambda: value(scrape(proxy)[1], "topeng_connections_total", result="ok") == ended,
        f"{ended} connection(s) counted as ended ok",
    )
    _, after = scrape(proxy)
    return functools.partial(moved, after, before)


def connect(proxy: TopengProcess, user: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(proxy.dsn(user, DEMO_USERS[user]), autocommit=True)


def agent_traffic(proxy: TopengProcess) -> None:
    """One masked query (3 rows, 3 NIKs masked), one policy refusal, one row-limit refusal."""
    with connect(proxy, "agent_citra") as conn:
        rows = conn.execute("SELECT id, nik FROM bank.customers WHERE id <= 3 ORDER BY id")
        masked = [r[1] for r in rows.fetchall()]
        assert len(masked) == 3 and all(n.endswith("*" * 10) for n in masked)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT nama_ibu_kandung FROM bank.customers WHERE id = 1")
        with pytest.raises(psycopg.errors.ProgramLimitExceeded):
            conn.execute("SELECT id FROM bank.customers").fetchall()


def test_every_metric_is_exported_with_its_type(start_topeng: StartTopeng) -> None:
    proxy = start_topeng()
    types, samples = scrape(proxy)
    for name, kind in {**DESIGN_METRICS, **OPERATOR_METRICS}.items():
        assert types.get(name) == kind, f"{name}: {types.get(name)}"
    assert value(samples, "topeng_rules_last_reload_success") == 1
    assert value(samples, "topeng_build_info") == 1
    # Label values known up front exist at 0, so rate() has a series before the first event.
    assert ("topeng_analysis_cache_total", frozenset({("result", "hit")})) in samples
    assert ("topeng_rules_reloads_total", frozenset({("result", "error")})) in samples


def test_traffic_moves_each_metric(start_topeng: StartTopeng) -> None:
    proxy = start_topeng()
    _, before = scrape(proxy)
    agent_traffic(proxy)
    with connect(proxy, "dba_ani") as conn:
        assert conn.execute("SELECT count(*) FROM bank.customers").fetchone() == (2000,)
        wait_until(
            lambda: value(scrape(proxy)[1], "topeng_sessions", role="dba") == 1, "dba session"
        )
        _, during = scrape(proxy)
        assert value(during, "topeng_client_connections") == 1
    delta = moved_since(proxy, before, ended=2)
    _, after = scrape(proxy)
    assert value(after, "topeng_client_connections") == 0
    assert value(after, "topeng_sessions") == 0
    assert delta("topeng_queries_total", role="agent", decision="masked") == 1
    assert delta("topeng_queries_total", role="agent", decision="refused") == 2
    assert delta("topeng_queries_total", role="dba", decision="allowed") >= 1
    assert delta("topeng_refusals_total", role="agent", reason="row_limit") == 1
    assert delta("topeng_refusals_total", role="agent") == 2
    assert delta("topeng_masked_values_total", role="agent", label="nik") == 3
    assert delta("topeng_rows_total", role="agent") >= 3
    assert delta("topeng_rows_total", role="dba") == 1
    assert delta("topeng_query_duration_seconds_count", role="agent") == 3
    assert delta("topeng_bytes_total", direction="in") > 0
    assert delta("topeng_bytes_total", direction="out") > 0
    assert delta("topeng_upstream_connect_duration_seconds_count") == 2
    # The analysis cache: each restricted statement is analysed once (cache hit or miss).
    lookups = delta("topeng_analysis_cache_total", result="hit") + delta(
        "topeng_analysis_cache_total", result="miss"
    )
    assert lookups >= 3
    assert delta("topeng_analysis_duration_seconds_count") == lookups
    assert value(after, "topeng_analysis_cache_entries") >= 1
    # Low-cardinality labels only: no user names anywhere in the exposition.
    _, text = http_get(proxy.metrics_url + "/metrics")
    assert "agent_citra" not in text and "dba_ani" not in text


def test_unrestricted_sessions_go_through_the_c_relay(start_topeng: StartTopeng) -> None:
    """A DBA's session is relayed by the C thread, comes back to Python for an error and goes
    on; what the thread relayed is counted as if Python had seen it. With TOPENG_PURE_PYTHON
    nothing is relayed in C, and the counts are the same."""
    if not relays.AVAILABLE:
        needs_tool("the C module proxy._relay is not built (pip install -e . builds it)")
    counted = {}
    for pure in (False, True):
        proxy = start_topeng(env={"TOPENG_PURE_PYTHON": "1"} if pure else None)
        _, before = scrape(proxy)
        with connect(proxy, "dba_ani") as conn:
            rows = conn.execute("SELECT g, repeat('x', g % 97) FROM generate_series(1, 40000) g")
            assert [r[0] for r in rows.fetchall()] == list(range(1, 40001))
            with pytest.raises(psycopg.errors.DivisionByZero):
                conn.execute("SELECT 1/0")
            assert conn.execute("SELECT count(*) FROM bank.customers").fetchone() == (2000,)
        delta = moved_since(proxy, before, ended=1)

        handovers = delta("topeng_relay_handovers_total")
        chunk_backs = delta("topeng_relay_handbacks_total", reason="chunk")
        if pure:
            assert handovers == 0 and chunk_backs == 0
        else:
            assert handovers >= 2, "handed over at the start and again after the error"
            assert chunk_backs >= 1, "the ErrorResponse came back to Python"
        counted[pure] = (
            delta("topeng_rows_total", role="dba"),
            delta("topeng_queries_total", role="dba", decision="allowed"),
        )
        proxy.stop()
    assert counted[False] == counted[True] == (40001, 3)


def test_restricted_prepared_statements_go_through_the_gate(
    start_topeng: StartTopeng, tmp_path: Path
) -> None:
    """A supervisor (restricted, no rates) runs a prepared statement again and again: after
    two round trips the relay thread runs it (the gate), and everything is counted as if
    Python had; a masked statement is never gated and stays masked. With TOPENG_PURE_PYTHON
    the counts are the same. Then the rules are reloaded to deny a column of the gated
    statement: the very next run is refused, not forwarded by the thread."""
    if not relays.AVAILABLE:
        needs_tool("the C module proxy._relay is not built (pip install -e . builds it)")
    counted = {}
    plain_sql = "SELECT id, full_name FROM bank.customers WHERE id = %s"
    nik_policy = "    nik: {mask: partial, keep_first: 6}\n"  # the first, in the "*" entry
    assert nik_policy in BANK_RULES.read_text()
    masked_sql = "SELECT id, nik FROM bank.customers WHERE id = %s"
    for pure in (False, True):
        rules = tmp_path / f"rules-{pure}.yaml"
        shutil.copy(BANK_RULES, rules)
        proxy = start_topeng(rules=rules, env={"TOPENG_PURE_PYTHON": "1"} if pure else None)
        _, before = scrape(proxy)
        with connect(proxy, "spv_budi") as conn:
            for i in range(1, 31):
                row = conn.execute(plain_sql, (i,), prepare=True).fetchone()
                assert row is not None and row[0] == i
            # The thread has the session now; the reload must take it back.
            rules.write_text(
                BANK_RULES.read_text()
                .replace("labels:\n", 'labels:\n  customer_name: ["*.*.full_name"]\n', 1)
                .replace(nik_policy, nik_policy + "    customer_name: deny\n", 1)
            )
            proxy.send_signal(signal.SIGHUP)
            wait_until(
                lambda p=proxy: value(scrape(p)[1], "topeng_rules_reloads_total", result="ok") >= 1,
                "the rules reloaded",
            )
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(plain_sql, (1,), prepare=True)
            for i in range(1, 11):
                row = conn.execute(masked_sql, (i,), prepare=True).fetchone()
                assert row is not None and str(row[1]).endswith("**********"), row
            with pytest.raises(psycopg.errors.DivisionByZero):
                conn.execute("SELECT 1/%s::int", (0,), prepare=True)
            rows_before = value(before, "topeng_rows_total", role="supervisor")
            wait_until(
                lambda p=proxy, least=rows_before + 40: (
                    value(scrape(p)[1], "topeng_rows_total", role="supervisor") >= least
                ),
                "the rows counted (the sweep reads the relay's counts once a second)",
            )
            _, during = scrape(proxy)
        wait_until(
            lambda p=proxy: value(scrape(p)[1], "topeng_connections_total", result="ok") == 1,
            "the connection counted as ended ok",
        )

        delta = functools.partial(moved, during, before)

        handovers = delta("topeng_relay_handovers_total")
        if pure:
            assert handovers == 0
        else:
            assert handovers >= 1, "the plain statement was handed to the thread"
        counted[pure] = (
            delta("topeng_rows_total", role="supervisor"),
            delta("topeng_queries_total", role="supervisor", decision="allowed"),
            delta("topeng_queries_total", role="supervisor", decision="masked"),
            delta("topeng_refusals_total", role="supervisor", reason="denied_column"),
            delta("topeng_query_duration_seconds_count", role="supervisor"),
        )
        proxy.stop()
    assert counted[False] == counted[True]
    assert counted[False][:4] == (40, 31, 10, 1), counted[False]


def test_asyncpg_prepared_statements_go_through_the_gate(start_topeng: StartTopeng) -> None:
    """asyncpg describes a statement once and then sends Bind, Execute, Sync: those run in
    the relay thread too (`fetchrow` with a row count of 1, `fetch` without), rows unmasked
    only where the policy saw them pass; counted alike."""
    if not relays.AVAILABLE:
        needs_tool("the C module proxy._relay is not built (pip install -e . builds it)")
    proxy = start_topeng()
    _, before = scrape(proxy)

    async def traffic() -> None:
        conn = await asyncpg.connect(proxy.dsn("spv_budi", DEMO_USERS["spv_budi"]))
        try:
            plain = await conn.prepare("SELECT id, full_name FROM bank.customers WHERE id = $1")
            for i in range(1, 31):
                row = await plain.fetchrow(i)
                assert row is not None and row["id"] == i
            for i in range(1, 11):
                rows = await plain.fetch(i)
                assert [r["id"] for r in rows] == [i]
            masked = await conn.prepare("SELECT id, nik FROM bank.customers WHERE id = $1")
            for i in range(1, 6):
                rows = await masked.fetch(i)
                assert len(rows) == 1 and rows[0]["nik"].endswith("**********"), rows
        finally:
            await conn.close()

    asyncio.run(traffic())
    delta = moved_since(proxy, before, ended=1)

    assert delta("topeng_relay_handovers_total") >= 1
    assert delta("topeng_queries_total", role="supervisor", decision="allowed") >= 40
    assert delta("topeng_queries_total", role="supervisor", decision="masked") >= 5
    assert delta("topeng_rows_total", role="supervisor") == 45


def test_transaction_blocks_go_through_the_gate(start_topeng: StartTopeng) -> None:
    """psycopg's default, autocommit off: BEGIN before the first statement of each
    transaction, COMMIT when the client commits. Once the first transaction has passed through
    Python, the relay thread runs the next ones whole, BEGIN and COMMIT included, so the
    session rarely comes back; everything is counted as with TOPENG_PURE_PYTHON."""
    if not relays.AVAILABLE:
        needs_tool("the C module proxy._relay is not built (pip install -e . builds it)")
    lookup = "SELECT id, full_name FROM bank.customers WHERE id = %s"
    counted = {}
    for pure in (False, True):
        proxy = start_topeng(env={"TOPENG_PURE_PYTHON": "1"} if pure else None)
        _, before = scrape(proxy)
        dsn = proxy.dsn("spv_budi", DEMO_USERS["spv_budi"])
        with psycopg.connect(dsn) as conn:  # autocommit off
            for i in range(1, 61):
                row = conn.execute(lookup, (i,), prepare=True).fetchone()
                assert row is not None and row[0] == i
                assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
                if i % 5 == 0:
                    conn.commit()
            conn.rollback()  # (nothing open: a no-op for psycopg)
            # the session is where psycopg thinks it is: a statement after many gated
            # blocks opens a new one, and an error in it fails only that block
            with pytest.raises(psycopg.errors.DivisionByZero):
                conn.execute("SELECT 1/0")
            conn.rollback()
            row = conn.execute(lookup, (7,), prepare=True).fetchone()
            assert row is not None and row[0] == 7
            conn.commit()
        delta = moved_since(proxy, before, ended=1)
        if pure:
            assert delta("topeng_relay_handovers_total") == 0
        else:
            # 13 transactions; back to Python for the first one's BEGIN and COMMIT, the
            # statements before approval, the error and its ROLLBACK: a handful, not 26+.
            chunks = delta("topeng_relay_handbacks_total", reason="chunk")
            assert 1 <= chunks <= 8, chunks
        counted[pure] = (
            delta("topeng_rows_total", role="supervisor"),
            delta("topeng_queries_total", role="supervisor", decision="allowed"),
            delta("topeng_query_duration_seconds_count", role="supervisor"),
        )
        proxy.stop()
    assert counted[False] == counted[True], counted
    assert counted[False][0] == 61


def _early_in_a_minute() -> None:
    """Waits, if need be, until the wall-clock minute is at most 40 s old: a rate test's
    charges then all fall in one window of max_rows_per_minute."""
    into = time.time() % 60
    if into > 40:
        time.sleep(60.5 - into)


def test_rate_limited_lookups_go_through_the_gate_and_the_limit_holds_exactly(
    start_topeng: StartTopeng, tmp_path: Path
) -> None:
    """An agent (120 rows and 400 statements a minute) looks customers up one by one, with a
    prepared statement: the relay thread runs the lookups, spending a share of the user's
    budget held ahead. A second session of the same user, judged in Python, then gets
    exactly the rest: the first session gives its unused hold back when the second needs it.
    Both are then refused (53400), and everything is counted as with TOPENG_PURE_PYTHON."""
    if not relays.AVAILABLE:
        needs_tool("the C module proxy._relay is not built (pip install -e . builds it)")
    text = BANK_RULES.read_text()
    limits = "    max_rows_per_minute: 600 "
    assert limits in text
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        text.replace(limits, "    max_queries_per_minute: 400\n    max_rows_per_minute: 120 ")
    )
    lookup = "SELECT id, full_name FROM bank.customers WHERE id = %s"
    counted = {}
    for pure in (False, True):
        proxy = start_topeng(rules=rules, env={"TOPENG_PURE_PYTHON": "1"} if pure else None)
        _early_in_a_minute()
        _, before = scrape(proxy)
        with connect(proxy, "agent_citra") as first, connect(proxy, "agent_citra") as second:
            for i in range(1, 61):
                row = first.execute(lookup, (i,), prepare=True).fetchone()
                assert row is not None and row[0] == i
            served = 0
            with pytest.raises(psycopg.errors.ConfigurationLimitExceeded) as refused:
                for i in range(1, 200):
                    row = second.execute(lookup, (i,), prepare=True).fetchone()
                    assert row is not None and row[0] == i
                    served += 1
            assert "max_rows_per_minute (120 rows) is exhausted" in str(refused.value)
            with pytest.raises(psycopg.errors.ConfigurationLimitExceeded):
                first.execute(lookup, (1,), prepare=True)
        delta = moved_since(proxy, before, ended=2)
        if pure:
            assert delta("topeng_relay_handovers_total") == 0
        else:
            assert delta("topeng_relay_handovers_total") >= 1, "the lookups were gated"
            assert delta("topeng_relay_handbacks_total", reason="recalled") >= 1, (
                "the first session was taken back for the second"
            )
        counted[pure] = (
            served,
            delta("topeng_rows_total", role="agent"),
            delta("topeng_refusals_total", role="agent", reason="rate_limit"),
        )
        proxy.stop()
    assert counted[False] == counted[True] == (60, 120, 2), counted


def test_a_gated_session_that_vanishes_gives_its_rate_budget_back(
    start_topeng: StartTopeng, tmp_path: Path
) -> None:
    """An agent (120 rows a minute) whose lookups the relay thread runs on a budget held
    ahead vanishes without a goodbye (its socket shut down under psycopg): Topeng ends that
    session only, and gives the unused budget back, so another session of the same user
    gets exactly the other rows."""
    if not relays.AVAILABLE:
        needs_tool("the C module proxy._relay is not built (pip install -e . builds it)")
    text = BANK_RULES.read_text()
    limits = "    max_rows_per_minute: 600 "
    rules = tmp_path / "rules.yaml"
    rules.write_text(text.replace(limits, "    max_rows_per_minute: 120 "))
    proxy = start_topeng(rules=rules)
    _early_in_a_minute()
    _, before = scrape(proxy)
    lookup = "SELECT id, city FROM bank.customers WHERE id = %s"

    def in_the_thread() -> float:
        _, now = scrape(proxy)
        back = sum(
            value(now, "topeng_relay_handbacks_total", reason=r)
            for r in ("chunk", "closed", "recalled", "write_error")
        )
        return value(now, "topeng_relay_handovers_total") - back

    gone = connect(proxy, "agent_citra")
    for i in range(1, 31):
        row = gone.execute(lookup, (i,), prepare=True).fetchone()
        assert row is not None and row[0] == i
    wait_until(lambda: in_the_thread() == 1, "the session in the relay thread, on a budget")
    # The socket goes away under the client: no Terminate message.
    socket.socket(fileno=os.dup(gone.fileno())).shutdown(socket.SHUT_RDWR)
    wait_until(
        lambda: value(scrape(proxy)[1], "topeng_connections_total", result="client_gone") == 1,
        "the vanished session ended",
    )
    assert in_the_thread() == 0
    with contextlib.suppress(psycopg.Error):
        gone.close()
    served = 0
    with connect(proxy, "agent_citra") as conn:
        with pytest.raises(psycopg.errors.ConfigurationLimitExceeded):
            for i in range(1, 200):
                row = conn.execute(lookup, (i,), prepare=True).fetchone()
                assert row is not None and row[0] == i
                served += 1
        # the session goes on (a statement that reads no rows needs no budget)
        conn.execute("SET application_name = 'after'")
        assert conn.info.parameter_status("application_name") == "after"
    assert served == 90
    _, after = scrape(proxy)
    assert moved(after, before, "topeng_relay_handovers_total") >= 1
    assert moved(after, before, "topeng_rows_total", role="agent") == 120


def test_rules_reload_metrics(start_topeng: StartTopeng, tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    shutil.copy(BANK_RULES, rules)
    proxy = start_topeng(rules=rules)
    proxy.send_signal(signal.SIGHUP)
    wait_until(
        lambda: value(scrape(proxy)[1], "topeng_rules_reloads_total", result="ok") == 1,
        "a successful reload",
    )
    assert value(scrape(proxy)[1], "topeng_rules_last_reload_success") == 1
    rules.write_text("version: 1\nroles: [this is not a mapping\n")
    proxy.send_signal(signal.SIGHUP)
    wait_until(
        lambda: value(scrape(proxy)[1], "topeng_rules_reloads_total", result="error") >= 1,
        "a failed reload",
    )
    _, samples = scrape(proxy)
    assert value(samples, "topeng_rules_last_reload_success") == 0
    # The old rules stay in force.
    with connect(proxy, "agent_citra") as conn:
        assert (
            conn.execute("SELECT nik FROM bank.customers WHERE id = 1")
            .fetchone()[0]
            .endswith("*" * 10)
        )


def test_health_and_ready(start_topeng: StartTopeng) -> None:
    proxy = start_topeng()
    assert http_get(proxy.metrics_url + "/healthz") == (200, "ok\n")
    status, body = http_get(proxy.metrics_url + "/readyz")
    assert (status, body.strip()) == (200, "ready")
    assert http_get(proxy.metrics_url + "/nothing-here")[0] == 404


def test_ready_fails_while_the_upstream_is_unreachable(start_topeng: StartTopeng) -> None:
    proxy = start_topeng("--upstream", f"postgresql://127.0.0.1:{free_port()}")
    assert http_get(proxy.metrics_url + "/healthz") == (200, "ok\n")
    status, body = http_get(proxy.metrics_url + "/readyz")
    assert status == 503
    assert "upstream unreachable" in body
    with pytest.raises(psycopg.OperationalError, match="cannot connect to the server"):
        connect(proxy, "agent_citra")
    wait_until(
        lambda: value(scrape(proxy)[1], "topeng_upstream_errors_total", kind="connect") == 1,
        "the upstream connect error counted",
    )
    _, samples = scrape(proxy)
    assert value(samples, "topeng_connections_total", result="upstream_error") == 1


# -- --workers N ----------------------------------------------------------------------------------


def _worker_pids(proxy: TopengProcess) -> set[str]:
    return set(re.findall(r"topeng\[(\d+)\]: client \S+: user \S+ gets role", proxy.stderr_text()))


def test_workers_share_the_random_hash_key(start_topeng: StartTopeng) -> None:
    """Rules without hash_key: one random key per instance, made before the workers fork, so
    the supervisor's hash of a mother's maiden name is the same whichever worker answers."""
    proxy = start_topeng("--workers", "2", "--log-level", "debug")
    hashes = set()
    for _ in range(16):
        with connect(proxy, "spv_budi") as conn:
            row = conn.execute("SELECT nama_ibu_kandung FROM bank.customers WHERE id = 1")
            hashes.add(row.fetchone())
    assert len(_worker_pids(proxy)) == 2, proxy.stderr_text()[-2000:]  # 16 coin flips
    assert len(hashes) == 1, hashes


def test_workers_scrapes_are_the_sum(start_topeng: StartTopeng, tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proxy = start_topeng("--workers", "2", "--log-level", "debug", env={"TMPDIR": str(tmp)})
    assert [p.name for p in tmp.iterdir() if p.name.startswith("topeng-metrics-")]
    sessions = 24
    for i in range(sessions):
        user = "dba_ani" if i % 2 else "agent_citra"
        with connect(proxy, user) as conn:
            conn.execute("SELECT id FROM bank.customers WHERE id = %s", (i + 1,)).fetchall()
    # SO_REUSEPORT spread the connections over both workers (24 coin flips).
    assert len(_worker_pids(proxy)) == 2, proxy.stderr_text()[-2000:]

    def totals_complete() -> bool:
        return value(scrape(proxy)[1], "topeng_connections_total", result="ok") == sessions

    wait_until(totals_complete, f"{sessions} connections in the summed counter")
    # Whichever worker answers, the answer is the sum over both.
    for _ in range(10):
        _, samples = scrape(proxy)
        assert value(samples, "topeng_connections_total", result="ok") == sessions
        assert value(samples, "topeng_queries_total", role="agent") == sessions // 2
        assert value(samples, "topeng_rows_total", role="agent") == sessions // 2
        assert value(samples, "topeng_query_duration_seconds_count", role="agent") == sessions // 2
        assert value(samples, "topeng_upstream_connect_duration_seconds_count") == sessions
        assert value(samples, "topeng_client_connections") == 0
        assert value(samples, "topeng_rules_last_reload_success") == 1
        assert value(samples, "topeng_build_info") == 1
    # Gauges: open sessions of both workers add up.
    held = [connect(proxy, "dba_ani") for _ in range(6)]
    try:
        wait_until(
            lambda: value(scrape(proxy)[1], "topeng_client_connections") == len(held),
            "the open connections of both workers",
        )
        for _ in range(5):
            _, samples = scrape(proxy)
            assert value(samples, "topeng_client_connections") == len(held)
            assert value(samples, "topeng_sessions", role="dba") == len(held)
    finally:
        for conn in held:
            conn.close()
    assert proxy.stop() == 0
    # The parent removed its metrics directory.
    assert not [p.name for p in tmp.iterdir() if p.name.startswith("topeng-metrics-")]
