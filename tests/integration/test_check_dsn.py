"""`topeng check RULES --dsn DSN`: the rules measured against the live schema of the test bank.

The schema is read as the proxy reads it (catalog.load_catalog); whether a mask fits a column is
decided by the proxy's own masker builder (masks.mask_applies). Extra tables live in a schema of
their own, dropped afterwards, so other tests' catalogs do not see them.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import BANK_RULES, REPO_ROOT, PgServer

BANK_TEXT = BANK_RULES.read_text()
HASH_WARNING = "mask 'hash' without hash_key uses a random key per process"


def check(rules: Path | str, dsn: str | None) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "-m", "proxy", "check", str(rules)]
    if dsn is not None:
        args += ["--dsn", dsn]
    return subprocess.run(
        args, capture_output=True, text=True, cwd=REPO_ROOT, timeout=120, check=False
    )


def findings(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The diagnostic lines (without the summary line)."""
    return [
        line for line in result.stdout.splitlines() if ": error: " in line or ": warning: " in line
    ]


@pytest.fixture
def scratch_schema(pg: PgServer) -> Iterator[str]:
    name = f"checkdsn_{secrets.token_hex(3)}"
    pg.execute(f"CREATE SCHEMA {name};")
    try:
        yield name
    finally:
        pg.execute(f"DROP SCHEMA {name} CASCADE;")


def bank_with(tmp_path: Path, old: str, new: str) -> Path:
    assert old in BANK_TEXT
    path = tmp_path / "rules.yaml"
    path.write_text(BANK_TEXT.replace(old, new, 1))
    return path


def line_of(path: Path, text: str) -> int:
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if text in line:
            return number
    raise AssertionError(f"{text!r} not in {path}")


def test_shipped_rules_pass_against_the_bank(pg: PgServer) -> None:
    result = check(BANK_RULES, pg.superuser_dsn)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = findings(result)
    # the only finding: the example leaves hash_key commented out
    assert len(lines) == 1 and HASH_WARNING in lines[0], lines
    assert "ok, 1 warning(s) against" in result.stdout
    assert "live columns" in result.stdout


def test_shipped_rules_directory_passes() -> None:
    result = check(REPO_ROOT / "rules", None)
    assert result.returncode == 0, result.stdout + result.stderr
    assert all(": error: " not in line for line in result.stdout.splitlines())
    assert "rules: ok" in result.stdout


def test_label_matching_no_column_is_a_warning(pg: PgServer, tmp_path: Path) -> None:
    rules = bank_with(
        tmp_path,
        '  email: ["*.*.email"]\n',
        '  email: ["*.*.email"]\n  passport: ["*.*.no_paspor"]\n',
    )
    rules.write_text(
        rules.read_text().replace(
            "    email: {mask: email}", "    email: {mask: email}\n    passport: {mask: redact}"
        )
    )
    result = check(rules, pg.superuser_dsn)
    assert result.returncode == 0, result.stdout
    expected = (
        f"{rules}:{line_of(rules, 'passport: [')}:3: warning: label 'passport' matches no "
        "column in the database (globs: *.*.no_paspor)"
    )
    assert expected in findings(result)


def test_email_mask_on_a_numeric_column_is_an_error(pg: PgServer, tmp_path: Path) -> None:
    rules = bank_with(tmp_path, "income: {mask: round, to: 1000000}", "income: {mask: email}")
    result = check(rules, pg.superuser_dsn)
    assert result.returncode == 1, result.stdout
    errors = [line for line in findings(result) if ": error: " in line]
    assert len(errors) == 1, errors
    (error,) = errors
    assert error.startswith(f"{rules}:{line_of(rules, 'income: {mask: email}')}:")
    assert "mask 'email' of role '*' for label 'income' cannot apply to " in error
    assert "bank.customers.penghasilan (numeric(15,2))" in error
    assert "does not apply to numeric columns" in error
    assert "1 error(s)" in result.stdout


def test_round_mask_on_a_text_column_is_an_error(pg: PgServer, tmp_path: Path) -> None:
    rules = bank_with(
        tmp_path, "nik: {mask: partial, keep_first: 6}", "nik: {mask: round, to: 1000}"
    )
    result = check(rules, pg.superuser_dsn)
    assert result.returncode == 1, result.stdout
    (error,) = [line for line in findings(result) if ": error: " in line]
    assert "mask 'round' of role '*' for label 'nik' cannot apply to bank.customers.nik" in error
    assert "does not apply to bpchar columns" in error


def test_mask_that_the_proxy_can_apply_is_not_an_error(pg: PgServer, tmp_path: Path) -> None:
    # partial over a number keeps its type (digits hidden): the masker builds, so no error,
    # although a check by type name alone would call it a text-only mask
    rules = bank_with(
        tmp_path, "income: {mask: round, to: 1000000}", "income: {mask: partial, keep_first: 2}"
    )
    result = check(rules, pg.superuser_dsn)
    assert result.returncode == 0, result.stdout
    assert not any("label 'income'" in line for line in findings(result))


def test_partial_showing_a_whole_char16_is_an_error(pg: PgServer, tmp_path: Path) -> None:
    rules = bank_with(
        tmp_path,
        "nik: {mask: partial, keep_first: 6}",
        "nik: {mask: partial, keep_first: 10, keep_last: 6}",
    )
    result = check(rules, pg.superuser_dsn)
    assert result.returncode == 1, result.stdout
    (error,) = [line for line in findings(result) if ": error: " in line]
    assert "keep_first + keep_last = 16 shows all 16 characters" in error


def test_unknown_type_is_a_warning(pg: PgServer, tmp_path: Path, scratch_schema: str) -> None:
    pg.execute(
        f"CREATE TYPE {scratch_schema}.mood AS ENUM ('ok', 'sad');"
        f"CREATE TABLE {scratch_schema}.feelings (id int, no_hp {scratch_schema}.mood);"
    )
    result = check(BANK_RULES, pg.superuser_dsn)
    assert result.returncode == 0, result.stdout
    (warning,) = [line for line in findings(result) if f"{scratch_schema}.feelings" in line]
    assert ": warning: mask 'partial' of role '*' for label 'phone' cannot apply to" in warning
    assert "cannot tell whether it fits" in warning


def test_unlabelled_sensitive_column_is_a_warning(pg: PgServer, scratch_schema: str) -> None:
    pg.execute(
        f"CREATE TABLE {scratch_schema}.extra (id int, npwp text, gaji_pokok numeric, "
        "mother_name text, no_rekening text, nik text);"
    )
    result = check(BANK_RULES, pg.superuser_dsn)
    assert result.returncode == 0, result.stdout
    lines = findings(result)
    labels_line = line_of(BANK_RULES, "labels:")
    where = f"{BANK_RULES}:{labels_line}:1: warning: column {scratch_schema}.extra"
    assert (
        f"{where}.npwp looks sensitive ('npwp') but has no label; add a label, e.g. "
        "tax_id: ['*.*.npwp']"
    ) in lines
    assert (
        f"{where}.gaji_pokok looks sensitive ('gaji') but has no label; add '*.*.gaji_pokok' "
        "to label 'income'"
    ) in lines
    assert (
        f"{where}.mother_name looks sensitive ('mother') but has no label; add "
        "'*.*.mother_name' to label 'mother_maiden_name'"
    ) in lines
    assert any(".extra.no_rekening looks sensitive ('rekening')" in line for line in lines)
    # nik carries the label already: nothing to suggest
    assert not any(".extra.nik " in line for line in lines)
    assert not any(".extra.id " in line for line in lines)


def test_unreachable_dsn_exits_2() -> None:
    result = check(BANK_RULES, "postgresql://nobody@127.0.0.1:1/none")
    assert result.returncode == 2
    assert "cannot read the schema from --dsn" in result.stderr


def test_bad_rules_are_errors_even_with_dsn(pg: PgServer, tmp_path: Path) -> None:
    rules = bank_with(tmp_path, "default_role: agent", "default_role: agnet")
    result = check(rules, pg.superuser_dsn)
    assert result.returncode == 1
    assert any(
        "error: default_role 'agnet' is not a role; did you mean 'agent'?" in line
        for line in findings(result)
    )
