"""pgbench runs: the select-only and 100,000-row workloads, and the checks before them.

Every run uses `-n` (no vacuum: the database was vacuumed once after loading, and a restricted
role may not run VACUUM), `-T` seconds, and SSL off, so the three servers see the same clients.
"""

from __future__ import annotations

import asyncio
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.report import STREAM_ROWS, Measure, PgbenchOutput, parse_pgbench
from bench.services import (
    DATABASE,
    LOOPBACK,
    RESTRICTED_USER,
    UNRESTRICTED_USER,
    BenchError,
    Users,
    clean_env,
)

#: Eight columns of bank.customers, six of them labelled in rules/bank.yaml: nik (nik),
#: no_kk (family_card), nama_ibu_kandung (mother_maiden_name: redacted for the bench role),
#: penghasilan (income), no_hp (phone), email (email); id and full_name are not labelled.
STREAM_COLUMNS = (
    "id", "full_name", "nik", "no_kk", "nama_ibu_kandung", "penghasilan", "no_hp", "email",
)  # fmt: skip
MASKED_COLUMNS = frozenset(STREAM_COLUMNS[2:])
STREAM_SQL = f"SELECT {', '.join(STREAM_COLUMNS)} FROM bank.customers LIMIT {STREAM_ROWS}"


@dataclass(frozen=True, slots=True)
class Target:
    """A server to point pgbench at."""

    name: str  # direct | pgbouncer | topeng
    port: int
    pid: int | None = None  # the proxy's process, whose CPU time is read around each run


def user_of(measure: Measure) -> str:
    return UNRESTRICTED_USER if measure.user == "unrestricted" else RESTRICTED_USER


def write_stream_script(workdir: Path) -> Path:
    path = workdir / "stream.sql"
    path.write_text(STREAM_SQL + ";\n")
    return path


def pgbench_args(measure: Measure, duration: float, stream_script: Path) -> list[str]:
    args = ["-n", "-T", str(max(1, round(duration))), "-M", measure.protocol]
    args += ["-c", str(measure.clients), "-j", str(min(2, measure.clients))]
    if measure.script == "select-only":
        args.append("-S")
    else:
        args += ["-f", str(stream_script)]
    return args


def run_pgbench(
    pgbench: str, target: Target, user: str, users: Users, args: list[str], timeout: float
) -> PgbenchOutput:
    """One pgbench run; BenchError with pgbench's own words if it fails or reports failures."""
    command = [pgbench, "-h", LOOPBACK, "-p", str(target.port), "-U", user, *args, DATABASE]
    env = clean_env(PGPASSWORD=users.password(user), PGSSLMODE="disable")
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, env=env, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise BenchError(
            f"pgbench against {target.name} did not finish in {timeout:.0f} s"
        ) from None
    if done.returncode != 0:
        tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-3:]
        raise BenchError(
            f"pgbench against {target.name} exited {done.returncode}: {' / '.join(tail)}"
        )
    try:
        out = parse_pgbench(done.stdout)
    except ValueError as exc:
        raise BenchError(f"pgbench against {target.name}: {exc}") from None
    if out.failed:
        raise BenchError(f"pgbench against {target.name}: {out.failed} failed transactions")
    return out


# -- checks before measuring -------------------------------------------------------------------


async def _fetch(port: int, user: str, password: str, query: str) -> list[Any]:
    import asyncpg

    conn = await asyncpg.connect(
        host=LOOPBACK, port=port, user=user, password=password, database=DATABASE, ssl=False,
        timeout=30,
    )  # fmt: skip
    try:
        return list(await conn.fetch(query))
    finally:
        await conn.close()


def check_topeng(
    pgbench: str, direct: Target, topeng: Target, users: Users, stream_script: Path
) -> None:
    """The restricted role may run pgbench -S through Topeng (both protocols), and the stream
    query comes back from Topeng with exactly the six labelled columns changed."""
    for protocol in ("simple", "prepared"):
        run_pgbench(
            pgbench, topeng, RESTRICTED_USER, users,
            ["-n", "-S", "-t", "20", "-M", protocol], timeout=60,
        )  # fmt: skip
    sample = STREAM_SQL.replace(f"LIMIT {STREAM_ROWS}", "ORDER BY id LIMIT 20")
    password = users.password(RESTRICTED_USER)
    masked = asyncio.run(_fetch(topeng.port, RESTRICTED_USER, password, sample))
    clear = asyncio.run(_fetch(direct.port, RESTRICTED_USER, password, sample))
    if len(masked) != len(clear) or not clear:
        raise BenchError("the stream query returned different row counts through Topeng")
    changed = {
        column
        for m_row, c_row in zip(masked, clear, strict=True)
        for column in STREAM_COLUMNS
        if m_row[column] != c_row[column]
    }
    if changed != MASKED_COLUMNS:
        raise BenchError(
            f"through Topeng the restricted role saw changed columns {sorted(changed)}, "
            f"expected exactly {sorted(MASKED_COLUMNS)}: the bench rules do not mask as intended"
        )
    run_pgbench(
        pgbench, topeng, RESTRICTED_USER, users, ["-n", "-t", "1", "-f", str(stream_script)],
        timeout=120,
    )  # fmt: skip
