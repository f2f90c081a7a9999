"""set_config for restricted roles: allowed only for constant arguments naming an allowed setting.

asyncpg runs `SELECT current_setting('jit') AS cur, set_config('jit', 'off', false) AS new`
before introspecting a type it has no codec for, and `SELECT set_config('jit', $1, false)` after.
Everything else set_config could do stays refused, with the message it always had.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_policy_fixtures import SEARCH_PATH, bank_catalog, load_test_rules

from proxy.policy.analyze import analyze
from proxy.policy.cache import AnalysisCache
from proxy.policy.decide import ALLOWED_SETTINGS, judge_sql
from proxy.policy.decision import ALLOW, Decision, Mask, Refuse
from proxy.policy.functions import SET_CONFIG_SETTINGS
from proxy.policy.rules import Rules

CATALOG = bank_catalog()

ASYNCPG_JIT_OFF = """
    SELECT
        current_setting('jit') AS cur,
        set_config('jit', 'off', false) AS new
"""
ASYNCPG_JIT_RESTORE = """
    SELECT
        set_config('jit', $1, false)
"""


@pytest.fixture(scope="module")
def rules(tmp_path_factory: pytest.TempPathFactory) -> Rules:
    return load_test_rules(Path(tmp_path_factory.mktemp("rules")))


def judge(
    sql: str, rules: Rules, role: str = "agent", cache: AnalysisCache | None = None
) -> Decision | tuple[Decision, ...]:
    return judge_sql(sql, CATALOG, SEARCH_PATH, rules, rules.role(role), cache=cache)


def assert_set_config_refused(result: object) -> Refuse:
    assert isinstance(result, Refuse), result
    assert result.sqlstate == "42501" and result.reason == "function"
    assert result.message == "topeng: function set_config is not permitted for role agent"
    assert result.hint is not None and "SET" in result.hint
    return result


def test_the_allow_list_is_short_and_settable() -> None:
    assert SET_CONFIG_SETTINGS == frozenset({"jit"})
    assert SET_CONFIG_SETTINGS <= ALLOWED_SETTINGS  # what set_config may change, SET may too


@pytest.mark.parametrize(
    "sql",
    [
        ASYNCPG_JIT_OFF,
        ASYNCPG_JIT_RESTORE,
        "SELECT set_config('jit', 'on', true)",
        "SELECT set_config('JIT', 'off', false)",  # PostgreSQL compares names case-insensitively
        "SELECT pg_catalog.set_config('jit'::text, 'off'::text, 'f'::boolean)",
        "SELECT set_config('jit', $1, $2)",
        "SELECT 1 FROM bank.customers WHERE id = 1 AND set_config('jit', 'off', true) = 'off'",
        "SET jit = off",
        "SET LOCAL jit TO on",
    ],
)
def test_jit_may_be_changed(rules: Rules, sql: str) -> None:
    assert judge(sql, rules) == (ALLOW,)


@pytest.mark.parametrize(
    "name",
    [
        "search_path",  # what names mean
        "role",  # who runs the query
        "session_authorization",
        "standard_conforming_strings",  # how string constants are read
        "client_encoding",  # how values are written, between the rows of one result
        "DateStyle",
        "IntervalStyle",
        "TimeZone",
        "bytea_output",
        "extra_float_digits",
        "application_name",  # a channel to other sessions
        "statement_timeout",  # SET has it
        "jit_above_cost",
        "myapp.tenant",  # custom settings
    ],
)
def test_other_settings_are_refused(rules: Rules, name: str) -> None:
    result = assert_set_config_refused(judge(f"SELECT set_config('{name}', 'x', false)", rules))
    assert result.detail is not None
    assert f"would change {name.lower()} behind Topeng's back" in result.detail
    assert "set_config may change only: jit" in result.detail


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT set_config($1, 'off', false)",  # the name from the client at Bind
        "SELECT set_config(current_user, 'off', false)",
        "SELECT set_config('ji' || 't', 'off', false)",
        "SELECT set_config(concat('j', 'it'), 'off', false)",
        "SELECT set_config(NULL, 'off', false)",
        "SELECT set_config((SELECT 'jit'), 'off', false)",
        "SELECT set_config(city, 'off', false) FROM bank.customers WHERE id = 1",
        "SELECT set_config('jit'::regclass::text, 'off', false)",
        # the value or the flag not a constant either
        "SELECT set_config('jit', upper('off'), false)",
        "SELECT set_config('jit', city, false) FROM bank.customers WHERE id = 1",
        "SELECT set_config('jit', 'off', id = 1) FROM bank.customers WHERE id = 1",
        "SELECT set_config('jit', (SELECT full_name FROM bank.customers LIMIT 1), false)",
        "SELECT set_config('jit', 'off'::bank.some_type, false)",
        # a shape other than three positional arguments
        "SELECT set_config(setting_name => 'jit', new_value => 'off', is_local => false)",
        "SELECT set_config('jit', 'off')",
        "SELECT set_config(VARIADIC ARRAY['jit', 'off', 'false'])",
    ],
)
def test_non_constant_arguments_are_refused(rules: Rules, sql: str) -> None:
    result = assert_set_config_refused(judge(sql, rules))
    assert result.detail is not None and "only with constant arguments" in result.detail


def test_every_call_counts(rules: Rules) -> None:
    """One allowed call does not vouch for another one in the same statement."""
    for sql in (
        "SELECT set_config('jit', 'off', false), set_config('search_path', 'bank', false)",
        "SELECT set_config('jit', 'off', false) "
        "FROM (SELECT set_config('role', 'postgres', false)) AS s",
        "WITH s AS (SELECT set_config('search_path', 'bank', true)) "
        "SELECT set_config('jit', 'off', true) FROM s",
        "SELECT id FROM bank.customers WHERE id = 1 "
        "AND set_config('search_path', 'bank', true) IS NOT NULL",
        "SELECT set_config('jit', 'off', false); SELECT set_config('search_path', '', false)",
    ):
        assert_set_config_refused(judge(sql, rules))


def test_other_schemas_set_config_is_refused(rules: Rules) -> None:
    result = judge("SELECT bank.set_config('jit', 'off', false)", rules)
    assert isinstance(result, Refuse) and result.reason == "function"
    assert result.detail == "bank.set_config is not a built-in function of pg_catalog"


def test_masking_still_applies_next_to_set_config(rules: Rules) -> None:
    result = judge(
        "SELECT id, nik, set_config('jit', 'off', false) AS jit FROM bank.customers WHERE id = 1",
        rules,
    )
    assert isinstance(result, tuple) and isinstance(result[0], Mask)
    assert sorted(result[0].columns) == [1]
    assert result[0].columns[1].label == "nik"


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        (
            "SELECT nama_ibu_kandung, set_config('jit', 'off', false) "
            "FROM bank.customers WHERE id = 1",
            "denied_column",
        ),
        (
            "SELECT upper(nik), set_config('jit', 'off', false) FROM bank.customers WHERE id = 1",
            "masked_expression",
        ),
        ("SELECT set_config('jit', nik, false) FROM bank.customers WHERE id = 1", "function"),
        (
            "SELECT set_config('jit', 'off', false) FROM bank.customers "
            "WHERE nama_ibu_kandung = 'Siti'",
            "denied_column",
        ),
    ],
)
def test_protected_columns_are_still_judged(rules: Rules, sql: str, reason: str) -> None:
    result = judge(sql, rules)
    assert isinstance(result, Refuse), result
    assert result.reason == reason


def test_the_cache_does_not_share_set_config_across_names(rules: Rules) -> None:
    """`set_config('jit', ...)` and `set_config('search_path', ...)` differ only in a constant:
    the cache of analyses by normalized text must not hand the second the first's facts."""
    cache = AnalysisCache()
    allowed = "SELECT set_config('jit', 'off', false)"
    refused = "SELECT set_config('search_path', 'bank', false)"
    assert judge(allowed, rules, cache=cache) == (ALLOW,)
    assert judge(allowed, rules, cache=cache) == (ALLOW,)
    assert_set_config_refused(judge(refused, rules, cache=cache))
    assert judge(allowed, rules, cache=cache) == (ALLOW,)


def test_facts_record_each_call() -> None:
    (facts,) = analyze(
        "SELECT set_config('JIT', 'off', false), set_config(current_user, 'x', true), "
        "pg_catalog.set_config('search_path', '', true)",
        CATALOG,
        SEARCH_PATH,
    )
    assert facts.config_settings == frozenset({"jit", None, "search_path"})
    (facts,) = analyze("SELECT current_setting('jit')", CATALOG, SEARCH_PATH)
    assert facts.config_settings == frozenset()


def test_object_identifier_arrays_are_analysed(rules: Rules) -> None:
    """asyncpg's introspection query filters `oid = any($1::oid[])`; sqlglot cannot read an
    array of oid, so the analysis reads it as `pg_catalog.oid[]`."""
    for sql in (
        "SELECT n.oid, n.nspname FROM pg_catalog.pg_namespace n WHERE n.oid = any($1::oid[])",
        "SELECT n.nspname FROM pg_catalog.pg_namespace n WHERE n.oid = any('{1}'::regnamespace[])",
        "SELECT id, nik FROM bank.customers WHERE id = any($1::oid[])",
    ):
        (facts,) = analyze(sql, CATALOG, SEARCH_PATH)
        assert facts.unsupported is None, facts.unsupported
    assert judge(
        "SELECT n.oid, n.nspname FROM pg_catalog.pg_namespace n WHERE n.oid = any($1::oid[])",
        rules,
    ) == (ALLOW,)
    masked = judge("SELECT id, nik FROM bank.customers WHERE id = any($1::oid[])", rules)
    assert isinstance(masked, tuple) and isinstance(masked[0], Mask)
    assert sorted(masked[0].columns) == [1]
