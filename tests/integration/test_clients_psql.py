"""psql through Topeng, in both relay modes: meta-commands, \\copy, scripts, errors."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import rawpg
from harness import TEST_CUSTOMERS, TEST_USERS, PgServer, TopengProcess


@pytest.fixture(scope="module", params=rawpg.MODES)
def proxy(
    request: pytest.FixtureRequest, pg: PgServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TopengProcess]:
    process = rawpg.start_mode(pg, request.param, tmp_path_factory.mktemp(f"psql-{request.param}"))
    yield process
    process.stop()


def psql_binary(pg: PgServer) -> str:
    if pg.bin_dir is not None and (pg.bin_dir / "psql").is_file():
        return str(pg.bin_dir / "psql")
    return "psql"


def psql(
    proxy: TopengProcess,
    *args: str,
    user: str = "alice",
    password: str | None = None,
    stdin: str | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGPASSWORD"] = TEST_USERS[user] if password is None else password
    env["PGCONNECT_TIMEOUT"] = "10"
    command = [
        psql_binary(proxy.pg),
        "-X",
        "-h", proxy.host,
        "-p", str(proxy.port),
        "-U", user,
        "-d", proxy.pg.database,
        *args,
    ]  # fmt: skip
    return subprocess.run(
        command, input=stdin, capture_output=True, text=True, timeout=60, env=env, cwd=cwd
    )


def test_queries(proxy: TopengProcess) -> None:
    out = psql(proxy, "-A", "-t", "-c", "SELECT count(*) FROM customers")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(TEST_CUSTOMERS)
    out = psql(proxy, "-A", "-F", ",", "-c", "SELECT id, city FROM customers ORDER BY id LIMIT 3")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "id,city"
    assert [line.split(",")[0] for line in lines[1:4]] == ["1", "2", "3"]
    assert lines[-1] == "(3 rows)"


def test_describe_table(proxy: TopengProcess) -> None:
    out = psql(proxy, "-c", r"\d bank.customers")
    assert out.returncode == 0, out.stderr
    assert 'Table "bank.customers"' in out.stdout
    for column in ("nik", "no_kk", "nama_ibu_kandung", "penghasilan", "created_at"):
        assert f" {column} " in out.stdout
    assert "customers_nik_key" in out.stdout  # the Indexes section
    out = psql(proxy, "-c", r"\dt bank.*")
    assert out.returncode == 0, out.stderr
    assert {"customers", "accounts", "transactions"} <= {
        part.strip() for line in out.stdout.splitlines() for part in line.split("|")
    }


def test_copy_in_and_out(proxy: TopengProcess, tmp_path: Path) -> None:
    table = f"public.psql_copy_{proxy.port}"
    data = "".join(f"{i},Nama {i},{i * 1000}.50\n" for i in range(1, 1001))
    (tmp_path / "in.csv").write_text(data)
    script = f"""
DROP TABLE IF EXISTS {table};
CREATE TABLE {table} (id int PRIMARY KEY, name text, amount numeric);
\\copy {table} FROM 'in.csv' WITH (FORMAT csv)
\\copy (SELECT * FROM {table} ORDER BY id) TO 'out.csv' WITH (FORMAT csv)
\\copy {table} FROM STDIN WITH (FORMAT csv)
1001,from stdin,1
\\.
SELECT count(*) FROM {table};
DROP TABLE {table};
"""
    out = psql(proxy, "-v", "ON_ERROR_STOP=1", "-A", "-t", stdin=script, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "out.csv").read_text() == data
    assert out.stdout.split() == ["DROP", "TABLE", "CREATE", "TABLE", "COPY", "1000", "COPY",
                                  "1000", "COPY", "1", "1001", "DROP", "TABLE"]  # fmt: skip


def test_multi_statement_strings(proxy: TopengProcess) -> None:
    out = psql(
        proxy,
        "-A",
        "-t",
        "-c",
        "SELECT 1; SELECT 'two'; CREATE TEMP TABLE m (v int); INSERT INTO m VALUES (1), (2);"
        " SELECT sum(v) FROM m",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "two", "CREATE", "TABLE", "INSERT", "0", "2", "3"]


def test_on_error_stop(proxy: TopengProcess) -> None:
    script = "SELECT 'before';\nSELECT 1/0;\nSELECT 'after';\n"
    out = psql(proxy, "-v", "ON_ERROR_STOP=1", "-A", "-t", stdin=script)
    assert out.returncode == 3
    assert "before" in out.stdout and "after" not in out.stdout
    assert "ERROR:  division by zero" in out.stderr
    # Without ON_ERROR_STOP psql carries on over the same session.
    out = psql(proxy, "-A", "-t", stdin=script)
    assert out.returncode == 0
    assert out.stdout.split() == ["before", "after"]
    assert "ERROR:  division by zero" in out.stderr


def test_wrong_password(proxy: TopengProcess) -> None:
    out = psql(proxy, "-c", "SELECT 1", password="wrong")
    assert out.returncode == 2
    assert 'password authentication failed for user "alice"' in out.stderr
    assert "topeng" not in out.stderr


@pytest.mark.parametrize("user", ["md5user", "plainuser"])
def test_md5_and_cleartext_users(pg: PgServer, proxy: TopengProcess, user: str) -> None:
    if not pg.own_cluster:
        pytest.skip("needs our own pg_hba.conf")
    out = psql(proxy, "-A", "-t", "-c", "SELECT current_user", user=user)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == user
