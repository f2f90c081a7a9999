"""Loading and validating rules: fixtures a DBA could read, and the snapshot's behaviour."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from proxy.policy.rules import (
    ALWAYS_PERMITTED,
    MASKS,
    STATEMENT_KINDS,
    LabelPolicy,
    RuleIssue,
    Rules,
    RulesError,
    load_rules,
)
from proxy.policy.yamlsrc import YamlSourceError, YMap, YScalar, parse_yaml

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "rules"
GOOD = FIXTURES / "good"
BAD = FIXTURES / "bad"
BANK = REPO / "rules" / "bank.yaml"
SCHEMA = REPO / "rules" / "topeng-rules.schema.json"

BAD_CASES = sorted(p.stem for p in BAD.glob("*.expected"))
GOOD_CASES = sorted(p.name for p in GOOD.iterdir() if p.suffix == ".yaml" or p.is_dir())

# Bad cases the JSON Schema cannot reject: cross-references, duplicates (a YAML loader keeps the
# last), whole-directory facts, and what only the merged rules can tell.
SCHEMA_CANNOT_EXPRESS = {
    "default_role_missing": "files of a directory may leave default_role to another file",
    "default_role_unknown": "cross-reference",
    "default_role_unrestricted": "cross-reference",
    "duplicates": "duplicate keys collapse when loaded",
    "unknown_label_in_policy": "cross-reference",
}


def write(tmp_path: Path, text: str, name: str = "rules.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def errors_of(path: str | Path) -> list[str]:
    with pytest.raises(RulesError) as info:
        load_rules(path)
    return [str(e) for e in info.value.errors]


MINIMAL = "version: 1\nroles:\n  agent: {users: ['agent_*']}\ndefault_role: agent\n"


# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_fixture_reports_exactly_the_expected_errors(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(BAD)
    target = case if (BAD / case).is_dir() else f"{case}.yaml"
    expected = (BAD / f"{case}.expected").read_text(encoding="utf-8").splitlines()
    assert errors_of(target) == expected


def test_there_are_enough_bad_fixtures_with_several_errors_each() -> None:
    assert len(BAD_CASES) >= 15
    multi = [c for c in BAD_CASES if len((BAD / f"{c}.expected").read_text().splitlines()) > 2]
    assert len(multi) >= 5


@pytest.mark.parametrize("case", GOOD_CASES)
def test_good_fixture_loads(case: str) -> None:
    rules = load_rules(GOOD / case)
    assert rules.roles
    assert rules.role(rules.default_role).unrestricted is False


def test_bank_rules_load_and_match_the_design() -> None:
    rules = load_rules(BANK)
    assert [r.name for r in rules.roles] == ["dba", "supervisor", "agent"]
    assert rules.default_role == "agent"
    nik = rules.policy_for("agent", "nik")
    assert (nik.kind, nik.mask, nik.params["keep_first"], nik.params["keep_last"]) == (
        "mask",
        "partial",
        6,
        0,
    )
    assert rules.policy_for("agent", "mother_maiden_name").kind == "deny"
    assert rules.policy_for("supervisor", "mother_maiden_name").mask == "hash"
    assert rules.policy_for("supervisor", "income").kind == "allow"
    assert rules.policy_for("dba", "nik").kind == "allow"
    assert rules.labels_for_column("bank", "customers", "no_hp") == ("phone",)


# --------------------------------------------------------------------------------------------
# JSON Schema agrees with the loader


def _schema_validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _schema_accepts(validator: Any, path: Path) -> bool:
    files = (
        sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml"))
        if path.is_dir()
        else [path]
    )
    for file in files:
        try:
            data = yaml.safe_load(file.read_text(encoding="utf-8"))
        except yaml.YAMLError:
            return False
        if data is None and path.is_dir():
            continue
        if not validator.is_valid(data):
            return False
    return True


@pytest.mark.parametrize("case", [*GOOD_CASES, "../../../../rules/bank.yaml"])
def test_schema_accepts_good_rules(case: str) -> None:
    validator = _schema_validator()
    path = (GOOD / case).resolve()
    files = sorted(path.glob("*.y*ml")) if path.is_dir() else [path]
    for file in files:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
        if data is None:
            continue
        problems = [e.message for e in validator.iter_errors(data)]
        assert problems == [], file


@pytest.mark.parametrize("case", BAD_CASES)
def test_schema_rejects_bad_rules_where_it_can(case: str) -> None:
    path = BAD / case if (BAD / case).is_dir() else BAD / f"{case}.yaml"
    accepted = _schema_accepts(_schema_validator(), path)
    assert accepted == (case in SCHEMA_CANNOT_EXPRESS)


def test_schema_knows_every_mask_and_statement_kind() -> None:
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    policy_object = schema["$defs"]["policy"]["oneOf"][1]
    assert set(policy_object["properties"]["mask"]["enum"]) - {None} == set(MASKS)
    kinds = schema["$defs"]["role"]["properties"]["statements"]["items"]["enum"]
    assert tuple(kinds) == STATEMENT_KINDS


# --------------------------------------------------------------------------------------------
# The snapshot


def test_policy_for_prefers_own_entry_then_star_then_allow(tmp_path: Path) -> None:
    rules = load_rules(
        write(
            tmp_path,
            """
version: 1
roles:
  boss: {users: [boss], unrestricted: true}
  spv: {users: ["spv_*"]}
  agent: {users: ["agent_*"]}
default_role: agent
labels:
  nik: ["*.*.nik"]
  income: ["*.*.income"]
  city: ["*.*.city"]
policies:
  "*":
    nik: {mask: partial, keep_first: 6}
    income: deny
  spv:
    income: {mask: round, to: 1000}
""",
        )
    )
    assert rules.policy_for("spv", "income").mask == "round"
    assert rules.policy_for("agent", "income").kind == "deny"
    assert rules.policy_for("spv", "nik").mask == "partial"
    assert rules.policy_for("agent", "city") == LabelPolicy("allow")
    assert rules.policy_for("boss", "income").kind == "allow"
    with pytest.raises(KeyError):
        rules.policy_for("nobody", "nik")
    with pytest.raises(KeyError):
        rules.policy_for("agent", "ktp")


def test_mask_params_are_complete_with_defaults() -> None:
    rules = load_rules(GOOD / "all_keys.yaml")
    assert dict(rules.policy_for("agent", "phone").params) == {
        "keep_first": 0,
        "keep_last": 3,
        "char": "*",
    }
    assert dict(rules.policy_for("agent", "family_card").params) == {"char": "#"}
    assert rules.policy_for("agent", "full_name").params["kind"] == "name"  # inferred
    assert rules.policy_for("agent", "address").params["kind"] == "address"
    assert rules.policy_for("auditor", "gender").mask == "null"  # `mask: null` is not YAML null
    assert rules.policy_for("agent", "nik").max_lookups_per_minute == 30
    assert rules.policy_for("agent", "email").filter == "any"
    assert rules.policy_for("agent", "income").filter == "equality"


def test_role_defaults_and_statement_kinds() -> None:
    rules = load_rules(GOOD / "all_keys.yaml")
    agent = rules.role("agent")
    assert agent.statements == frozenset({"select"})
    assert agent.permitted_statements == {"select"} | ALWAYS_PERMITTED
    assert agent.permits("transaction") and not agent.permits("insert")
    assert (agent.copy_out, agent.copy_in, agent.on_row_limit) == ("deny", "deny", "error")
    assert agent.statement_timeout_ms == 1500
    auditor = rules.role("auditor")
    assert auditor.copy_out == "mask" and auditor.permits("copy_out")
    assert auditor.statement_timeout_ms == 120_000
    assert auditor.require_where == ("bank.customers", "bank.*")
    loader = rules.role("loader")
    assert loader.copy_in == "allow"  # implied by listing copy_in
    assert loader.statement_timeout_ms == 500
    dba = rules.role("dba")
    assert dba.permitted_statements == frozenset(STATEMENT_KINDS)
    assert dba.max_rows_per_query is None


def test_copy_out_listed_in_statements_means_masked_copy(tmp_path: Path) -> None:
    rules = load_rules(
        write(tmp_path, MINIMAL.replace("{users: ['agent_*']}", "{statements: [copy_out]}"))
    )
    assert rules.role("agent").copy_out == "mask"


@pytest.mark.parametrize(
    ("written", "ms"),
    [("30s", 30_000), ("500ms", 500), ("2min", 120_000), ("1h", 3_600_000), ("250", 250)],
)
def test_statement_timeout_durations(tmp_path: Path, written: str, ms: int) -> None:
    text = MINIMAL.replace("users: ['agent_*']", f"users: [a], statement_timeout: {written}")
    assert load_rules(write(tmp_path, text)).role("agent").statement_timeout_ms == ms


def test_labels_match_each_part_case_sensitively(tmp_path: Path) -> None:
    rules = load_rules(
        write(
            tmp_path,
            MINIMAL
            + "labels:\n  nik: ['*.*.nik', 'bank.cust*.no_ktp']\n  nik_again: ['bank.*.nik']\n"
            + "policies: {'*': {nik: deny, nik_again: deny}}\n",
        )
    )
    assert rules.labels_for_column("bank", "customers", "nik") == ("nik", "nik_again")
    assert rules.labels_for_column("bank", "customers", "NIK") == ()
    assert rules.labels_for_column("bank", "customers", "no_ktp") == ("nik",)
    assert rules.labels_for_column("bank", "accounts", "no_ktp") == ()
    assert rules.label("nik").matches("a", "b", "nik")
    assert not rules.label("nik").matches("a.b", "c", "x.nik")  # * never crosses a dot


def test_snapshot_is_immutable() -> None:
    rules = load_rules(BANK)
    with pytest.raises(dataclasses.FrozenInstanceError):
        rules.default_role = "dba"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        rules.roles[0].unrestricted = False  # type: ignore[misc]
    with pytest.raises(TypeError):
        rules.policies["*"]["nik"] = LabelPolicy("allow")  # type: ignore[index]
    with pytest.raises(TypeError):
        rules.policy_for("agent", "nik").params["keep_first"] = 16  # type: ignore[index]
    assert isinstance(rules.roles, tuple) and isinstance(rules.labels, tuple)
    assert hash(rules.policy_for("agent", "nik")) == hash(rules.policy_for("supervisor", "nik"))


def test_directory_merges_files_in_name_order_and_skips_others() -> None:
    rules = load_rules(GOOD / "split")
    assert [r.name for r in rules.roles] == ["dba", "agent", "supervisor"]
    assert rules.policy_for("agent", "phone").mask == "partial"  # own entry
    assert rules.policy_for("supervisor", "phone").kind == "deny"  # "*" from another file
    assert [p.name for p in rules.sources] == [
        "00-roles.yaml",
        "10-labels.yml",
        "20-policies.yaml",
        "30-more-roles.yaml",
        "90-empty.yaml",
    ]


def test_paths_in_messages_are_as_given(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "rules").mkdir()
    write(tmp_path / "rules", "version: 1\nroles: {agent: {users: [a]}}\n", "a.yaml")
    write(tmp_path / "rules", "version: 1\ndefault_role: agnet\n", "b.yaml")
    monkeypatch.chdir(tmp_path)
    assert errors_of("rules") == [
        "rules/b.yaml:2:15: default_role 'agnet' is not a role; did you mean 'agent'?"
    ]
    assert errors_of("./rules/") == [
        "./rules/b.yaml:2:15: default_role 'agnet' is not a role; did you mean 'agent'?"
    ]


def test_errors_of_all_files_come_at_once_sorted(tmp_path: Path) -> None:
    write(tmp_path, "version: 1\nroles:\n  agent: {users: [a], max_rows: 5}\n", "b.yaml")
    write(tmp_path, "version: 3\ndefault_role: agent\n", "a.yaml")
    with pytest.raises(RulesError) as info:
        load_rules(tmp_path)
    lines = str(info.value).splitlines()
    assert [line.split(":", 1)[0].rsplit("/", 1)[1] for line in lines] == ["a.yaml", "b.yaml"]
    assert "unsupported version 3; expected 1" in lines[0]
    assert "unknown key 'max_rows' in role 'agent'" in lines[1]
    assert info.value.errors == sorted(info.value.errors)


def test_rule_issue_format() -> None:
    issue = RuleIssue("rules/x.yaml", 7, 5, "unknown key 'x'")
    assert str(issue) == "rules/x.yaml:7:5: unknown key 'x'"
    assert str(RulesError([issue, RuleIssue("a.yaml", 1, 1, "m")])) == (
        "a.yaml:1:1: m\nrules/x.yaml:7:5: unknown key 'x'"
    )


def test_a_broken_file_does_not_cause_cross_reference_noise(tmp_path: Path) -> None:
    write(tmp_path, "version: 1\nlabels: {nik: ['*.*.nik'\n", "a.yaml")
    write(tmp_path, MINIMAL + "policies: {'*': {nik: deny}}\n", "b.yaml")
    errors = errors_of(tmp_path)
    assert len(errors) == 1 and "invalid YAML" in errors[0]


def test_missing_path_and_directory_without_rules(tmp_path: Path) -> None:
    assert errors_of(tmp_path / "nope.yaml") == [
        f"{tmp_path / 'nope.yaml'}:1:1: no such file or directory; expected a rules file"
    ]
    (tmp_path / "empty").mkdir()
    assert errors_of(tmp_path / "empty") == [
        f"{tmp_path / 'empty'}:1:1: directory holds no *.yaml or *.yml files; expected rules files"
    ]


def test_warnings_do_not_stop_loading(tmp_path: Path) -> None:
    rules = load_rules(
        write(
            tmp_path,
            """
version: 1
roles:
  agent: {users: ["agent_*"]}
  ghost: {max_rows_per_query: 5}
default_role: agent
labels:
  nik: ["*.*.NIK"]
  unused: ["*.*.x"]
policies:
  "*":
    nik: {mask: partial}
""",
        )
    )
    messages = [w.message for w in rules.warnings]
    assert any("role 'ghost' has neither users nor member_of" in m for m in messages)
    assert any("upper-case letters" in m for m in messages)
    assert any("label 'unused' has no policy" in m for m in messages)
    assert any("mask 'partial' keeps nothing" in m for m in messages)


def test_yaml_booleans_are_not_strings(tmp_path: Path) -> None:
    text = MINIMAL.replace("users: ['agent_*']", "users: [a], copy_out: no")
    assert errors_of(write(tmp_path, text)) == [
        f"{tmp_path / 'rules.yaml'}:3:33: copy_out in role 'agent' must be one of deny, allow, "
        "mask; got false (a boolean; quote it if you meant a string)"
    ]


def test_hash_key_file_is_relative_to_the_rules_file(tmp_path: Path) -> None:
    (tmp_path / "key").write_bytes(b"s3cret\n")
    rules = load_rules(write(tmp_path, MINIMAL + "hash_key: {file: key}\n"))
    assert rules.hash_key is not None
    assert rules.hash_key.read() == b"s3cret"


def test_hash_key_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rules = load_rules(write(tmp_path, MINIMAL + "hash_key: {env: MY_KEY}\n"))
    assert rules.hash_key is not None
    monkeypatch.delenv("MY_KEY", raising=False)
    with pytest.raises(LookupError):
        rules.hash_key.read()
    monkeypatch.setenv("MY_KEY", "k")
    assert rules.hash_key.read() == b"k"


def test_limits_backend(tmp_path: Path) -> None:
    assert load_rules(write(tmp_path, MINIMAL)).limits_backend == "memory"
    text = MINIMAL + "limits: {backend: 'rediss://cache:6380/1'}\n"
    assert load_rules(write(tmp_path, text)).limits_backend == "rediss://cache:6380/1"


# --------------------------------------------------------------------------------------------
# YAML with positions


def test_positions_are_one_based_lines_and_columns() -> None:
    root = parse_yaml("a:\n  bb: [1, 'x']\n", "f.yaml")
    assert isinstance(root, YMap)
    ((key, value),) = root.entries
    assert str(key.pos) == "f.yaml:1:1"
    assert isinstance(value, YMap)
    inner_key, seq = value.entries[0]
    assert (inner_key.pos.line, inner_key.pos.column) == (2, 3)
    assert str(seq.pos) == "f.yaml:2:7"


def test_scalars_are_typed_like_safe_load() -> None:
    root = parse_yaml("a: 50\nb: '50'\nc: yes\nd: ~\n", "f.yaml")
    assert isinstance(root, YMap)
    values = [v.value for _, v in root.entries if isinstance(v, YScalar)]
    assert values == [50, "50", True, None]


def test_recursive_alias_and_python_tags_are_refused() -> None:
    with pytest.raises(YamlSourceError, match="recursive alias"):
        parse_yaml("a: &x [1, *x]\n", "f.yaml")
    with pytest.raises(YamlSourceError, match="is not allowed|could not determine"):
        parse_yaml("a: !!python/name:os.system ''\n", "f.yaml")


def test_shared_aliases_are_converted_once() -> None:
    # 10 levels of 10 aliases each would be 10**10 nodes if expanded.
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 10):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]")
    root = parse_yaml("\n".join(lines) + "\n", "bomb.yaml")
    assert isinstance(root, YMap) and len(root.entries) == 10


def test_merge_keys_let_explicit_keys_win(tmp_path: Path) -> None:
    rules = load_rules(GOOD / "anchors.yaml")
    assert rules.role("contractor").users == ("vendor_*",)
    assert rules.role("contractor").max_rows_per_query == 50


def test_rules_type_is_exported() -> None:
    assert isinstance(load_rules(BANK), Rules)
