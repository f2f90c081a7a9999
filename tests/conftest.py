"""Shared fixtures. Nothing here touches a database or a socket until a test asks for it.

- `pg` (session): PostgreSQL with the sample bank in database `bank` (see tests/harness.py).
- `start_topeng` (per test): a factory, `start_topeng(*extra_args, rules=BANK_RULES, env=None)`,
  whose processes are stopped when the test ends.
- `topeng` (session): one Topeng with the bank rules in front of `pg`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import harness
import pytest
from harness import BANK_RULES, PgServer, TopengProcess

StartTopeng = Callable[..., TopengProcess]


@pytest.fixture(scope="session")
def pg() -> Iterator[PgServer]:
    server = harness.start_pg()
    try:
        yield server
    finally:
        harness.stop_pg(server)


@pytest.fixture
def start_topeng(pg: PgServer, tmp_path: Path) -> Iterator[StartTopeng]:
    started: list[TopengProcess] = []

    def start(
        *extra_args: str,
        rules: Path | str | None = BANK_RULES,
        env: Mapping[str, str] | None = None,
    ) -> TopengProcess:
        process = harness.start_topeng(pg, *extra_args, rules=rules, env=env, log_dir=tmp_path)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture(scope="session")
def topeng(pg: PgServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TopengProcess]:
    process = harness.start_topeng(pg, log_dir=tmp_path_factory.mktemp("topeng"))
    try:
        yield process
    finally:
        process.stop()
