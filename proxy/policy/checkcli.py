"""`topeng check RULES [--dsn DSN]`: print every problem, exit 1 if any is an error."""

from __future__ import annotations

import asyncio
import sys
from typing import TextIO

from proxy.policy.check import ColumnInfo, check_rules, has_errors

LIVE_COLUMNS_SQL = """
SELECT n.nspname, c.relname, a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod)
FROM pg_catalog.pg_attribute a
JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f')
  AND a.attnum > 0 AND NOT a.attisdropped
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'
ORDER BY 1, 2, a.attnum
"""


async def fetch_live_columns(dsn: str) -> list[ColumnInfo]:
    """The columns of every user relation in the database the DSN names."""
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=15)
    try:
        rows = await conn.fetch(LIVE_COLUMNS_SQL)
    finally:
        await conn.close()
    return [(r[0], r[1], r[2], r[3]) for r in rows]


def run_check(rules: str, *, dsn: str | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    columns: list[ColumnInfo] | None = None
    if dsn:
        try:
            columns = asyncio.run(fetch_live_columns(dsn))
        except Exception as exc:  # any failure to connect or read is reported the same way
            print(f"topeng check: cannot read the schema from --dsn: {exc}", file=sys.stderr)
            return 2
    diagnostics = check_rules(rules, columns)
    for diagnostic in diagnostics:
        print(diagnostic, file=out)
    errors = sum(1 for d in diagnostics if d.severity == "error")
    warnings = len(diagnostics) - errors
    where = f" against {len(columns)} live columns" if columns is not None else ""
    if has_errors(diagnostics):
        print(f"{rules}: {errors} error(s), {warnings} warning(s){where}", file=out)
        return 1
    print(f"{rules}: ok, {warnings} warning(s){where}", file=out)
    return 0
