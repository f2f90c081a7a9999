"""`topeng check`: every problem with a rules file, optionally measured against a live schema.

Strategy: loading (`load_rules`) already finds everything that makes rules unusable; those come
back as errors, and the loader's own warnings as warnings. Given the database's columns as
`(schema, table, column, type_name)` tuples (the `--dsn` part fetches them; tests pass them in),
three more checks run: a label that matches no column (warning), a mask that cannot keep a
column's type (error: `round` on text, `email` on an integer, `partial` that would keep every
character of a `char(16)`), and a column whose name looks like customer data but carries no
label (warning, with the label to add). `type_name` may be either `format_type()` output
(`character(16)`, `timestamp with time zone`) or a bare `pg_type.typname` (`bpchar`, `int8`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Final, Literal

from proxy.policy.rules import LabelPolicy, Rules, RulesError, load_rules

__all__ = [
    "ColumnInfo",
    "Diagnostic",
    "check_rules",
    "check_snapshot",
    "has_errors",
    "mask_problem",
    "sensitive_label_for",
    "type_category",
]

ColumnInfo = tuple[str, str, str, str]
"""(schema, table, column, type_name) of one live column."""

Severity = Literal["error", "warning"]

_SYSTEM_SCHEMAS: Final = frozenset({"pg_catalog", "information_schema", "pg_toast"})

_CATEGORIES: Final = {
    "text": "text",
    "character varying": "text",
    "varchar": "text",
    "character": "text",
    "char": "text",
    "bpchar": "text",
    "name": "text",
    "citext": "text",
    "smallint": "integer",
    "integer": "integer",
    "int": "integer",
    "bigint": "integer",
    "int2": "integer",
    "int4": "integer",
    "int8": "integer",
    "smallserial": "integer",
    "serial": "integer",
    "bigserial": "integer",
    "numeric": "numeric",
    "decimal": "numeric",
    "real": "numeric",
    "double precision": "numeric",
    "float4": "numeric",
    "float8": "numeric",
    "money": "numeric",
    "date": "date",
    "timestamp": "timestamp",
    "timestamp without time zone": "timestamp",
    "timestamp with time zone": "timestamp",
    "timestamptz": "timestamp",
    "boolean": "boolean",
    "bool": "boolean",
    "uuid": "uuid",
}

_TEXT: Final = frozenset({"text"})
_ANY: Final = frozenset({"text", "integer", "numeric", "date", "timestamp", "boolean", "uuid"})
_MASK_TYPES: Final = {
    "partial": (_TEXT, "a text column (text, varchar, char)"),
    "redact": (_TEXT, "a text column (text, varchar, char)"),
    "email": (_TEXT, "a text column holding e-mail addresses"),
    "fake": (_TEXT, "a text column (text, varchar, char)"),
    "hash": (frozenset({"text", "integer", "uuid"}), "a text, integer or uuid column"),
}

# word -> label to suggest. Words of 5 letters or more also match inside a longer name.
_SENSITIVE: Final = {
    "nik": "nik",
    "ktp": "nik",
    "kk": "family_card",
    "ibu": "mother_maiden_name",
    "mother": "mother_maiden_name",
    "maiden": "mother_maiden_name",
    "phone": "phone",
    "hp": "phone",
    "telp": "phone",
    "telepon": "phone",
    "mobile": "phone",
    "ponsel": "phone",
    "email": "email",
    "npwp": "tax_id",
    "income": "income",
    "gaji": "income",
    "salary": "income",
    "penghasilan": "income",
    "pendapatan": "income",
    "rekening": "account_number",
    "card": "card_number",
    "kartu": "card_number",
    "cvv": "card_number",
    "passport": "passport",
    "paspor": "passport",
}


@dataclass(frozen=True, slots=True, order=True)
class Diagnostic:
    """One finding, printed as `path:line:column: severity: message`."""

    path: str
    line: int
    column: int
    severity: Severity
    message: str

    @property
    def file(self) -> str:
        return self.path

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.column}: {self.severity}: {self.message}"


def has_errors(diagnostics: Iterable[Diagnostic]) -> bool:
    """True if any diagnostic is an error (`topeng check` then exits non-zero)."""
    return any(d.severity == "error" for d in diagnostics)


def check_rules(path: str | Path, columns: Iterable[ColumnInfo] | None = None) -> list[Diagnostic]:
    """Load the rules at `path` and check them (and against `columns`, when given)."""
    try:
        rules = load_rules(path)
    except RulesError as exc:
        return [Diagnostic(e.path, e.line, e.column, "error", e.message) for e in exc.errors]
    return check_snapshot(rules, columns)


def check_snapshot(rules: Rules, columns: Iterable[ColumnInfo] | None = None) -> list[Diagnostic]:
    """The loaded rules' warnings, plus the live-schema checks when `columns` is given."""
    out = [Diagnostic(w.path, w.line, w.column, "warning", w.message) for w in rules.warnings]
    if columns is not None:
        live = [c for c in columns if c[0] not in _SYSTEM_SCHEMAS]
        out.extend(_schema_checks(rules, live))
    return sorted(set(out))


def type_category(type_name: str) -> tuple[str, int | None]:
    """(category, character length or None) of a PostgreSQL type name.

    Categories: text, integer, numeric, date, timestamp, boolean, uuid, array, other.
    """
    t = " ".join(type_name.strip().lower().split())
    if t.endswith("[]") or t.startswith("_"):
        return "array", None
    length = None
    m = re.search(r"\((\d+)\)", t)
    base = re.sub(r"\s*\([^)]*\)", "", t).strip()
    category = _CATEGORIES.get(base, "other")
    if category == "text" and m is not None:
        length = int(m.group(1))
    elif category == "text" and base in ("character", "char", "bpchar"):
        length = 1 if "(" not in t and base != "bpchar" else None
    return category, length


def mask_problem(policy: LabelPolicy, type_name: str) -> tuple[Severity, str] | None:
    """Why `policy`'s mask cannot keep a column of `type_name` its type; None if it can."""
    if policy.kind != "mask" or policy.mask is None or policy.mask == "null":
        return None
    category, length = type_category(type_name)
    mask, params = policy.mask, policy.params
    if mask in _MASK_TYPES:
        accepted, needs = _MASK_TYPES[mask]
    elif mask == "round":
        by_number = not isinstance(params.get("to"), str)
        accepted = frozenset({"integer", "numeric"} if by_number else {"date", "timestamp"})
        needs = (
            "a numeric column (to: a date unit needs a date or timestamp column)"
            if by_number
            else "a date or timestamp column (to: a number needs a numeric column)"
        )
    elif mask == "constant":
        accepted, needs = _constant_types(params.get("value"))
    else:  # pragma: no cover - MASKS and this function agree
        return None
    if category not in accepted:
        if category == "other":
            return "warning", f"cannot tell whether it fits; it needs {needs}"
        return "error", f"it needs {needs}"
    if length is not None:
        return _length_problem(
            mask, params.get("keep_first"), params.get("keep_last"), params.get("value"), length
        )
    return None


def _constant_types(value: object) -> tuple[frozenset[str], str]:
    if value is None:
        return _ANY | {"array", "other"}, "any column"
    if isinstance(value, bool):
        return frozenset({"boolean"}), "a boolean column for a boolean value"
    if isinstance(value, int):
        return frozenset({"integer", "numeric"}), "a numeric column for a number"
    if isinstance(value, float):
        return frozenset({"numeric"}), "a non-integer numeric column for a fractional number"
    if isinstance(value, datetime):
        return frozenset({"timestamp"}), "a timestamp column for a timestamp"
    if isinstance(value, date):
        return frozenset({"date", "timestamp"}), "a date or timestamp column for a date"
    return _TEXT, "a text column for a string value"


def _length_problem(
    mask: str, keep_first: object, keep_last: object, value: object, length: int
) -> tuple[Severity, str] | None:
    if mask == "partial" and isinstance(keep_first, int) and isinstance(keep_last, int):
        if keep_first + keep_last >= length:
            return "error", (
                f"keep_first + keep_last = {keep_first + keep_last} shows all {length} "
                "characters, so nothing is hidden; keep fewer"
            )
    if mask == "constant" and isinstance(value, str) and len(value) > length:
        return "error", f"the value has {len(value)} characters but the column holds {length}"
    return None


def sensitive_label_for(column: str) -> tuple[str, str] | None:
    """(word, suggested label) if the column's name looks like customer data, else None."""
    name = column.lower()
    words = re.findall(r"[a-z]+|[0-9]+", name)
    for word, label in _SENSITIVE.items():
        if word in words or (len(word) >= 5 and word in name):
            return word, label
    return None


def _schema_checks(rules: Rules, columns: list[ColumnInfo]) -> list[Diagnostic]:
    out: list[Diagnostic] = []
    matched: set[str] = set()
    anchor = rules.labels_pos
    for schema, table, column, type_name in columns:
        qualified = f"{schema}.{table}.{column}"
        labels = rules.labels_for_column(schema, table, column)
        matched.update(labels)
        for label in labels:
            for role, by_label in rules.policies.items():
                policy = by_label.get(label)
                if policy is None or policy.pos is None:
                    continue
                problem = mask_problem(policy, type_name)
                if problem is not None:
                    severity, why = problem
                    out.append(
                        _at(
                            policy.pos.path,
                            policy.pos.line,
                            policy.pos.column,
                            severity,
                            f"mask '{policy.mask}' of role '{role}' for label '{label}' cannot "
                            f"apply to {qualified} ({type_name}): {why}",
                        )
                    )
        if len(labels) > 1:
            first = rules.label(labels[1]).pos or anchor
            if first is not None:
                out.append(
                    _at(
                        first.path,
                        first.line,
                        first.column,
                        "warning",
                        f"column {qualified} carries labels {', '.join(repr(x) for x in labels)};"
                        " the strictest policy applies (deny, then mask, then allow; between "
                        "two masks, the label written first)",
                    )
                )
        if not labels and anchor is not None:
            found = sensitive_label_for(column)
            if found is not None:
                word, suggestion = found
                glob = f"*.*.{column}"
                if suggestion in {lb.name for lb in rules.labels}:
                    hint = f"add '{glob}' to label '{suggestion}'"
                else:
                    hint = f"add a label, e.g. {suggestion}: ['{glob}']"
                out.append(
                    _at(
                        anchor.path,
                        anchor.line,
                        anchor.column,
                        "warning",
                        f"column {qualified} looks sensitive ('{word}') but has no label; {hint}",
                    )
                )
    for unused in rules.labels:
        if unused.name not in matched and unused.pos is not None:
            out.append(
                _at(
                    unused.pos.path,
                    unused.pos.line,
                    unused.pos.column,
                    "warning",
                    f"label '{unused.name}' matches no column in the database "
                    f"(globs: {', '.join(unused.globs) or 'none'})",
                )
            )
    return out


def _at(path: str, line: int, column: int, severity: Severity, message: str) -> Diagnostic:
    return Diagnostic(path, line, column, severity, message)
