"""pgjdbc (Debian's libpostgresql-jdbc-java) through Topeng, in both relay modes.

tests/java/JdbcClient.java is compiled once per test session into a temporary directory and
run once per mode (a JVM starts slowly): it prints `step=value` lines that the tests check.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import rawpg
from harness import REPO_ROOT, TEST_CUSTOMERS, TEST_USERS, PgServer, TopengProcess, needs_tool

JDBC_JAR = Path("/usr/share/java/postgresql.jar")
SOURCE = REPO_ROOT / "tests" / "java" / "JdbcClient.java"


@pytest.fixture(scope="module")
def classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    javac = shutil.which("javac")
    if javac is None or shutil.which("java") is None or not JDBC_JAR.is_file():
        needs_tool("needs java, javac and libpostgresql-jdbc-java (.ci/run installs them)")
    out = tmp_path_factory.mktemp("java")
    subprocess.run(
        [javac, "-cp", str(JDBC_JAR), "-d", str(out), str(SOURCE)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return out


@pytest.fixture(scope="module", params=rawpg.MODES)
def proxy(
    request: pytest.FixtureRequest, pg: PgServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TopengProcess]:
    process = rawpg.start_mode(pg, request.param, tmp_path_factory.mktemp(f"jdbc-{request.param}"))
    yield process
    process.stop()


@pytest.fixture(scope="module")
def result(classes: Path, proxy: TopengProcess) -> dict[str, str]:
    url = f"jdbc:postgresql://{proxy.host}:{proxy.port}/{proxy.pg.database}"
    run = subprocess.run(
        ["java", "-cp", f"{classes}:{JDBC_JAR}", "JdbcClient", url, "alice", TEST_USERS["alice"]],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    return dict(line.split("=", 1) for line in run.stdout.splitlines() if "=" in line)


def test_simple_query(result: dict[str, str]) -> None:
    assert result["simple"] == str(TEST_CUSTOMERS)


def test_prepared_statements(result: dict[str, str]) -> None:
    assert result["prepared"] == "1:16,2:16,3:16,4:16,5:16"
    assert result["server_prepared"] == "3 true"


def test_batch_inserts(result: dict[str, str]) -> None:
    assert result["batch"] == f"200 200 {sum(range(200))}"


def test_transaction(result: dict[str, str]) -> None:
    assert result["transaction"] == "1001"


def test_metadata(result: dict[str, str]) -> None:
    assert result["metadata"] == (
        "accounts,customers,transactions nama_ibu_kandung,nik,no_hp,no_kk PostgreSQL"
    )


def test_error_and_recovery(result: dict[str, str]) -> None:
    assert result["error"] == "ERROR 22012 ERROR: division by zero"
    assert result["after_error"] == "usable"


def test_wrong_password(result: dict[str, str]) -> None:
    assert result["wrong_password"] == (
        'ERROR 28P01 FATAL: password authentication failed for user "alice"'
    )
