"""Unit tests of the bulk-export controls: rate-limit arithmetic and stores, lookup counting,
require_where, folding aggregates, COPY format extraction and the COPY masker plan."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import pytest
from test_policy_fixtures import SEARCH_PATH, bank_catalog

from proxy.policy.analyze import analyze
from proxy.policy.cache import AnalysisCache
from proxy.policy.decide import judge_sql
from proxy.policy.decision import ALLOW, CopyFormat, Mask, Refuse
from proxy.policy.engine import RestrictedPolicy
from proxy.policy.limits import (
    HOUR,
    MINUTE,
    Limiter,
    MemoryStore,
    RedisStore,
    make_limiter,
    value_counts,
)
from proxy.policy.rules import Rules, load_rules
from proxy.session import RowLimit
from proxy.tasks import spawn
from proxy.wire import messages as m

CATALOG = bank_catalog()

RULES = """
version: 1
roles:
  dba: {users: [postgres], unrestricted: true}
  masker:
    users: ["masker_*"]
    copy_out: mask
  limited:
    users: ["lim_*"]
    max_rows_per_query: 100
    max_rows_per_minute: 250
    max_queries_per_minute: 5
    require_where: ["bank.customers"]
  nolimit:
    users: ["free_*"]
  agent:
    users: ["agent_*"]
    max_rows_per_query: 50
default_role: agent
labels:
  nik: ["*.*.nik"]
  phone: ["*.*.no_hp"]
  income: ["*.*.penghasilan"]
policies:
  "*":
    nik: {mask: partial, keep_first: 6, max_lookups_per_minute: 10}
    phone: {mask: partial, keep_last: 3}
    income: {mask: round, to: 1000000}
"""


@pytest.fixture(scope="module")
def rules(tmp_path_factory: pytest.TempPathFactory) -> Rules:
    path: Path = tmp_path_factory.mktemp("rules") / "rules.yaml"
    path.write_text(RULES)
    return load_rules(path)


class Clock:
    def __init__(self, now: float = 1_000_020.0) -> None:  # 20 s into a minute
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- sliding windows -----------------------------------------------------------------------------


def test_window_counts_and_refuses_with_retry() -> None:
    clock = Clock(60 * 1000 + 15)
    lim = Limiter(MemoryStore(), clock=clock)
    for _ in range(10):
        assert lim.take("k", 10, MINUTE) is None
    out = lim.take("k", 10, MINUTE)
    assert out is not None and out.limit == 10 and out.used == 10
    # 45 s to the next minute, then the 10 of this minute must decay by 1/10 of a window
    assert out.retry_after == 45 + 6
    assert lim.used("k", MINUTE) == 10
    # refused charges are not counted
    assert lim.used("k", MINUTE) == 10


def test_previous_window_decays() -> None:
    clock = Clock(60 * 1000)
    lim = Limiter(MemoryStore(), clock=clock)
    lim.add("k", MINUTE, 10)
    clock.now += 60  # start of the next minute: the previous minute counts fully
    assert lim.used("k", MINUTE) == 10
    out = lim.check("k", 10, MINUTE)
    assert out is not None and out.retry_after == 6  # 1/10 of the previous must age out
    clock.now += 30  # half-way: half of the previous minute counts
    assert lim.used("k", MINUTE) == 5
    assert lim.check("k", 10, MINUTE, 5) is None
    assert lim.check("k", 10, MINUTE, 6) is not None
    clock.now += 60
    assert lim.used("k", MINUTE) == 0


def test_keys_and_windows_are_independent() -> None:
    lim = Limiter(MemoryStore(), clock=Clock())
    lim.add("rows:a", MINUTE, 5)
    lim.add("rows:a", HOUR, 5)
    assert lim.used("rows:b", MINUTE) == 0
    assert lim.remaining("rows:a", 8, MINUTE) == 3
    assert lim.remaining("rows:a", 8, HOUR) == 3


def test_a_charge_larger_than_the_limit_never_fits() -> None:
    lim = Limiter(MemoryStore(), clock=Clock())
    out = lim.check("k", 3, MINUTE, 4)
    assert out is not None and out.retry_after == MINUTE


def test_a_hold_is_charged_to_its_window_and_given_back_there() -> None:
    """The relay gate's holds (RestrictedPolicy.reserve_gate): charged ahead to the window in
    force, given back to that same window even after it has ended."""
    clock = Clock(60 * 1000 + 45)
    lim = Limiter(MemoryStore(), clock=clock)
    assert lim.seconds_left(MINUTE) == 15
    assert lim.seconds_left(HOUR) == 3600 - (60 * 1000 + 45) % 3600
    slot = lim.slot("rows:u", MINUTE)
    lim.charge(slot, 8)  # held ahead
    assert lim.used("rows:u", MINUTE) == 8
    clock.now += 45  # half-way into the next minute; 3 of the 8 were used
    lim.charge(slot, 3 - 8)
    assert lim.store.get(slot) == 3
    assert lim.store.get(lim.slot("rows:u", MINUTE)) == 0
    assert lim.used("rows:u", MINUTE) == 2  # 3 in the previous minute, half of it counts


def test_a_failing_check_may_take_holds_back_once() -> None:
    lim = Limiter(MemoryStore(), clock=Clock())
    released: list[str] = []

    def release_a() -> None:
        released.append("a")
        lim.unhold("rows:u", release_a)

    def release_b() -> None:
        released.append("b")
        lim.unhold("rows:u", release_b)
        lim.unhold("queries:u", release_b)

    lim.hold("rows:u", release_a)
    lim.hold("rows:u", release_b)
    lim.hold("queries:u", release_b)
    assert lim.held("rows:u") and lim.held("queries:u")
    assert not lim.reclaim("rows:other")
    assert lim.reclaim("rows:u")
    assert sorted(released) == ["a", "b"]
    assert not lim.held("rows:u") and not lim.held("queries:u"), "b gave all of its hold back"
    assert not lim.reclaim("rows:u"), "nothing is held any more"


def test_make_limiter_backends(rules: Rules) -> None:
    assert make_limiter(rules).backend == "memory"
    assert make_limiter("redis://127.0.0.1:1/0").backend == "redis"


# -- Redis store, with a fake client --------------------------------------------------------------


class FakePipeline:
    def __init__(self, server: FakeRedis) -> None:
        self.server = server
        self.ops: list[tuple[str, str, int]] = []

    def incrby(self, key: str, amount: int) -> None:
        self.ops.append(("incrby", key, amount))

    def expire(self, key: str, seconds: int) -> None:
        self.ops.append(("expire", key, seconds))

    def get(self, key: str) -> None:
        self.ops.append(("get", key, 0))

    async def execute(self) -> list[object]:
        if self.server.down:
            raise ConnectionError("down")
        out: list[object] = []
        for op, key, n in self.ops:
            if op == "incrby":
                self.server.data[key] = self.server.data.get(key, 0) + n
                out.append(self.server.data[key])
            elif op == "expire":
                self.server.expires[key] = n
                out.append(True)
            else:
                value = self.server.data.get(key)
                out.append(None if value is None else str(value).encode())
        return out


class FakeRedis:
    def __init__(self) -> None:
        self.data: dict[str, int] = {}
        self.expires: dict[str, int] = {}
        self.down = False

    def pipeline(self, transaction: bool = True) -> FakePipeline:
        return FakePipeline(self)

    async def ping(self) -> bool:
        if self.down:
            raise ConnectionError("down")
        return True


def two_processes() -> tuple[FakeRedis, Limiter, Limiter]:
    """One Redis server and two processes' limiters on it, with one clock."""
    clock = Clock()
    a = Limiter(RedisStore("redis://x", clock=clock), clock=clock)
    b = Limiter(RedisStore("redis://x", clock=clock), clock=clock)
    return FakeRedis(), a, b


def sync(server: FakeRedis, *limiters: Limiter) -> None:
    """Each limiter's background synchronisation, once, in this order."""
    for limiter in limiters:
        assert isinstance(limiter.store, RedisStore)
        asyncio.run(limiter.store.sync_once(server))


def test_redis_store_shares_counts_between_processes() -> None:
    server, a, b = two_processes()
    a.add("rows:u", MINUTE, 7)
    assert a.used("rows:u", MINUTE) == 7  # local, not yet synced
    assert b.used("rows:u", MINUTE) == 0
    sync(server, a, b)
    assert b.used("rows:u", MINUTE) == 7
    b.add("rows:u", MINUTE, 3)
    sync(server, b, a)
    assert a.used("rows:u", MINUTE) == 10 and b.used("rows:u", MINUTE) == 10
    assert all(v == 2 * MINUTE + 60 for v in server.expires.values())
    assert sum(server.data.values()) == 10


def test_redis_store_takes_back_what_a_hold_gave_back() -> None:
    server, a, b = two_processes()
    assert b.used("rows:u", MINUTE) == 0  # (b reads the counter: its syncs fetch it)
    slot = a.slot("rows:u", MINUTE)
    a.charge(slot, 12)  # held ahead
    sync(server, a, b)
    assert b.used("rows:u", MINUTE) == 12, "the other process sees the hold as used"
    a.charge(slot, 5 - 12)  # 5 used, 7 given back
    sync(server, a, b)
    assert a.used("rows:u", MINUTE) == b.used("rows:u", MINUTE) == 5
    assert sum(server.data.values()) == 5


def test_redis_store_keeps_limiting_while_redis_is_down() -> None:
    server = FakeRedis()
    clock = Clock()
    store = RedisStore("redis://x", clock=clock)
    lim = Limiter(store, clock=clock)
    lim.add("q:u", MINUTE, 4)
    asyncio.run(store.sync_once(server))
    server.down = True
    lim.add("q:u", MINUTE, 4)
    with pytest.raises(ConnectionError):
        asyncio.run(store.sync_once(server))
    # the last global total plus what this process counted since: still limited
    assert lim.used("q:u", MINUTE) == 8
    assert lim.check("q:u", 8, MINUTE) is not None
    server.down = False
    asyncio.run(store.sync_once(server))
    assert sum(server.data.values()) == 8 and lim.used("q:u", MINUTE) == 8


def test_redis_run_logs_fallback_and_never_unlimited(caplog: pytest.LogCaptureFixture) -> None:
    # nothing listens on port 1: run() must keep going, say so, and keep counting locally
    store = RedisStore("redis://127.0.0.1:1/0", interval=0.01)
    lim = Limiter(store)

    async def scenario() -> None:
        task = spawn(lim.run())
        for _ in range(200):
            await asyncio.sleep(0.01)
            if store.up is False:
                break
        lim.add("k", MINUTE, 3)
        assert lim.check("k", 3, MINUTE) is not None
        lim.close()
        await asyncio.wait_for(task, 5)

    with caplog.at_level("WARNING", logger="topeng.limits"):
        asyncio.run(scenario())
    assert store.up is False
    assert any("applying limits locally" in r.getMessage() for r in caplog.records)


# -- lookups ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT id FROM bank.customers WHERE nik = '1'", {"nik": 1}),
        ("SELECT id FROM bank.customers c WHERE c.nik IN ('1','2','3')", {"nik": 3}),
        ("SELECT id FROM bank.customers WHERE nik = '1' OR nik = '2'", {"nik": 2}),
        ("SELECT id FROM bank.customers WHERE nik = ANY(ARRAY['1','2'])", {"nik": 2}),
        ("SELECT id FROM bank.customers WHERE '1' = nik", {"nik": 1}),
        ("SELECT id FROM bank.customers WHERE nik::text = $1", {"nik": 1}),
        ("SELECT id FROM bank.customers WHERE nik = ANY($1)", "nik"),
        ("SELECT id FROM bank.customers WHERE nik = ANY('{1,2}')", "nik"),
        ("SELECT id FROM bank.customers WHERE id = 3", {}),
    ],
)
def test_value_counts(sql: str, expected: object) -> None:
    assert value_counts(sql, {"nik"}) == expected


def policy(rules: Rules, role: str, limiter: Limiter | None, user: str = "u1") -> RestrictedPolicy:
    return RestrictedPolicy(
        rules,
        rules.role(role),
        CATALOG,
        SEARCH_PATH,
        cache=AnalysisCache(),
        hash_key=b"k" * 32,
        limiter=limiter,
        user=user,
    )


def test_lookup_limit_counts_values_per_user(rules: Rules) -> None:
    lim = Limiter(MemoryStore(), clock=Clock())
    p1 = policy(rules, "agent", lim)
    p2 = policy(rules, "agent", lim)  # a second session of the same user
    other = policy(rules, "agent", lim, user="u2")
    sql = "SELECT id, nik FROM bank.customers WHERE nik = '3273010101010001'"
    for i in range(5):
        assert not isinstance((p1 if i % 2 else p2).judge_query(sql), Refuse)
    in_list = "SELECT id FROM bank.customers WHERE nik IN ('1','2','3','4','5','6')"
    refused = p1.judge_query(in_list)  # 5 + 6 > 10
    assert isinstance(refused, Refuse) and refused.sqlstate == "53400"
    assert refused.reason == "lookup_limit" and "retry in" in refused.message
    assert refused.detail is not None and "6 more" in refused.detail
    assert not isinstance(p2.judge_query(in_list.replace(",'6'", "")), Refuse)  # exactly 10
    assert isinstance(p1.judge_query(sql), Refuse)
    assert not isinstance(other.judge_query(sql), Refuse)
    # statements that look nothing up still run
    assert not isinstance(p1.judge_query("SELECT id FROM bank.customers WHERE id = 1"), Refuse)


def test_any_array_parameter_refused_for_limited_labels(rules: Rules) -> None:
    p = policy(rules, "agent", Limiter(MemoryStore(), clock=Clock()))
    out = p.judge_parse("SELECT id FROM bank.customers WHERE nik = ANY($1)", ())
    assert isinstance(out, Refuse) and out.reason == "lookup_limit"
    assert out.hint is not None and "IN (" in out.hint and "= $1" in out.hint


# -- queries and rows ------------------------------------------------------------------------------


def test_queries_per_minute_and_what_counts(rules: Rules) -> None:
    lim = Limiter(MemoryStore(), clock=Clock())
    p = policy(rules, "limited", lim)
    for _ in range(20):
        assert not isinstance(p.judge_query("BEGIN; SET application_name = 'x'; COMMIT"), Refuse)
    ok = "SELECT id FROM bank.customers WHERE id = 1"
    for _ in range(5):
        assert not isinstance(p.judge_query(ok), Refuse)
    out = p.judge_query(ok)
    assert isinstance(out, Refuse) and out.reason == "rate_limit" and out.sqlstate == "53400"
    assert "max_queries_per_minute" in out.message and out.detail is not None
    assert "Retry after" in out.detail


def test_row_budget_shapes_the_row_limit(rules: Rules) -> None:
    clock = Clock()
    lim = Limiter(MemoryStore(), clock=clock)
    p = policy(rules, "limited", lim)
    assert p.row_limit(ALLOW) == RowLimit(100)  # 250 left: the per-query limit binds
    p.rows_sent(ALLOW, 100)
    p.rows_sent(ALLOW, 100)
    limit = p.row_limit(ALLOW)
    assert limit is not None and limit.rows == 50 and not limit.truncate
    assert limit.refusal is not None and limit.refusal.sqlstate == "53400"
    assert limit.refusal.reason == "rate_limit" and "max_rows_per_minute" in limit.refusal.message
    p.rows_sent(ALLOW, 50)
    out = p.judge_query("SELECT id FROM bank.customers WHERE id = 1")
    assert isinstance(out, Refuse) and out.reason == "rate_limit"
    assert out.hint is not None and "wait" in out.hint
    clock.now += 2 * MINUTE
    assert p.row_limit(ALLOW) == RowLimit(100)


def test_without_limiter_nothing_changes(rules: Rules) -> None:
    p = policy(rules, "limited", None)
    assert p.row_limit(ALLOW) == RowLimit(100)
    for _ in range(10):
        assert not isinstance(p.judge_query("SELECT id FROM bank.customers WHERE id = 1"), Refuse)


# -- require_where and folding aggregates ---------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT id FROM bank.customers",
        "SELECT id FROM bank.customers WHERE true",
        "SELECT id FROM bank.customers WHERE 1 = 1",
        "SELECT id FROM bank.customers WHERE id > 0 OR 1 = 1",
        "SELECT c.id FROM bank.accounts a JOIN bank.customers c ON c.id = a.customer_id",
        "SELECT id FROM (SELECT id FROM bank.customers) s WHERE id = 1",
        "COPY bank.customers (id) TO STDOUT",
    ],
)
def test_require_where_refuses(rules: Rules, sql: str) -> None:
    result = judge_sql(sql, CATALOG, SEARCH_PATH, rules, rules.role("limited"))
    assert isinstance(result, Refuse), sql
    if "COPY" not in sql:
        assert result.reason == "require_where" and "require_where" in result.message
        assert result.hint is not None and "WHERE" in result.hint


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT id FROM bank.customers WHERE id = 1",
        "SELECT id FROM bank.customers WHERE id = 1 AND true",
        "SELECT id FROM bank.accounts",
        "SELECT c.id FROM bank.customers c JOIN bank.accounts a ON a.customer_id = c.id "
        "WHERE a.id = 3",
    ],
)
def test_require_where_allows(rules: Rules, sql: str) -> None:
    result = judge_sql(sql, CATALOG, SEARCH_PATH, rules, rules.role("limited"))
    assert not isinstance(result, Refuse), result


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT string_agg(full_name, ',') FROM bank.customers",
        "SELECT array_to_string(array_agg(full_name), ',') FROM bank.customers",
        "SELECT json_agg(city) FROM bank.customers",
        "SELECT jsonb_object_agg(id, city) FROM bank.customers",
        "SELECT pg_catalog.xmlagg(xmlelement(name x, city)) FROM bank.customers",
        "SELECT json_arrayagg(city) FROM bank.customers",
        "SELECT ARRAY(SELECT full_name FROM bank.customers)",
        "SELECT string_agg(full_name, ',') OVER () FROM bank.customers LIMIT 1",
    ],
)
def test_folding_aggregates_refused_for_limited_roles(rules: Rules, sql: str) -> None:
    result = judge_sql(sql, CATALOG, SEARCH_PATH, rules, rules.role("agent"))
    assert isinstance(result, Refuse), sql
    assert result.reason in ("aggregate", "function", "unsupported"), result
    if result.reason != "unsupported":
        assert result.reason == "aggregate" or "xml" in sql


def test_folding_aggregate_message_and_exceptions(rules: Rules) -> None:
    role = rules.role("agent")
    out = judge_sql(
        "SELECT string_agg(full_name, ',') FROM bank.customers", CATALOG, SEARCH_PATH, rules, role
    )
    assert isinstance(out, Refuse) and out.reason == "aggregate" and out.sqlstate == "42501"
    assert out.hint is not None and "LIMIT" in out.hint
    # fine: ordinary aggregates, folding over unlabelled tables, and roles without row limits
    for sql in (
        "SELECT count(*), max(full_name) FROM bank.customers",
        "SELECT string_agg(product, ',') FROM bank.accounts",
    ):
        assert not isinstance(judge_sql(sql, CATALOG, SEARCH_PATH, rules, role), Refuse), sql
    free = rules.role("nolimit")
    sql = "SELECT string_agg(full_name, ',') FROM bank.customers"
    assert not isinstance(judge_sql(sql, CATALOG, SEARCH_PATH, rules, free), Refuse)
    # over a masked column the older, more specific refusal stays
    out = judge_sql("SELECT string_agg(nik, ',') FROM bank.customers", CATALOG, SEARCH_PATH,
                    rules, role)  # fmt: skip
    assert isinstance(out, Refuse) and out.reason == "masked_expression"


# -- COPY ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("COPY bank.customers (id) TO STDOUT", CopyFormat("text", column_count=1)),
        (
            "COPY bank.customers (id, nik) TO STDOUT CSV HEADER",
            CopyFormat("csv", header=True, column_count=2),
        ),
        (
            "COPY (SELECT id FROM bank.customers) TO STDOUT WITH (FORMAT csv, DELIMITER ';', "
            "QUOTE '''', ESCAPE '\\', NULL 'NULL', HEADER true)",
            CopyFormat("csv", ";", "'", "\\", "NULL", True, 1),
        ),
        ("COPY bank.customers (id) TO STDOUT BINARY", CopyFormat("binary", column_count=1)),
        (
            "COPY bank.customers (id) TO STDOUT DELIMITER '|' NULL ''",
            CopyFormat("text", "|", null="", column_count=1),
        ),
        (
            "COPY bank.customers (id) TO STDOUT (FORMAT csv, FORCE_QUOTE *)",
            CopyFormat("csv", column_count=1, unsupported="FORCE_QUOTE"),
        ),
        (
            "COPY bank.customers (id) TO STDOUT (ENCODING 'LATIN1')",
            CopyFormat("text", column_count=1, unsupported="ENCODING"),
        ),
    ],
)
def test_copy_format_options(sql: str, expected: CopyFormat) -> None:
    (facts,) = analyze(sql, CATALOG, SEARCH_PATH)
    assert facts.copy == expected


def test_masked_copy_decision_carries_format_and_sources(rules: Rules) -> None:
    role = rules.role("masker")
    out = judge_sql("COPY bank.customers (id, nik) TO STDOUT CSV", CATALOG, SEARCH_PATH, rules,
                    role)  # fmt: skip
    assert isinstance(out, tuple) and isinstance(out[0], Mask)
    copy = out[0].copy
    assert copy is not None and copy.format == "csv" and copy.column_count == 2
    rel = CATALOG.find("bank", "customers")
    assert rel is not None
    nik = next(c for c in rel.columns if c.name == "nik")
    assert copy.sources == ((1, ((rel.oid, nik.attnum),)),)
    refused = judge_sql(
        "COPY bank.customers (id, nik) TO STDOUT (FORMAT csv, FORCE_QUOTE *)",
        CATALOG, SEARCH_PATH, rules, role,
    )  # fmt: skip
    assert isinstance(refused, Refuse) and refused.reason == "copy"


def _copy_policy(rules: Rules) -> RestrictedPolicy:
    return policy(rules, "masker", None)


@pytest.mark.parametrize(
    ("options", "fmt", "data", "expected"),
    [
        ("", 0, b"7\t3273010101010001\n", b"7\t327301**********\n"),
        ("CSV HEADER", 0, b"id,nik\n7,3273010101010001\n", b"id,nik\n7,327301**********\n"),
        ("(FORMAT csv, DELIMITER ';')", 0, b'7;"3273010101010001"\n', b"7;327301**********\n"),
    ],
)
def test_plan_copy_masks_text_formats(
    rules: Rules, options: str, fmt: int, data: bytes, expected: bytes
) -> None:
    p = _copy_policy(rules)
    decision = p.judge_parse(f"COPY bank.customers (id, nik) TO STDOUT {options}", ())
    planned = p.plan_copy(decision, m.CopyResponse(b"H", fmt, (fmt, fmt)))
    assert planned is not None and not isinstance(planned, Refuse)
    assert planned.feed(data) + planned.finish() == expected


def test_plan_copy_masks_binary(rules: Rules) -> None:
    p = _copy_policy(rules)
    decision = p.judge_parse("COPY bank.customers (id, nik) TO STDOUT BINARY", ())
    planned = p.plan_copy(decision, m.CopyResponse(b"H", 1, (1, 1)))
    assert planned is not None and not isinstance(planned, Refuse)
    header = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
    row = struct.pack("!h", 2) + struct.pack("!ii", 4, 7) + struct.pack("!i", 16)
    row += b"3273010101010001"
    out = planned.feed(header + row + struct.pack("!h", -1)) + planned.finish()
    assert b"3273010101010001" not in out and b"327301**********" in out


def test_plan_copy_fails_closed(rules: Rules) -> None:
    p = _copy_policy(rules)
    decision = p.judge_parse("COPY bank.customers (id, nik) TO STDOUT CSV", ())
    assert isinstance(decision, Mask)
    # the server says binary where the statement asked for CSV
    assert isinstance(p.plan_copy(decision, m.CopyResponse(b"H", 1, (1, 1))), Refuse)
    # a column count that disagrees with the analysis
    assert isinstance(p.plan_copy(decision, m.CopyResponse(b"H", 0, (0, 0, 0))), Refuse)
    # a decision without its COPY format
    assert isinstance(p.plan_copy(Mask(decision.columns), m.CopyResponse(b"H", 0, ())), Refuse)


def test_lookups_are_counted_on_the_statements_own_text(rules: Rules) -> None:
    # the analysis cache keys by fingerprint, which collapses IN lists: the count must not
    # come from the text first seen
    p = policy(rules, "agent", Limiter(MemoryStore(), clock=Clock()))
    eleven = ", ".join(f"'{i}'" for i in range(11))
    ten = ", ".join(f"'{i}'" for i in range(10))
    out = p.judge_query(f"SELECT id FROM bank.customers WHERE nik IN ({eleven})")
    assert isinstance(out, Refuse) and out.detail is not None and "11 more" in out.detail
    assert not isinstance(p.judge_query(f"SELECT id FROM bank.customers WHERE nik IN ({ten})"),
                          Refuse)  # fmt: skip
    out = p.judge_query("SELECT 1; SELECT id FROM bank.customers WHERE nik = '1'")
    assert isinstance(out, Refuse) and out.reason == "lookup_limit"
