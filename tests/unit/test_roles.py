"""Role resolution: order, globs, membership, the default role, and when membership matters."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.policy.roles import MembershipNeeded, needs_membership, resolve_role
from proxy.policy.rules import Rules, load_rules

BANK = Path(__file__).resolve().parents[2] / "rules" / "bank.yaml"


@pytest.fixture(scope="module")
def bank() -> Rules:
    return load_rules(BANK)


def rules_from(tmp_path: Path, roles: str, default: str = "agent") -> Rules:
    path = tmp_path / "rules.yaml"
    path.write_text(f"version: 1\nroles:\n{roles}\ndefault_role: {default}\n", encoding="utf-8")
    return load_rules(path)


@pytest.mark.parametrize(
    ("user", "memberships", "role", "how"),
    [
        ("postgres", frozenset(), "dba", "users"),
        ("dba_ani", frozenset(), "dba", "users"),
        ("spv_budi", frozenset({"supervisors"}), "supervisor", "users"),
        ("budi", frozenset({"supervisors"}), "supervisor", "member_of"),
        ("citra", frozenset({"agents"}), "agent", "member_of"),
        ("agent_citra", frozenset({"agents"}), "agent", "users"),
        ("ai_helper", frozenset(), "agent", "users"),
        ("stranger", frozenset(), "agent", "default"),
        ("Postgres", frozenset(), "agent", "default"),  # user names are case-sensitive
    ],
)
def test_demo_users(
    bank: Rules, user: str, memberships: frozenset[str] | None, role: str, how: str
) -> None:
    match = resolve_role(bank, user, memberships)
    assert (match.role.name, match.how) == (role, how)


def test_reasons_say_why(bank: Rules) -> None:
    assert resolve_role(bank, "agent_x", frozenset()).reason == (
        "user 'agent_x' matches users glob 'agent_*' of role 'agent'"
    )
    assert resolve_role(bank, "postgres", None).reason == (
        "user 'postgres' is listed in users of role 'dba'"
    )
    member = resolve_role(bank, "citra", frozenset({"agents"}))
    assert "member of PostgreSQL role 'agents'" in member.reason
    assert member.matched == "agents"
    assert resolve_role(bank, "x", frozenset()).reason == (
        "no role matched user 'x': default_role 'agent'"
    )


def test_first_match_in_written_order_wins(tmp_path: Path) -> None:
    rules = rules_from(
        tmp_path,
        '  agent: {users: ["a*"]}\n  admin: {users: ["admin"], unrestricted: true}\n',
    )
    assert resolve_role(rules, "admin", None).role.name == "agent"


def test_membership_of_an_earlier_role_beats_a_later_glob(tmp_path: Path) -> None:
    rules = rules_from(
        tmp_path,
        '  agent: {member_of: [agents]}\n  spv: {users: ["spv_*"]}\n',
    )
    assert resolve_role(rules, "spv_x", frozenset({"agents"})).role.name == "agent"
    assert resolve_role(rules, "spv_x", frozenset({"other"})).role.name == "spv"


def test_missing_memberships_are_never_guessed(tmp_path: Path) -> None:
    rules = rules_from(tmp_path, '  agent: {member_of: [agents]}\n  spv: {users: ["spv_*"]}\n')
    with pytest.raises(MembershipNeeded):
        resolve_role(rules, "spv_x", None)


def test_needs_membership_follows_order(bank: Rules, tmp_path: Path) -> None:
    # bank: dba (globs only), supervisor (glob + member_of), agent (glob + member_of)
    assert needs_membership(bank, "postgres") is False
    assert needs_membership(bank, "spv_budi") is False  # its own glob decides first
    assert needs_membership(bank, "agent_citra") is True  # supervisor's member_of comes first
    assert needs_membership(bank, "citra") is True
    only_globs = rules_from(tmp_path, '  agent: {users: ["agent_*"]}\n')
    assert needs_membership(only_globs, "anyone") is False


def test_needs_membership_false_means_none_is_accepted(bank: Rules) -> None:
    for user in ("postgres", "dba_x", "spv_x"):
        assert not needs_membership(bank, user)
        resolve_role(bank, user, None)  # does not raise


def test_glob_character_classes_and_question_mark(tmp_path: Path) -> None:
    rules = rules_from(tmp_path, '  etl: {users: ["etl_[ab]?"]}\n  agent: {users: ["agent_*"]}\n')
    assert resolve_role(rules, "etl_a1", None).role.name == "etl"
    assert resolve_role(rules, "etl_c1", None).role.name == "agent"
    assert resolve_role(rules, "etl_a12", None).how == "default"
