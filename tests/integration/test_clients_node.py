"""node-postgres (npm `pg`) through Topeng, in both relay modes.

tests/node/clients.js does the work and prints one JSON object; this module checks it. The
npm package is installed by .ci/run (`cd tests/node && npm install`); if it is missing, the
module fixture installs it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import rawpg
from harness import REPO_ROOT, TEST_CUSTOMERS, TEST_USERS, PgServer, TopengProcess, needs_tool

NODE_DIR = REPO_ROOT / "tests" / "node"


@pytest.fixture(scope="module")
def node() -> Path:
    binary = shutil.which("node")
    if binary is None:
        needs_tool("node is not installed (.ci/run installs it)")
    if not (NODE_DIR / "node_modules" / "pg").is_dir():
        npm = shutil.which("npm")
        if npm is None:
            needs_tool("npm is not installed (.ci/run installs it)")
        subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=NODE_DIR, check=True, timeout=300,
        )  # fmt: skip
    return Path(binary)


@pytest.fixture(scope="module", params=rawpg.MODES)
def proxy(
    request: pytest.FixtureRequest, pg: PgServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TopengProcess]:
    process = rawpg.start_mode(pg, request.param, tmp_path_factory.mktemp(f"node-{request.param}"))
    yield process
    process.stop()


@pytest.fixture(scope="module")
def result(node: Path, proxy: TopengProcess) -> dict[str, Any]:
    run = subprocess.run(
        [str(node), str(NODE_DIR / "clients.js"),
         proxy.dsn("alice", TEST_USERS["alice"]), proxy.dsn("alice", "wrong")],
        cwd=NODE_DIR, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    out: dict[str, Any] = json.loads(run.stdout.strip().splitlines()[-1])
    return out


def test_simple_query(result: dict[str, Any]) -> None:
    assert result["simple"] == TEST_CUSTOMERS


def test_parameters_extended_protocol(result: dict[str, Any]) -> None:
    assert result["params"] == [[1, "node", "string"], [2, "node", "string"], [3, "node", "string"]]
    assert result["named"] == [10, 20, 30]
    assert result["rows_mode_array"] == [["a", "b"], [[1, "b"]]]


def test_transaction(result: dict[str, Any]) -> None:
    assert result["transaction"] == [3]


def test_error_and_recovery(result: dict[str, Any]) -> None:
    assert result["error"] == {"code": "22012", "message": "division by zero"}
    assert result["after_error"] == "usable"


def test_pool_of_five(result: dict[str, Any]) -> None:
    assert result["pool"] == {"values": [1, 2, 3, 4, 5], "backends": 5}


def test_wrong_password(result: dict[str, Any]) -> None:
    assert result["wrong_password"] == {
        "code": "28P01",
        "message": 'password authentication failed for user "alice"',
    }
