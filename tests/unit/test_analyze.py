"""Unit tests of the analysis passes (no rules, no roles): facts only."""

from __future__ import annotations

import pytest
from test_policy_fixtures import SEARCH_PATH, bank_catalog

from proxy.policy.analyze import AnalysisError, ColumnUse, StatementFacts, analyze
from proxy.policy.cache import AnalysisCache

CUSTOMERS = 16400
NIK = (CUSTOMERS, 3)
ID = (CUSTOMERS, 1)
CATALOG = bank_catalog()


def one(sql: str, search_path: tuple[str, ...] = SEARCH_PATH) -> StatementFacts:
    (facts,) = analyze(sql, CATALOG, search_path)
    return facts


def test_plain_copy_through_alias_subquery_and_cte() -> None:
    facts = one("WITH x AS (SELECT nik AS a FROM bank.customers) SELECT s.a AS b FROM x s")
    assert facts.unsupported is None
    assert facts.outputs is not None
    (out,) = facts.outputs
    assert (out.name, out.sources, out.plain_copy) == ("b", frozenset({NIK}), True)


def test_expression_is_not_a_plain_copy() -> None:
    out = one("SELECT upper(nik) FROM bank.customers").outputs
    assert out is not None and out[0].plain_copy is False and out[0].sources == {NIK}


def test_count_is_marked() -> None:
    out = one("SELECT count(nik) FROM bank.customers").outputs
    assert out is not None and out[0].is_count


def test_lookup_forms() -> None:
    facts = one("SELECT id FROM bank.customers WHERE nik = $1 AND city LIKE 'B%'")
    assert ColumnUse(NIK, "where", "equality") in facts.uses
    assert ColumnUse((CUSTOMERS, 12), "where", "expression") in facts.uses
    facts = one("SELECT id FROM bank.customers WHERE nik IN ('1', '2') OR nik IS NULL")
    assert {u.form for u in facts.uses if u.column == NIK and u.clause == "where"} == {"equality"}
    facts = one("SELECT id FROM bank.customers WHERE nik LIKE '1%'")
    assert ColumnUse(NIK, "where", "expression") in facts.uses


def test_union_of_two_plain_columns_is_plain_with_both_sources() -> None:
    out = one("SELECT nik FROM bank.customers UNION SELECT no_kk FROM bank.customers").outputs
    assert out is not None and out[0].plain_copy and out[0].sources == {NIK, (CUSTOMERS, 4)}


def test_recursive_cte_lineage_reaches_a_fixpoint() -> None:
    sql = (
        "WITH RECURSIVE r(a, b, n) AS (SELECT nik, full_name, 1 FROM bank.customers "
        "UNION ALL SELECT b, a, n + 1 FROM r WHERE n < 3) SELECT a FROM r"
    )
    out = one(sql).outputs
    assert out is not None and out[0].sources == {NIK, (CUSTOMERS, 2)}


def test_views_expand_to_base_columns() -> None:
    facts = one("SELECT nik FROM bank.directory_lite")
    assert facts.outputs is not None and facts.outputs[0].sources == {NIK}
    assert {16455, 16450, CUSTOMERS} <= facts.relations


def test_whole_row_and_star() -> None:
    facts = one("SELECT row_to_json(c) FROM bank.customers c")
    assert facts.whole_row_relations == {CUSTOMERS}
    assert one("SELECT * FROM bank.customers").star_relations == {CUSTOMERS}


def test_search_path_and_case_folding() -> None:
    facts = one("SELECT NIK FROM Customers", ("bank",))
    assert facts.outputs is not None and facts.outputs[0].sources == {NIK}
    assert one("SELECT nik FROM customers").unknown_relations == ("customers",)


def test_u_and_escapes_and_comments() -> None:
    facts = one('SELECT U&"\\006Eik" /* a /* nested */ comment */ FROM bank.customers')
    assert facts.outputs is not None and facts.outputs[0].sources == {NIK}


def test_positional_refs() -> None:
    assert one("SELECT id, nik FROM bank.customers ORDER BY 2").positional_refs
    assert not one("SELECT id FROM bank.customers ORDER BY id").positional_refs
    facts = one("SELECT id, nik FROM bank.customers ORDER BY 2")
    assert ColumnUse(NIK, "order", "plain") in facts.uses


def test_statement_kinds() -> None:
    sql = "BEGIN; SET x = 1; SHOW y; EXPLAIN SELECT 1; DECLARE c CURSOR FOR SELECT 1; LISTEN z"
    kinds = [f.kind for f in analyze(sql, CATALOG, SEARCH_PATH)]
    assert kinds == ["transaction", "set", "show", "explain", "cursor", "listen"]


def test_set_facts() -> None:
    facts = one("SET LOCAL search_path TO a, b")
    assert facts.setting is not None
    assert (facts.setting.name, facts.setting.value, facts.setting.local) == (
        "search_path",
        "a, b",
        True,
    )


def test_syntax_error_raises() -> None:
    with pytest.raises(AnalysisError):
        analyze("SELEC 1", CATALOG, SEARCH_PATH)


def test_unmodelled_is_unsupported() -> None:
    assert one("SELECT nosuch FROM bank.customers").unsupported is not None


def test_cache_hits_by_fingerprint_but_not_for_positional_or_utility() -> None:
    cache = AnalysisCache(size=8)
    cache.analyze("SELECT nik FROM bank.customers WHERE id = 1", CATALOG, SEARCH_PATH)
    cache.analyze("SELECT nik FROM bank.customers WHERE id = 2", CATALOG, SEARCH_PATH)
    assert (cache.hits, cache.misses) == (1, 1)
    first = cache.analyze("SELECT id, nik FROM bank.customers ORDER BY 1", CATALOG, SEARCH_PATH)
    second = cache.analyze("SELECT id, nik FROM bank.customers ORDER BY 2", CATALOG, SEARCH_PATH)
    assert first != second and cache.misses == 3
    cache.analyze("SET search_path = a", CATALOG, SEARCH_PATH)
    facts = cache.analyze("SET search_path = b", CATALOG, SEARCH_PATH)
    assert facts[0].setting is not None and facts[0].setting.value == "b"


def test_cache_is_bounded() -> None:
    cache = AnalysisCache(size=2)
    for i in range(5):
        cache.analyze(f"SELECT {'id, ' * i}id FROM bank.customers", CATALOG, SEARCH_PATH)
    assert len(cache) <= 2
