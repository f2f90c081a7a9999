"""Analysis cost per statement, in-process: what a restricted session pays before a query runs.

The catalog and search_path come from the bench database (as Topeng would read them), the role
is the `agent` of rules/bank.yaml, and the clock is `time.perf_counter_ns` around one
`judge_sql_with_facts` call. A hit is a call on a cache that has seen the statement; a miss uses
a fresh `AnalysisCache` every time (fingerprint, parse, qualify, lineage, decision, store).
Iterations are interleaved across the statements so that no one statement gets a warm streak.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from bench.report import AnalysisQueryResult

if TYPE_CHECKING:
    from proxy.policy.analyze import StatementFacts
    from proxy.policy.catalog import Catalog
    from proxy.policy.decision import Decision, Refuse

    Judged = tuple[tuple[StatementFacts, Decision], ...] | Refuse

#: Typical statements of a call-centre agent or an AI agent's SQL tool against the bank.
AGENT_QUERIES: tuple[str, ...] = (
    "SELECT id, full_name, nik, no_hp FROM bank.customers WHERE id = 4711",
    "SELECT full_name, email, city FROM customers WHERE nik = '3273014501900001'",
    "SELECT c.full_name, a.account_number, a.product, a.balance FROM customers c "
    "JOIN accounts a ON a.customer_id = c.id WHERE c.id = 42",
    "SELECT count(*) FROM customers WHERE city = 'Bandung' AND gender = 'P'",
    "SELECT province, count(*) AS n FROM customers GROUP BY province ORDER BY n DESC LIMIT 10",
    "SELECT t.created_at, t.amount, t.kind, t.description FROM transactions t "
    "JOIN accounts a ON a.id = t.account_id WHERE a.customer_id = 42 "
    "ORDER BY t.created_at DESC LIMIT 20",
    "SELECT id, full_name, penghasilan FROM customers WHERE birth_date >= '1990-01-01' "
    "ORDER BY id LIMIT 20",
    "WITH recent AS (SELECT account_id, sum(amount) AS total FROM transactions "
    "WHERE created_at > now() - interval '30 days' GROUP BY account_id) "
    "SELECT a.account_number, r.total FROM recent r JOIN accounts a ON a.id = r.account_id "
    "ORDER BY r.total DESC LIMIT 10",
    "SELECT full_name, no_kk, no_hp FROM customers WHERE id IN (1, 2, 3)",
    "SELECT product, status, avg(balance) AS avg_balance, count(*) FROM accounts "
    "GROUP BY product, status",
)


def measure_analysis(
    superuser_dsn: str,
    rules_path: Path,
    *,
    hit_iterations: int,
    miss_iterations: int,
    log: Callable[[str], None],
) -> tuple[list[AnalysisQueryResult], list[float], list[float]]:
    """Per-query medians, and every hit and miss sample (microseconds)."""
    from proxy.policy.cache import AnalysisCache
    from proxy.policy.decide import judge_sql_with_facts
    from proxy.policy.decision import Refuse
    from proxy.policy.rules import load_rules

    catalog, search_path = asyncio.run(_catalog(superuser_dsn))
    rules = load_rules(rules_path)
    role = rules.role("agent")

    def judge(sql: str, cache: AnalysisCache) -> Judged:
        return judge_sql_with_facts(sql, catalog, search_path, rules, role, cache=cache)

    decisions: dict[str, str] = {}
    warm = AnalysisCache()
    for sql in AGENT_QUERIES:
        judged = judge(sql, warm)
        if isinstance(judged, Refuse):
            decisions[sql] = f"refused ({judged.sqlstate})"
        else:
            kinds = {type(decision).__name__.lower() for _facts, decision in judged}
            decisions[sql] = "/".join(sorted(kinds))
    hits: dict[str, list[float]] = {sql: [] for sql in AGENT_QUERIES}
    misses: dict[str, list[float]] = {sql: [] for sql in AGENT_QUERIES}
    clock = time.perf_counter_ns
    for _ in range(hit_iterations):
        for sql in AGENT_QUERIES:
            start = clock()
            judge(sql, warm)
            hits[sql].append((clock() - start) / 1000)
    log(f"analysis: {hit_iterations} cache hits of each statement timed")
    for _ in range(miss_iterations):
        for sql in AGENT_QUERIES:
            cold = AnalysisCache()
            start = clock()
            judge(sql, cold)
            misses[sql].append((clock() - start) / 1000)
    log(f"analysis: {miss_iterations} cache misses of each statement timed")
    per_query = [
        AnalysisQueryResult(
            sql=sql,
            decision=decisions[sql],
            hit_us=statistics.median(hits[sql]),
            miss_us=statistics.median(misses[sql]),
        )
        for sql in AGENT_QUERIES
    ]
    all_hits = [v for sql in AGENT_QUERIES for v in hits[sql]]
    all_misses = [v for sql in AGENT_QUERIES for v in misses[sql]]
    return per_query, all_hits, all_misses


async def _catalog(dsn: str) -> tuple[Catalog, tuple[str, ...]]:
    import asyncpg

    from proxy.policy.catalog import load_catalog, load_search_path

    conn = await asyncpg.connect(dsn, ssl=False, timeout=30)
    try:
        catalog = await load_catalog(conn)
        search_path = await load_search_path(conn)
    finally:
        await conn.close()
    return catalog, search_path
