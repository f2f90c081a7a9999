"""Aggregates that fold many rows into one value, through Topeng with the bank rules.

A one-row result must not carry more source rows than max_rows_per_query allows: string_agg,
array_agg, json_agg, ... over a table with labelled columns are refused (reason `aggregate`)
for roles with a row limit; ordinary aggregates and roles without row limits are unaffected.
"""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from harness import StartTopeng, TopengProcess
from psycopg import errors

from proxy.sampledata import DEMO_USERS

AGENT = "agent_citra"  # bank rules: agent, max_rows_per_query 50

NO_LIMIT_RULES = """
version: 1
roles:
  dba: {users: [postgres, "dba_*"], unrestricted: true}
  reporter: {users: ["agent_*"]}
default_role: reporter
labels:
  nik: ["*.*.nik"]
policies:
  "*":
    nik: {mask: partial, keep_first: 6}
"""

FOLDING = [
    "SELECT string_agg(full_name, ',') FROM bank.customers",
    "SELECT array_to_string(array_agg(full_name), ',') FROM bank.customers",
    "SELECT json_agg(city) FROM bank.customers",
    "SELECT jsonb_agg(full_name) FROM bank.customers WHERE id > 0",
    "SELECT json_object_agg(id, full_name) FROM bank.customers",
    "SELECT jsonb_object_agg(id, city) FROM bank.customers",
    "SELECT array_length(ARRAY(SELECT full_name FROM bank.customers), 1)",
    "SELECT string_agg(full_name, ',') FROM (SELECT full_name FROM bank.customers LIMIT 2000) s",
    "SELECT city, string_agg(full_name, ',') FROM bank.customers GROUP BY city",
    "SELECT string_agg(full_name, ',') OVER () FROM bank.customers LIMIT 1",
]


def connect(proxy: TopengProcess, user: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(proxy.dsn(user, DEMO_USERS[user]), autocommit=True)


@pytest.mark.parametrize("sql", FOLDING)
def test_folding_aggregates_are_refused(topeng: TopengProcess, sql: str) -> None:
    with connect(topeng, AGENT) as conn:
        with pytest.raises(errors.InsufficientPrivilege) as info:
            conn.execute(sql).fetchall()
        diag = info.value.diag
        assert diag.message_primary is not None and diag.message_primary.startswith("topeng:")
        assert "folds many rows" in diag.message_primary
        assert diag.message_hint is not None and "LIMIT" in diag.message_hint
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_ordinary_aggregates_and_unlabelled_tables_work(topeng: TopengProcess) -> None:
    with connect(topeng, AGENT) as conn:
        count, longest = conn.execute(
            "SELECT count(*), max(length(full_name)) FROM bank.customers"
        ).fetchone() or (None, None)
        assert count == 2000 and isinstance(longest, int)
        (products,) = conn.execute(
            "SELECT string_agg(DISTINCT product, ',') FROM bank.accounts"
        ).fetchone() or (None,)
        assert isinstance(products, str) and products


def test_the_row_limit_still_holds_for_the_rows_themselves(topeng: TopengProcess) -> None:
    with connect(topeng, AGENT) as conn:
        with pytest.raises(errors.ProgramLimitExceeded):
            conn.execute("SELECT full_name FROM bank.customers").fetchall()
        rows = conn.execute("SELECT full_name FROM bank.customers LIMIT 50").fetchall()
        assert len(rows) == 50


def test_roles_without_row_limits_may_fold(start_topeng: StartTopeng, tmp_path: Path) -> None:
    rules = tmp_path / "nolimit.yaml"
    rules.write_text(NO_LIMIT_RULES)
    proxy = start_topeng(rules=rules)
    with connect(proxy, AGENT) as conn:
        (names,) = conn.execute(
            "SELECT string_agg(full_name, ',') FROM bank.customers"
        ).fetchone() or (None,)
        assert isinstance(names, str) and names.count(",") == 1999
