"""Fuzzing: quick forms in `make test`, long forms with a time budget (`make fuzz`).

See fuzzkit.py for the budget rules (TOPENG_FUZZ_SECONDS).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
for extra in (HERE, HERE.parent / "unit", HERE.parent / "integration"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

import fuzzkit  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fuzz: a fuzz test; its long form shares the budget")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    count = sum(1 for item in items if item.get_closest_marker("fuzz") is not None)
    if count and fuzzkit.LONG:
        fuzzkit.start_budget(count)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before the test's fixtures: their setup is paid from its share."""
    if fuzzkit.LONG and item.get_closest_marker("fuzz") is not None:
        fuzzkit.begin_test()
