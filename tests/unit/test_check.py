"""`topeng check`: static diagnostics, and diagnostics against a given live schema."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.policy.check import (
    ColumnInfo,
    Diagnostic,
    check_rules,
    has_errors,
    sensitive_label_for,
    type_category,
)

REPO = Path(__file__).resolve().parents[2]
BANK = REPO / "rules" / "bank.yaml"

DEMO_SCHEMA: list[ColumnInfo] = [
    ("bank", "customers", "id", "bigint"),
    ("bank", "customers", "full_name", "text"),
    ("bank", "customers", "nik", "character(16)"),
    ("bank", "customers", "no_kk", "character(16)"),
    ("bank", "customers", "nama_ibu_kandung", "text"),
    ("bank", "customers", "birth_date", "date"),
    ("bank", "customers", "gender", "character(1)"),
    ("bank", "customers", "penghasilan", "numeric(15,2)"),
    ("bank", "customers", "no_hp", "text"),
    ("bank", "customers", "email", "text"),
    ("bank", "customers", "address", "text"),
    ("bank", "customers", "city", "text"),
    ("bank", "customers", "province", "text"),
    ("bank", "customers", "created_at", "timestamp with time zone"),
    ("bank", "accounts", "id", "bigint"),
    ("bank", "accounts", "customer_id", "bigint"),
    ("bank", "accounts", "account_number", "character varying(16)"),
    ("bank", "accounts", "product", "text"),
    ("bank", "accounts", "balance", "numeric(15,2)"),
    ("bank", "accounts", "opened_at", "date"),
    ("bank", "accounts", "status", "text"),
    ("bank", "transactions", "id", "bigint"),
    ("bank", "transactions", "account_id", "bigint"),
    ("bank", "transactions", "amount", "numeric(15,2)"),
    ("bank", "transactions", "kind", "text"),
    ("bank", "transactions", "description", "text"),
    ("bank", "transactions", "created_at", "timestamp with time zone"),
]

HEAD = "version: 1\nroles:\n  agent: {users: ['agent_*']}\ndefault_role: agent\n"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def messages(diagnostics: list[Diagnostic], severity: str) -> list[str]:
    return [d.message for d in diagnostics if d.severity == severity]


def test_bank_rules_fit_the_demo_schema() -> None:
    diagnostics = check_rules(BANK, DEMO_SCHEMA)
    assert not has_errors(diagnostics)
    # Only the loader's advice on hash_key: every label matches, no sensitive column is bare.
    assert [d.message.split(";")[0] for d in diagnostics] == [
        "mask 'hash' without hash_key uses a random key per process, so hashes differ between "
        "restarts and instances"
    ]


def test_static_check_returns_load_errors_as_diagnostics(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD.replace("max", "") + "labels: {nik: ['nik']}\n")
    diagnostics = check_rules(path)
    assert has_errors(diagnostics)
    (d,) = diagnostics
    assert (d.severity, d.line, d.column) == ("error", 5, 16)
    assert str(d) == f"{path}:5:16: error: {d.message}"
    assert d.file == str(path)


def test_static_check_without_schema_reports_loader_warnings(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + "labels: {nik: ['*.*.nik']}\n")
    diagnostics = check_rules(path)
    assert not has_errors(diagnostics)
    assert messages(diagnostics, "warning") == [
        "label 'nik' has no policy in any role, so every role sees it unmasked"
    ]


@pytest.mark.parametrize(
    ("policy", "column_type", "expected"),
    [
        ("{mask: round, to: 1000}", "text", "it needs a numeric column"),
        ("{mask: email}", "integer", "it needs a text column holding e-mail addresses"),
        ("{mask: partial, keep_first: 2}", "bigint", "it needs a text column"),
        ("{mask: round, to: month}", "numeric(15,2)", "it needs a date or timestamp column"),
        ("{mask: round, to: 1000}", "date", "it needs a numeric column"),
        ("{mask: hash}", "date", "it needs a text, integer or uuid column"),
        ("{mask: constant, value: 'x'}", "int8", "it needs a text column for a string value"),
        ("{mask: redact}", "text[]", "it needs a text column"),
        ("{mask: partial, keep_first: 12, keep_last: 4}", "character(16)", "shows all 16"),
        ("{mask: constant, value: 'hidden'}", "varchar(4)", "the value has 6 characters"),
    ],
)
def test_masks_that_cannot_keep_the_column_type_are_errors(
    tmp_path: Path, policy: str, column_type: str, expected: str
) -> None:
    path = write(tmp_path, HEAD + f"labels: {{x: ['*.*.x']}}\npolicies: {{'*': {{x: {policy}}}}}\n")
    diagnostics = check_rules(path, [("s", "t", "x", column_type)])
    errors = messages(diagnostics, "error")
    assert len(errors) == 1, diagnostics
    assert errors[0].startswith("mask '") and f"s.t.x ({column_type})" in errors[0]
    assert expected in errors[0]
    (error,) = [d for d in diagnostics if d.severity == "error"]
    assert (error.line, error.column) == (6, 21)  # the policy, where the DBA fixes it


@pytest.mark.parametrize(
    ("policy", "column_type"),
    [
        ("{mask: round, to: 1000}", "numeric(15,2)"),
        ("{mask: round, to: year}", "timestamp with time zone"),
        ("{mask: round, to: month}", "date"),
        ("{mask: partial, keep_first: 6}", "bpchar"),
        ("{mask: partial, keep_first: 6}", "character(16)"),
        ("{mask: hash}", "uuid"),
        ("{mask: null}", "jsonb"),
        ("{mask: constant, value: 0}", "numeric"),
        ("{mask: constant, value: true}", "boolean"),
        ("{mask: email}", "citext"),
        ("deny", "bytea"),
    ],
)
def test_masks_that_fit(tmp_path: Path, policy: str, column_type: str) -> None:
    text = HEAD + f"labels: {{x: ['*.*.x']}}\npolicies: {{'*': {{x: {policy}}}}}\n"
    path = write(tmp_path, text + "hash_key: {env: K}\n")
    assert check_rules(path, [("s", "t", "x", column_type)]) == []


def test_unknown_types_are_a_warning_not_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + "labels: {x: ['*.*.x']}\npolicies: {'*': {x: {mask: redact}}}\n")
    diagnostics = check_rules(path, [("s", "t", "x", "my_domain")])
    assert not has_errors(diagnostics)
    assert "cannot tell whether it fits" in messages(diagnostics, "warning")[0]


def test_label_matching_no_column_is_a_warning(tmp_path: Path) -> None:
    text = HEAD + "labels:\n  nik: ['*.*.nik']\n  ktp: ['*.*.no_ktp']\n"
    text += "policies: {'*': {nik: deny, ktp: deny}}\n"
    diagnostics = check_rules(write(tmp_path, text), [("bank", "c", "nik", "text")])
    assert [(d.severity, d.line, d.message) for d in diagnostics] == [
        ("warning", 7, "label 'ktp' matches no column in the database (globs: *.*.no_ktp)")
    ]


def test_sensitive_looking_columns_without_a_label(tmp_path: Path) -> None:
    text = HEAD + "labels:\n  phone: ['*.*.no_hp']\npolicies: {'*': {phone: deny}}\n"
    columns = [
        ("bank", "c", "no_hp", "text"),
        ("bank", "c", "no_telp", "text"),
        ("bank", "c", "npwp", "text"),
        ("bank", "c", "gaji_bulanan", "numeric"),
        ("bank", "c", "kota", "text"),
        ("pg_catalog", "pg_authid", "rolpassword", "text"),
    ]
    warnings = messages(check_rules(write(tmp_path, text), columns), "warning")
    assert warnings == [
        "column bank.c.gaji_bulanan looks sensitive ('gaji') but has no label; add a label, "
        "e.g. income: ['*.*.gaji_bulanan']",
        "column bank.c.no_telp looks sensitive ('telp') but has no label; add '*.*.no_telp' "
        "to label 'phone'",
        "column bank.c.npwp looks sensitive ('npwp') but has no label; add a label, e.g. "
        "tax_id: ['*.*.npwp']",
    ]


def test_column_with_two_labels_is_pointed_out(tmp_path: Path) -> None:
    text = HEAD + "labels:\n  a: ['*.*.x']\n  b: ['s.*.x']\npolicies: {'*': {a: deny, b: allow}}\n"
    warnings = messages(check_rules(write(tmp_path, text), [("s", "t", "x", "text")]), "warning")
    assert len(warnings) == 1 and "carries labels 'a', 'b'" in warnings[0]


@pytest.mark.parametrize(
    ("name", "word"),
    [
        ("nik", "nik"),
        ("no_ktp", "ktp"),
        ("no_kk", "kk"),
        ("nama_ibu_kandung", "ibu"),
        ("mother_maiden_name", "mother"),
        ("phonenumber", "phone"),
        ("no_hp", "hp"),
        ("email_address", "email"),
        ("salary", "salary"),
        ("penghasilan", "penghasilan"),
        ("no_rekening", "rekening"),
        ("card_no", "card"),
    ],
)
def test_sensitive_names(name: str, word: str) -> None:
    found = sensitive_label_for(name)
    assert found is not None and found[0] == word


@pytest.mark.parametrize("name", ["id", "city", "hpux_version", "nikah_status", "backup", "kind"])
def test_ordinary_names(name: str) -> None:
    assert sensitive_label_for(name) is None


@pytest.mark.parametrize(
    ("type_name", "category", "length"),
    [
        ("character(16)", "text", 16),
        ("bpchar", "text", None),
        ("character", "text", 1),
        ("character varying(16)", "text", 16),
        ("varchar", "text", None),
        ("numeric(15,2)", "numeric", None),
        ("int8", "integer", None),
        ("timestamp(3) with time zone", "timestamp", None),
        ("timestamptz", "timestamp", None),
        ("integer[]", "array", None),
        ("_text", "array", None),
        ("jsonb", "other", None),
    ],
)
def test_type_category(type_name: str, category: str, length: int | None) -> None:
    assert type_category(type_name) == (category, length)
