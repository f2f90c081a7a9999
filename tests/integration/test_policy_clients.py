"""The policy fixtures, run against the real database through Topeng by three real clients.

Each case of tests/fixtures/policy/*.sql runs as a login user of its role (fixture users made
by `policykit.create_world`, whose role-level search_path is the case's), through Topeng with
rules/bank.yaml extended by the fixtures' analyst and auditor roles. The same SQL also runs
straight against PostgreSQL as the superuser with the same client, and:

- expected refuse: the driver raises with the expected SQLSTATE, the message starts `topeng:`;
- expected mask: the statement succeeds; each masked column differs from the raw value but
  keeps its type (and the 16 characters of a char(16)); every other column is identical;
- expected allow: the results (or the server's own error) equal the direct ones;
- allow or mask whose direct result is larger than the role's max_rows_per_query: Topeng
  refuses it with 54000 (the unit fixtures judge the policy, not the row limit).

asyncpg (extended protocol, binary results, one prepared statement per statement of a
multi-statement case) and psycopg (the whole string at once: simple protocol, text results;
extended protocol where the case binds parameters) run every case; psql (simple protocol, -c,
ON_ERROR_STOP) runs a representative subset (`PSQL_CASES`), since each run is a process.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import harness
import policykit as kit
import psycopg
import pytest
from harness import PgServer, TopengProcess

CASES = [c for c in kit.CASES if c.id not in kit.SKIP]
SKIPPED = [c for c in kit.CASES if c.id in kit.SKIP]

#: Values differ between two runs of these (clock, user, transaction ids): names and row
#: counts are compared, not values.
_VOLATILE = re.compile(
    r"now\(\)|current_user|txid_current|SHOW ALL|current_date|pg_roles", re.IGNORECASE
)


def _psql_subset() -> list[Any]:
    """Every fourth case of each file, and every multi-statement case: simple protocol."""
    chosen = []
    by_file: dict[str, int] = {}
    for case in CASES:
        seen = by_file.get(case.file, 0)
        by_file[case.file] = seen + 1
        if seen % 4 == 0 or len(kit.statements(case.sql)) > 1:
            chosen.append(case)
    return chosen


PSQL_CASES = _psql_subset()


def _params(client: str, cases: list[Any]) -> list[Any]:
    """The cases as pytest params, known bugs marked xfail(strict=True)."""
    params = []
    for case in cases:
        reason = kit.known_bug(client, case)
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        params.append(pytest.param(case, id=case.id, marks=marks))
    return params


@dataclass
class World:
    pg: PgServer
    topeng: TopengProcess
    niks: list[str]
    asyncpg_conns: dict[str, asyncpg.Connection] = field(default_factory=dict)
    psycopg_conns: dict[str, psycopg.Connection[Any]] = field(default_factory=dict)


@pytest.fixture(scope="module")
def world(pg: PgServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    directory = tmp_path_factory.mktemp("policy-clients")
    kit.create_world(pg)
    try:
        rules = kit.extended_rules(directory)
        topeng = harness.start_topeng(pg, rules=rules, log_dir=directory)
        with psycopg.connect(pg.superuser_dsn) as conn:
            niks = [
                r[0] for r in conn.execute("SELECT nik FROM bank.customers ORDER BY id LIMIT 3")
            ]
        state = World(pg, topeng, niks)
        try:
            yield state
        finally:
            for conn in state.psycopg_conns.values():
                conn.close()
            topeng.stop()
    finally:
        kit.drop_world(pg)


def _after(world: World, case: Any) -> None:
    cleanup = kit.AFTER.get(case.title)
    if cleanup:
        world.pg.execute(cleanup)


def _path(search_path: tuple[str, ...]) -> str:
    """The fixture users' role-level search_path (pg_catalog is implicit)."""
    return ", ".join(s for s in search_path if s != "pg_catalog")


def _direct_key(case: Any) -> str:
    return "direct:" + ",".join(case.search_path)


def _direct_dsn(world: World) -> str:
    return world.pg.superuser_dsn


def _proxied_dsn(world: World, case: Any) -> str:
    return world.topeng.dsn(kit.fixture_user(case.role, case.search_path), kit.PASSWORD)


def _expect_refusal(outcome: kit.Outcome, sqlstate: str, where: str) -> None:
    assert outcome.error is not None, f"{where}: expected {sqlstate}, got {outcome.results}"
    assert outcome.error.sqlstate == sqlstate, f"{where}: {outcome.error}"
    assert outcome.error.message.startswith("topeng:"), f"{where}: {outcome.error}"


def _judge(case: Any, got: kit.Outcome, raw: kit.Outcome | None) -> None:
    kind, sqlstate, masked = kit.expectation(case)
    where = f"{case.id} ({case.title})"
    if kind == "refuse":
        assert sqlstate is not None
        _expect_refusal(got, sqlstate, where)
        return
    assert raw is not None
    limit = kit.ROW_LIMITS[case.role]
    if limit is not None and any(len(r.rows) > limit for r in raw.results):
        _expect_refusal(got, "54000", where)
        return
    if raw.error is not None:
        # the server's own error (SAVEPOINT outside a transaction): passed through unchanged
        assert got.error is not None, f"{where}: direct failed with {raw.error}, proxied not"
        assert got.error.sqlstate == raw.error.sqlstate, f"{where}: {got.error} vs {raw.error}"
        assert not got.error.message.startswith("topeng:"), f"{where}: {got.error}"
        return
    if kind == "allow":
        assert got.error is None, f"{where}: {got.error}"
        assert [r.names for r in got.results] == [r.names for r in raw.results], where
        assert [len(r.rows) for r in got.results] == [len(r.rows) for r in raw.results], where
        if not _VOLATILE.search(case.sql):
            assert got.results == raw.results, f"{where}: results differ"
        return
    kit.compare_masked(got, raw, masked, where)


# -- asyncpg ---------------------------------------------------------------------------------


async def _apg(world: World, key: str, dsn: str, search_path: tuple[str, ...] | None) -> Any:
    conn = world.asyncpg_conns.get(key)
    if conn is None or conn.is_closed():
        conn = await kit.apg_connect(dsn)
        if search_path is not None:
            await conn.execute(f"SET search_path = {_path(search_path)}")
        world.asyncpg_conns[key] = conn
    return conn


async def _apg_release(world: World, key: str, stateful: bool) -> None:
    conn = world.asyncpg_conns.get(key)
    if conn is None:
        return
    if stateful or conn.is_in_transaction():
        world.asyncpg_conns.pop(key)
        await conn.close()


@pytest.fixture(scope="module")
async def apg_world(world: World) -> AsyncIterator[World]:
    yield world
    for conn in world.asyncpg_conns.values():
        await conn.close()
    world.asyncpg_conns.clear()


@pytest.mark.parametrize("case", _params("asyncpg", CASES))
async def test_asyncpg(case: Any, apg_world: World) -> None:
    world = apg_world
    params = kit.param_values(case.sql, world.niks) if kit.has_params(case.sql) else []
    stateful = kit.stateful(case.sql)
    user_key = "proxied:" + kit.fixture_user(case.role, case.search_path)
    conn = await _apg(world, user_key, _proxied_dsn(world, case), None)
    try:
        got = await kit.run_asyncpg(conn, case.sql, params)
    finally:
        _after(world, case)
        await _apg_release(world, user_key, stateful)
    raw = None
    if not case.expect.startswith("refuse"):
        direct = await _apg(world, _direct_key(case), _direct_dsn(world), case.search_path)
        try:
            raw = await kit.run_asyncpg(direct, case.sql, params)
        finally:
            _after(world, case)
            await _apg_release(world, _direct_key(case), stateful)
    _judge(case, got, raw)


# -- psycopg ---------------------------------------------------------------------------------


def _pc(world: World, key: str, dsn: str, search_path: tuple[str, ...] | None) -> Any:
    conn = world.psycopg_conns.get(key)
    if conn is None or conn.closed:
        conn = kit.pc_connect(dsn)
        if search_path is not None:
            conn.execute(f"SET search_path = {_path(search_path)}")
        world.psycopg_conns[key] = conn
    return conn


def _pc_release(world: World, key: str, stateful: bool) -> None:
    conn = world.psycopg_conns.get(key)
    if conn is None:
        return
    idle = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    if stateful or not idle:
        world.psycopg_conns.pop(key)
        conn.close()


@pytest.mark.parametrize("case", _params("psycopg", CASES))
def test_psycopg(case: Any, world: World) -> None:
    params = kit.param_values(case.sql, world.niks) if kit.has_params(case.sql) else []
    stateful = kit.stateful(case.sql)
    user_key = "proxied:" + kit.fixture_user(case.role, case.search_path)
    conn = _pc(world, user_key, _proxied_dsn(world, case), None)
    try:
        got = kit.run_psycopg(conn, case.sql, params)
    finally:
        _after(world, case)
        _pc_release(world, user_key, stateful)
    raw = None
    if not case.expect.startswith("refuse"):
        direct = _pc(world, _direct_key(case), _direct_dsn(world), case.search_path)
        try:
            raw = kit.run_psycopg(direct, case.sql, params)
        finally:
            _after(world, case)
            _pc_release(world, _direct_key(case), stateful)
    _judge(case, got, raw)


# -- psql ------------------------------------------------------------------------------------

_MASKED_TEXT = re.compile(r"^(?:.*\*.*|\d+000000(?:\.00)?|[0-9a-f]{32}|)$", re.DOTALL)


@pytest.mark.parametrize(
    "case", _params("psql", [c for c in PSQL_CASES if not kit.has_params(c.sql)])
)
def test_psql(case: Any, world: World) -> None:
    kind, sqlstate, masked = kit.expectation(case)
    where = f"{case.id} ({case.title})"
    user = kit.fixture_user(case.role, case.search_path)
    got = kit.run_psql(world.pg, world.topeng.host, world.topeng.port, user, kit.PASSWORD, case.sql)
    _after(world, case)
    if kind == "refuse":
        assert got.returncode != 0, f"{where}: {got.records}"
        assert got.sqlstate == sqlstate, f"{where}: {got.stderr}"
        assert got.message.startswith("topeng:"), f"{where}: {got.stderr}"
        return
    direct_sql = f"SET search_path = {_path(case.search_path)}; {case.sql}"
    raw = kit.run_psql(
        world.pg, world.pg.host, world.pg.port, world.pg.superuser,
        world.pg.superuser_password, direct_sql,
    )  # fmt: skip
    _after(world, case)
    limit = kit.ROW_LIMITS[case.role]
    if limit is not None and len(raw.records) > limit + 1 and raw.returncode == 0:
        assert got.sqlstate == "54000", f"{where}: {got.stderr}"
        assert got.message.startswith("topeng:"), f"{where}: {got.stderr}"
        return
    assert got.returncode == raw.returncode, f"{where}: {got.stderr} vs {raw.stderr}"
    if raw.returncode != 0:
        assert got.sqlstate == raw.sqlstate, f"{where}: {got.stderr} vs {raw.stderr}"
        return
    assert len(got.records) == len(raw.records), f"{where}: {got.records} vs {raw.records}"
    if kind == "allow":
        if not _VOLATILE.search(case.sql):
            assert got.records == raw.records, where
        return
    changed = 0
    for mine, theirs in zip(got.records, raw.records, strict=True):
        if mine == theirs:
            continue
        m_fields, r_fields = mine.split(kit.FS), theirs.split(kit.FS)
        assert len(m_fields) == len(r_fields), f"{where}: {mine!r} vs {theirs!r}"
        for m_value, r_value in zip(m_fields, r_fields, strict=True):
            if m_value != r_value:
                changed += 1
                assert _MASKED_TEXT.match(m_value), f"{where}: {r_value!r} -> {m_value!r}"
                if len(r_value) == 16 and r_value.isdigit():
                    assert len(m_value) == 16, f"{where}: {m_value!r}"
    if len(got.records) > 1 and not changed:
        # only an income already a multiple of a million comes back unchanged
        assert any(re.search(r"\d000000\.00", r) for r in raw.records), (
            f"{where}: nothing was masked: {got.records[:3]}"
        )


# -- bookkeeping -----------------------------------------------------------------------------


def test_case_counts() -> None:
    assert len(kit.CASES) >= 200
    assert len(SKIPPED) == len(kit.SKIP) <= 10, kit.SKIP
    assert len([c for c in PSQL_CASES if not kit.has_params(c.sql)]) >= 60


def test_rules_file_extends_bank_rules(tmp_path: Path) -> None:
    text = kit.extended_rules(tmp_path).read_text()
    for role in ("dba", "supervisor", "analyst", "auditor", "agent"):
        assert f"{role}:" in text
