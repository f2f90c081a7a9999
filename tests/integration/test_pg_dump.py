"""pg_dump through Topeng: refused with a clear message for a restricted user, complete for
an unrestricted one."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from harness import PgServer, TopengProcess, needs_tool

from proxy.sampledata import DEMO_USERS


def pg_dump(
    pg: PgServer, proxy: TopengProcess, user: str, out: Path
) -> subprocess.CompletedProcess[str]:
    if pg.bin_dir is None or not (pg.bin_dir / "pg_dump").is_file():
        needs_tool("pg_dump not found next to the test server")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGPASSWORD"] = DEMO_USERS[user]
    env["PGSSLMODE"] = "disable"
    return subprocess.run(
        [str(pg.bin_dir / "pg_dump"), "-h", proxy.host, "-p", str(proxy.port), "-U", user,
         "-d", pg.database, "-n", "bank", "-f", str(out), "--no-password"],
        capture_output=True, text=True, timeout=300, env=env, check=False,
    )  # fmt: skip


def test_pg_dump_as_restricted_user_fails_clearly(
    pg: PgServer, topeng: TopengProcess, tmp_path: Path
) -> None:
    result = pg_dump(pg, topeng, "agent_citra", tmp_path / "dump.sql")
    assert result.returncode != 0
    assert "topeng:" in result.stderr, result.stderr
    # the message names the rule that refused it
    assert any(
        word in result.stderr
        for word in ("not permitted", "not allowed", "is denied", "require_where")
    ), result.stderr
    dumped = (tmp_path / "dump.sql").read_text() if (tmp_path / "dump.sql").exists() else ""
    assert "COPY bank.customers" not in dumped


def test_pg_dump_as_unrestricted_user_works(
    pg: PgServer, topeng: TopengProcess, tmp_path: Path
) -> None:
    out = tmp_path / "dump.sql"
    result = pg_dump(pg, topeng, "dba_ani", out)
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    assert "CREATE TABLE bank.customers" in text
    assert "COPY bank.customers (" in text
    data = text.split("COPY bank.customers (", 1)[1].split("\\.", 1)[0]
    assert len(data.splitlines()) > 2000  # the header line and every customer
