"""Unit tests of decide: messages, hints, reasons and the prepared/cursor plumbing."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_policy_fixtures import SEARCH_PATH, bank_catalog, load_test_rules

from proxy.policy.analyze import analyze
from proxy.policy.decide import judge_sql, judge_statement, remember
from proxy.policy.decision import ALLOW, Decision, Mask, Refuse
from proxy.policy.rules import Rules

CATALOG = bank_catalog()


@pytest.fixture(scope="module")
def rules(tmp_path_factory: pytest.TempPathFactory) -> Rules:
    return load_test_rules(Path(tmp_path_factory.mktemp("rules")))


def judge(sql: str, rules: Rules, role: str = "agent") -> object:
    return judge_sql(sql, CATALOG, SEARCH_PATH, rules, rules.role(role))


def test_denied_column_message_names_the_rule(rules: Rules) -> None:
    result = judge("SELECT nama_ibu_kandung FROM bank.customers", rules)
    assert isinstance(result, Refuse)
    assert result.message == (
        "topeng: column bank.customers.nama_ibu_kandung (label mother_maiden_name) is denied "
        "for role agent"
    )
    assert result.reason == "denied_column" and result.sqlstate == "42501"


def test_star_hint_lists_selectable_columns(rules: Rules) -> None:
    result = judge("SELECT * FROM bank.customers", rules)
    assert isinstance(result, Refuse) and result.hint is not None
    assert "nama_ibu_kandung" not in result.hint.split(":")[-1]
    assert "full_name" in result.hint and "nik" in result.hint


def test_expression_hint(rules: Rules) -> None:
    result = judge("SELECT upper(nik) FROM bank.customers", rules)
    assert isinstance(result, Refuse) and result.reason == "masked_expression"
    assert result.hint is not None and "select the column itself" in result.hint


def test_search_path_hint(rules: Rules) -> None:
    result = judge("SET search_path = bank", rules)
    assert isinstance(result, Refuse) and result.hint is not None
    assert "qualify table names" in result.hint


def test_mask_positions(rules: Rules) -> None:
    result = judge("SELECT id, nik, city, no_hp FROM bank.customers WHERE id = 1", rules)
    assert isinstance(result, tuple) and isinstance(result[0], Mask)
    assert sorted(result[0].columns) == [1, 3]
    assert result[0].columns[3].label == "phone"


def test_multi_statement_refusal_says_which(rules: Rules) -> None:
    result = judge("SELECT 1; SELECT nama_ibu_kandung FROM bank.customers", rules)
    assert isinstance(result, Refuse) and result.detail is not None
    assert result.detail.startswith("statement 2 of 2")


def test_execute_and_fetch_use_the_callers_maps(rules: Rules) -> None:
    role = rules.role("analyst")
    (execute,) = analyze("EXECUTE p(1)", CATALOG, SEARCH_PATH)
    (fetch,) = analyze("FETCH 5 FROM c", CATALOG, SEARCH_PATH)
    mask = Mask({})
    assert judge_statement(execute, rules, role, prepared={"p": mask}) is mask
    assert judge_statement(fetch, rules, role, cursors={"c": ALLOW}) is ALLOW
    refused = judge_statement(fetch, rules, role)
    assert isinstance(refused, Refuse) and refused.sqlstate == "0A000"


def test_deallocate_forgets_what_it_drops(rules: Rules) -> None:
    prepared: dict[str, Decision] = {"p": ALLOW, "q": Mask({})}
    (one,) = analyze("DEALLOCATE p", CATALOG, SEARCH_PATH)
    remember(one, ALLOW, prepared, {})
    assert list(prepared) == ["q"]
    (every,) = analyze("DEALLOCATE ALL", CATALOG, SEARCH_PATH)
    remember(every, ALLOW, prepared, {})
    assert prepared == {}


def test_unrestricted_role_is_allowed_anything(rules: Rules) -> None:
    (facts,) = analyze("DROP TABLE bank.customers", CATALOG, SEARCH_PATH)
    assert judge_statement(facts, rules, rules.role("dba")) == ALLOW


def test_every_refusal_starts_with_topeng(rules: Rules) -> None:
    for sql in ("DELETE FROM bank.accounts", "SET ROLE x", "SELECT pg_sleep(1)", "SELEC"):
        result = judge(sql, rules)
        assert isinstance(result, Refuse) and result.message.startswith("topeng: ")
        assert result.hint
