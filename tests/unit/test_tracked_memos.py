"""What a restricted session remembers between statements, and when it must not: the verdict on a
result's RowDescription, the decisions of a repeated statement, the facts an Execute is charged
by. Each test runs the real RestrictedPolicy over the bank catalog of the policy fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_policy_fixtures import SEARCH_PATH, TEST_RULES, bank_catalog
from wirekit import (
    SYNC,
    Playbook,
    bind,
    complete,
    data_row,
    describe_portal,
    execute,
    join,
    parse,
    query,
    ready,
    ready_session,
    split_messages,
)

from proxy.policy.cache import AnalysisCache
from proxy.policy.decision import ALLOW, Mask, Refuse
from proxy.policy.engine import RestrictedPolicy
from proxy.policy.limits import Limiter, MemoryStore
from proxy.policy.rules import Rules, load_rules
from proxy.wire import messages as m

CATALOG = bank_catalog()
CUSTOMERS = 16400  # bank.customers: id(1) full_name(2) nik(3) ...
INT8, VARCHAR = 20, 1043

# The test rules, plus a label on full_name that every restricted role sees redacted.
NAMED_RULES = TEST_RULES.replace(
    '  email: ["*.*.email"]\n', '  email: ["*.*.email"]\n  name: ["*.*.full_name"]\n'
).replace(
    "    email: {mask: email}\n  supervisor:",
    "    email: {mask: email}\n    name: {mask: redact}\n  supervisor:",
)
RATED_RULES = TEST_RULES.replace(
    "    max_rows_per_query: 50\n", "    max_rows_per_query: 50\n    max_queries_per_minute: 2\n"
)


def _load(tmp_path: Path, name: str, text: str) -> Rules:
    path = tmp_path / name
    path.write_text(text)
    return load_rules(path)


class Source:
    """The rules in force, as the server's store hands them out; tests swap them."""

    def __init__(self, rules: Rules) -> None:
        self.rules = rules

    def __call__(self) -> Rules:
        return self.rules


def _policy(source: Source, limiter: Limiter | None = None) -> RestrictedPolicy:
    return RestrictedPolicy(
        source.rules,
        source.rules.role("agent"),
        CATALOG,
        SEARCH_PATH,
        cache=AnalysisCache(),
        hash_key=b"k" * 32,
        limiter=limiter,
        rules_source=source,
    )


def _desc(*columns: tuple[str, int, int]) -> bytes:
    """A RowDescription of bank.customers columns: (name, attnum, type oid)."""
    return m.RowDescription(
        tuple(m.FieldDescription(n, CUSTOMERS, a, t, -1, -1, 0) for n, a, t in columns)
    ).encode()


def _is_error(data: bytes, sqlstate: str) -> bool:
    """An ErrorResponse with this SQLSTATE is among the messages."""
    return any(msg[:1] == b"E" and f"C{sqlstate}\0".encode() in msg for msg in split_messages(data))


def test_a_remembered_row_description_verdict_does_not_pass_a_different_description(
    tmp_path: Path,
) -> None:
    pb = ready_session(_policy(Source(_load(tmp_path, "r.yaml", TEST_RULES))))
    right = _desc(("id", 1, INT8))
    sql = "SELECT id FROM bank.customers WHERE id = {}"
    reply = join(right, data_row("7"), complete("SELECT 1"), ready())
    for n in (1, 2):
        assert pb.to_server(query(sql.format(n))) == query(sql.format(n))
        assert pb.to_client(reply) == reply
    # The same statement shape, but the server says the column is the NIK: the verdict on the
    # first description must not carry over; the result is refused and its row never sent.
    assert pb.to_server(query(sql.format(3))) == query(sql.format(3))
    wrong = join(_desc(("id", 3, INT8)), data_row("3273014501900001"), complete("SELECT 1"))
    out = pb.server(wrong, ready())
    assert b"3273014501900001" not in out.to_client
    assert _is_error(out.to_client, "0A000")
    assert b"does not match the analysis" in out.to_client
    assert pb.session.cancel_requested
    # And the right description passes again afterwards.
    assert pb.to_server(query(sql.format(4))) == query(sql.format(4))
    assert pb.to_client(reply) == reply


def test_a_remembered_pass_is_forgotten_when_the_rules_change(tmp_path: Path) -> None:
    source = Source(_load(tmp_path, "r.yaml", TEST_RULES))
    policy = _policy(source)
    desc = m.RowDescription.decode(_desc(("full_name", 2, VARCHAR))[5:])
    assert policy.plan_rows(ALLOW, desc, (0,)) is None
    assert policy.plan_rows(ALLOW, desc, (0,)) is None  # remembered
    source.rules = _load(tmp_path, "named.yaml", NAMED_RULES)
    assert not isinstance(policy.judge_query("SELECT 1"), Refuse)  # the policy follows the reload
    # The same description and the same (singleton) decision: now full_name is labelled and the
    # decision does not mask it, so the result is refused.
    refused = policy.plan_rows(ALLOW, desc, (0,))
    assert isinstance(refused, Refuse) and refused.sqlstate == "0A000"
    assert "labelled name" in (refused.detail or "")


def _prepared_round(pb: Playbook, *, first: bool) -> bytes:
    sql = "SELECT id, full_name FROM bank.customers WHERE id = $1"
    sent = join(
        parse(sql, "s1") if first else b"",
        bind("", "s1", (b"7",)),
        describe_portal(""),
        execute(""),
        SYNC,
    )
    assert pb.to_server(sent) == sent
    reply = join(
        m.frame(b"1", b"") if first else b"",
        m.frame(b"2", b""),
        _desc(("id", 1, INT8), ("full_name", 2, VARCHAR)),
        data_row("7", "Siti Rahayu"),
        complete("SELECT 1"),
        ready(),
    )
    return pb.to_client(reply)


def test_a_rules_reload_changes_the_decision_of_a_prepared_statement(tmp_path: Path) -> None:
    source = Source(_load(tmp_path, "r.yaml", TEST_RULES))
    policy = _policy(source)
    pb = ready_session(policy)
    assert b"Siti Rahayu" in _prepared_round(pb, first=True)
    assert b"Siti Rahayu" in _prepared_round(pb, first=False)
    source.rules = _load(tmp_path, "named.yaml", NAMED_RULES)
    out = _prepared_round(pb, first=False)
    assert b"Siti Rahayu" not in out  # judged again: full_name is now masked
    assert b"D" in out and not _is_error(out, "0A000")
    records = [r for r in pb.session.records if r.sql]
    assert [r.decision for r in records[-3:]] == ["allowed", "allowed", "masked"]
    assert records[-1].labels == ("name",)


def test_each_execute_of_a_prepared_statement_is_charged(tmp_path: Path) -> None:
    policy = _policy(Source(_load(tmp_path, "r.yaml", RATED_RULES)), Limiter(MemoryStore()))
    sql = "SELECT id, full_name FROM bank.customers WHERE id = $1"
    decision = policy.judge_parse(sql, ())
    assert not isinstance(decision, Refuse)
    generation = policy.generation
    for _ in range(2):
        verdict, generation = policy.judge_execute(sql, generation)
        assert verdict is None
    verdict, _ = policy.judge_execute(sql, generation)
    assert isinstance(verdict, Refuse) and verdict.reason == "rate_limit"


@pytest.mark.parametrize("masked", [False, True])
def test_a_repeated_statement_gets_the_same_decisions(tmp_path: Path, masked: bool) -> None:
    policy = _policy(Source(_load(tmp_path, "r.yaml", TEST_RULES)))
    column = "nik" if masked else "full_name"
    first = policy.judge_query(f"SELECT id, {column} FROM bank.customers WHERE id = 1")
    again = policy.judge_query(f"SELECT id, {column} FROM bank.customers WHERE id = 2")
    assert first == again and isinstance(first, tuple)
    assert isinstance(first[0], Mask) == masked
