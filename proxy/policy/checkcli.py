"""`topeng check RULES [--dsn DSN]`: print every problem, exit 1 if any is an error.

With --dsn the schema is read exactly as the proxy reads it (`catalog.load_catalog`, one
statement) and the live-schema checks of `proxy.policy.check` run over
`Catalog.column_infos()`. Whether a mask can keep a column's type is then decided by the
proxy's own masker builder (`masks.mask_applies`, by type OID and typmod), not by type names:
what `check` calls an error is exactly what a session would refuse to mask. A type the masker
does not know (a domain, an enum, a composite) cannot be told from here and is a warning.
`check.mask_problem`'s length findings (a `partial` that would show every character of a
`char(16)`, a `constant` longer than the column) are kept: those masks build, but hide nothing
or do not fit.
"""

from __future__ import annotations

import asyncio
import re
import sys
from typing import Final, TextIO

from proxy.policy import pgtypes
from proxy.policy.catalog import Catalog, Column, load_catalog
from proxy.policy.check import Diagnostic, check_snapshot, has_errors
from proxy.policy.masks import mask_applies
from proxy.policy.rules import Rules, RulesError, load_rules

__all__ = ["fetch_catalog", "mask_diagnostics", "run_check"]

# check.py's own type finding, replaced here by mask_applies (its length findings are kept)
_CHECK_TYPE_FINDING: Final = re.compile(
    r"mask '[^']*' of role '[^']*' for label '[^']*' cannot apply to .*\): "
    r"(it needs |cannot tell whether it fits)"
)


async def fetch_catalog(dsn: str) -> Catalog:
    """The catalog of the database the DSN names, loaded as the proxy loads it."""
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=15)
    try:
        return await load_catalog(conn)
    finally:
        await conn.close()


def _type_known(column: Column) -> bool:
    info = pgtypes.type_info(column.type_oid)
    if info is None:
        return False
    if column.element_type_oid is not None:
        return pgtypes.type_info(column.element_type_oid) is not None
    return True


def mask_diagnostics(rules: Rules, catalog: Catalog) -> list[Diagnostic]:
    """For every labelled live column and every policy that masks it: can the mask apply?"""
    out: list[Diagnostic] = []
    for relation in catalog.relations_by_oid.values():
        if relation.is_system:
            continue
        for column in relation.columns:
            labels = rules.labels_for_column(relation.schema, relation.name, column.name)
            qualified = f"{relation.schema}.{relation.name}.{column.name}"
            for label in labels:
                for role, by_label in rules.policies.items():
                    policy = by_label.get(label)
                    if policy is None or policy.pos is None or policy.kind != "mask":
                        continue
                    assert policy.mask is not None
                    where = (
                        f"mask '{policy.mask}' of role '{role}' for label '{label}' cannot "
                        f"apply to {qualified} ({column.type_name})"
                    )
                    pos = policy.pos
                    if policy.mask != "null" and not _type_known(column):
                        out.append(
                            Diagnostic(
                                pos.path,
                                pos.line,
                                pos.column,
                                "warning",
                                f"{where}: cannot tell whether it fits: Topeng does not know "
                                f"type {column.type_name} (a domain, enum or composite type?); "
                                "mask null always applies",
                            )
                        )
                        continue
                    why = mask_applies(policy.mask, policy.params, column.type_oid, column.typmod)
                    if why is not None:
                        out.append(
                            Diagnostic(pos.path, pos.line, pos.column, "error", f"{where}: {why}")
                        )
    return out


def _with_mask_checks(
    diagnostics: list[Diagnostic], rules: Rules, catalog: Catalog
) -> list[Diagnostic]:
    kept = [d for d in diagnostics if not _CHECK_TYPE_FINDING.match(d.message)]
    return sorted(set(kept) | set(mask_diagnostics(rules, catalog)))


def run_check(rules: str, *, dsn: str | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    catalog: Catalog | None = None
    if dsn:
        try:
            catalog = asyncio.run(fetch_catalog(dsn))
        except Exception as exc:  # any failure to connect or read is reported the same way
            print(f"topeng check: cannot read the schema from --dsn: {exc}", file=sys.stderr)
            return 2
    try:
        loaded = load_rules(rules)
    except RulesError as exc:
        diagnostics = [Diagnostic(e.path, e.line, e.column, "error", e.message) for e in exc.errors]
    else:
        columns = None if catalog is None else list(catalog.column_infos())
        diagnostics = check_snapshot(loaded, columns)
        if catalog is not None:
            diagnostics = _with_mask_checks(diagnostics, loaded, catalog)
    for diagnostic in diagnostics:
        print(diagnostic, file=out)
    errors = sum(1 for d in diagnostics if d.severity == "error")
    warnings = len(diagnostics) - errors
    where = ""
    if catalog is not None:
        where = f" against {sum(1 for _ in catalog.column_infos())} live columns"
    if has_errors(diagnostics):
        print(f"{rules}: {errors} error(s), {warnings} warning(s){where}", file=out)
        return 1
    print(f"{rules}: ok, {warnings} warning(s){where}", file=out)
    return 0
