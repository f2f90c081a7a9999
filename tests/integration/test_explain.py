"""`topeng explain` against the test bank: the role and why, the decision, lineage and masks.

Each case runs `python -m proxy explain` as a user runs it, with the superuser DSN of the `pg`
fixture (memberships and search_path are looked up for the user named by --user).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from harness import BANK_RULES, REPO_ROOT, PgServer

NIK_LOOKUP = "SELECT id, nik, full_name FROM customers WHERE nik = '3273010101900001'"

DOCUMENTED_TOP_KEYS = {
    "format",
    "user",
    "role",
    "database",
    "search_path",
    "search_path_source",
    "catalog",
    "notes",
    "decision",
    "statements",
}
DOCUMENTED_ROLE_KEYS = {
    "name",
    "unrestricted",
    "how",
    "matched",
    "reason",
    "membership",
    "memberships",
    "limits",
}
DOCUMENTED_STATEMENT_KEYS = {
    "text",
    "kind",
    "node",
    "decision",
    "relations",
    "unknown_relations",
    "outputs",
    "predicates",
    "functions",
    "operators",
    "unsupported",
    "inner",
}
DOCUMENTED_OUTPUT_KEYS = {"position", "name", "form", "sources", "result", "mask"}


def explain(
    user: str, sql: str, *, dsn: str | None, rules: Path | str = BANK_RULES, as_json: bool = False
) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "-m", "proxy", "explain", "--rules", str(rules), "--user", user]
    if dsn is not None:
        args += ["--dsn", dsn]
    if as_json:
        args.append("--json")
    args.append(sql)
    return subprocess.run(
        args, capture_output=True, text=True, cwd=REPO_ROOT, timeout=120, check=False
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_agent_citra_nik_is_masked(pg: PgServer) -> None:
    out = ok(explain("agent_citra", NIK_LOOKUP, dsn=pg.superuser_dsn))
    assert "role:        agent (restricted)" in out
    assert "user 'agent_citra' matches users glob 'agent_*' of role 'agent'" in out
    assert "member of: agents" in out
    assert "at most 50 rows a query" in out
    assert "search_path: pg_catalog, bank, public" in out
    assert "decision: mask column 2 (nik: partial)" in out
    assert "2. nik <- bank.customers.nik (copy)" in out
    assert "bank.customers.nik: label nik, mask partial(keep_first=6, keep_last=0" in out
    assert "-> masked with partial(keep_first=6, keep_last=0, char='*') for label nik" in out
    assert "1. id <- bank.customers.id (copy)" in out
    assert "bank.customers.nik in WHERE (equality): label nik" in out


def test_agent_citra_refused_mother_maiden_name(pg: PgServer) -> None:
    out = ok(explain("agent_citra", "SELECT nama_ibu_kandung FROM customers", dsn=pg.superuser_dsn))
    assert "decision: refuse (SQLSTATE 42501)" in out
    assert "denied for role agent" in out
    assert "hint:" in out
    assert "label mother_maiden_name, deny" in out
    assert "-> not returned: the statement is refused" in out


def test_ai_helper_expression_over_masked_column_refused(pg: PgServer) -> None:
    out = ok(
        explain(
            "ai_helper",
            "SELECT upper(email) AS e, count(nik) FROM customers GROUP BY 1",
            dsn=pg.superuser_dsn,
        )
    )
    assert "role:        agent (restricted)" in out
    assert "glob 'ai_*'" in out
    assert "member of: none" in out
    assert "decision: refuse (SQLSTATE 42501)" in out
    assert "1. e <- bank.customers.email (expression)" in out
    assert "label email, mask email" in out
    assert "(count)" in out
    assert "functions: count, upper" in out


def test_spv_budi_sees_income_and_hash(pg: PgServer) -> None:
    out = ok(
        explain(
            "spv_budi",
            "SELECT c.penghasilan, c.nama_ibu_kandung, a.balance FROM customers c "
            "JOIN accounts a ON a.customer_id = c.id WHERE c.id = 7",
            dsn=pg.superuser_dsn,
        )
    )
    assert "role:        supervisor (restricted)" in out
    assert "not looked up (the user name decides)" in out
    assert "decision: mask column 2 (mother_maiden_name: hash)" in out
    assert "1. penghasilan <- bank.customers.penghasilan (copy)" in out
    assert "bank.customers.penghasilan: label income, allow" in out
    assert "-> masked with hash for label mother_maiden_name" in out
    assert "relations: bank.accounts (table), bank.customers (table)" in out
    assert "bank.accounts.customer_id in JOIN ... ON (expression)" in out


def test_dba_ani_is_unrestricted(pg: PgServer) -> None:
    out = ok(
        explain("dba_ani", "SELECT nik, nama_ibu_kandung FROM customers", dsn=pg.superuser_dsn)
    )
    assert "role:        dba (unrestricted)" in out
    assert "nothing is analysed, limited or masked" in out
    assert "decision: allow" in out
    assert "statement 1 of 1: select (SelectStmt)" in out
    assert "<-" not in out  # nothing is traced for an unrestricted role


def test_unknown_user_gets_the_default_role(pg: PgServer) -> None:
    out = ok(explain("walk_in_visitor", NIK_LOOKUP, dsn=pg.superuser_dsn))
    assert "role:        agent (restricted)" in out
    assert "no role matched user 'walk_in_visitor': default_role 'agent'" in out
    assert "user walk_in_visitor does not exist in the database" in out
    assert "the --dsn session's own current_schemas(true)" in out
    assert "-> masked with partial(keep_first=6" in out


def test_membership_is_looked_up_for_the_named_user(pg: PgServer) -> None:
    # alice (a harness user) matches no glob; the supervisor and agent roles need membership
    out = ok(explain("alice", "SELECT 1", dsn=pg.superuser_dsn))
    assert "no role matched user 'alice': default_role 'agent'" in out
    (members,) = [line for line in out.splitlines() if line.startswith("  member of:")]
    assert "pg_read_all_data" in members.split(", ") or "pg_read_all_data" in members
    assert "decision: allow" in out


def test_membership_decides_the_role(pg: PgServer) -> None:
    pg.execute(
        "DROP ROLE IF EXISTS ex_member; CREATE ROLE ex_member LOGIN; GRANT agents TO ex_member;"
    )
    try:
        out = ok(explain("ex_member", NIK_LOOKUP, dsn=pg.superuser_dsn))
    finally:
        pg.execute("DROP ROLE ex_member;")
    assert "role:        agent (restricted)" in out
    assert "is a member of PostgreSQL role 'agents' (member_of of role 'agent')" in out
    assert "resolved as user ex_member" in out


def test_json_has_the_documented_keys(pg: PgServer) -> None:
    result = explain("agent_citra", NIK_LOOKUP + "; SELECT 1", dsn=pg.superuser_dsn, as_json=True)
    doc = json.loads(ok(result))
    assert set(doc) == DOCUMENTED_TOP_KEYS
    assert doc["format"] == 1
    assert set(doc["role"]) == DOCUMENTED_ROLE_KEYS
    assert doc["role"]["name"] == "agent"
    assert doc["role"]["how"] == "users"
    assert doc["role"]["matched"] == "agent_*"
    assert doc["role"]["memberships"] == ["agents"]
    assert doc["database"] == "bank"
    assert doc["search_path"] == ["pg_catalog", "bank", "public"]
    assert doc["catalog"] is True
    assert doc["decision"]["decision"] == "mask"
    first, second = doc["statements"]
    assert set(first) == DOCUMENTED_STATEMENT_KEYS
    assert first["decision"]["decision"] == "mask"
    assert second["decision"] == {"decision": "allow"}
    nik = first["outputs"][1]
    assert set(nik) == DOCUMENTED_OUTPUT_KEYS
    assert nik["name"] == "nik"
    assert nik["form"] == "copy"
    assert nik["result"] == "masked"
    assert nik["sources"] == [
        {
            "column": "bank.customers.nik",
            "labels": [
                {
                    "label": "nik",
                    "policy": {
                        "kind": "mask",
                        "mask": "partial",
                        "params": {"keep_first": 6, "keep_last": 0, "char": "*"},
                        "filter": "equality",
                    },
                }
            ],
        }
    ]
    assert nik["mask"] == {
        "label": "nik",
        "mask": "partial",
        "params": {"keep_first": 6, "keep_last": 0, "char": "*"},
    }
    assert first["relations"] == [{"name": "bank.customers", "kind": "table"}]
    assert {"clause": "where", "form": "equality"}.items() <= first["predicates"][0].items()


def test_json_refusal(pg: PgServer) -> None:
    result = explain(
        "agent_citra", "DELETE FROM customers WHERE id = 1", dsn=pg.superuser_dsn, as_json=True
    )
    decision = json.loads(ok(result))["decision"]
    assert decision["decision"] == "refuse"
    assert decision["sqlstate"] == "42501"
    assert decision["message"].startswith("topeng: DELETE statements are not permitted")
    assert decision["hint"]


def test_without_dsn_role_and_kinds_only(pg: PgServer) -> None:
    out = ok(explain("alice", "SELECT nik FROM customers; SET ROLE postgres", dsn=None))
    assert "role:        agent (restricted)" in out
    assert "membership not checked (no --dsn)" in out
    assert "lineage, labels and masks cannot be traced" in out
    assert "statement 1 of 2: select (SelectStmt)" in out
    assert "decision: not decided without --dsn" in out
    assert "statement 2 of 2: set (VariableSetStmt)" in out
    assert "SET ROLE is not permitted for role agent" in out
    assert "<-" not in out


def test_without_dsn_glob_decides(pg: PgServer) -> None:
    doc = json.loads(ok(explain("dba_ani", "VACUUM", dsn=None, as_json=True)))
    assert doc["role"]["name"] == "dba"
    assert doc["role"]["membership"] == "not_needed"
    assert doc["catalog"] is False
    assert doc["statements"][0]["kind"] == "ddl"
    assert doc["decision"]["decision"] == "allow"


def test_bad_rules_exit_2_with_positions(tmp_path: Path, pg: PgServer) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "version: 1\n"
        "roles:\n"
        "  agent: {users: ['agent_*'], max_row_per_query: 5}\n"
        "default_role: agnet\n"
    )
    result = explain("agent_citra", "SELECT 1", dsn=pg.superuser_dsn, rules=bad)
    assert result.returncode == 2
    assert f"{bad}:3:" in result.stderr and "max_row_per_query" in result.stderr
    assert f"{bad}:4:" in result.stderr and "did you mean 'agent'" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("dsn", ["postgresql://nobody@127.0.0.1:1/none"])
def test_unreachable_dsn_exit_1(dsn: str) -> None:
    result = explain("agent_citra", "SELECT 1", dsn=dsn)
    assert result.returncode == 1
    assert "cannot read the database from --dsn" in result.stderr
