"""pgbench through Topeng: initialise, then select-only runs, simple and prepared, both modes."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator

import pytest
import rawpg
from harness import TEST_USERS, PgServer, TopengProcess

DATABASE = "pgbench_topeng"


@pytest.fixture(scope="module")
def bench_db(pg: PgServer) -> Iterator[str]:
    pg.execute(f"DROP DATABASE IF EXISTS {DATABASE}; CREATE DATABASE {DATABASE} OWNER alice;",
               dbname="postgres")  # fmt: skip
    yield DATABASE
    pg.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE);", dbname="postgres")


@pytest.fixture(scope="module", params=rawpg.MODES)
def proxy(
    request: pytest.FixtureRequest, pg: PgServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TopengProcess]:
    process = rawpg.start_mode(pg, request.param, tmp_path_factory.mktemp(f"bench-{request.param}"))
    yield process
    process.stop()


def pgbench(pg: PgServer, proxy: TopengProcess, *args: str) -> subprocess.CompletedProcess[str]:
    binary = "pgbench"
    if pg.bin_dir is not None and (pg.bin_dir / "pgbench").is_file():
        binary = str(pg.bin_dir / "pgbench")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGPASSWORD"] = TEST_USERS["alice"]
    command = [binary, "-h", proxy.host, "-p", str(proxy.port), "-U", "alice", *args, DATABASE]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)


def test_initialise(pg: PgServer, proxy: TopengProcess, bench_db: str) -> None:
    # DROP/CREATE TABLE, COPY of 100,000 rows, VACUUM, primary keys: all through Topeng.
    out = pgbench(pg, proxy, "-i", "-s", "1", "-q")
    assert out.returncode == 0, out.stderr
    assert "done in" in out.stderr
    count = pg.execute("SELECT count(*) FROM pgbench_accounts;", dbname=bench_db).strip()
    assert count == "100000"


@pytest.mark.parametrize("protocol", ["simple", "prepared"])
def test_select_only(pg: PgServer, proxy: TopengProcess, bench_db: str, protocol: str) -> None:
    out = pgbench(pg, proxy, "-S", "-T", "3", "-c", "8", "-j", "2", "-M", protocol, "-n")
    assert out.returncode == 0, out.stdout + out.stderr
    processed = re.search(r"number of transactions actually processed: (\d+)", out.stdout)
    assert processed is not None and int(processed.group(1)) > 100, out.stdout
    failed = re.search(r"number of failed transactions: (\d+)", out.stdout)
    assert failed is not None and failed.group(1) == "0", out.stdout
    assert f"query mode: {protocol}" in out.stdout
