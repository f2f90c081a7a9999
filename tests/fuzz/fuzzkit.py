"""Helpers of the fuzz tests: time budgets, hypothesis settings, a hang detector.

- TOPENG_FUZZ_SECONDS unset: every fuzz test runs a bounded number of examples (a few hundred).
- TOPENG_FUZZ_SECONDS=N: the tests marked `fuzz` share N seconds between them: each runs fresh
  hypothesis searches (new random seeds, more examples each) until its share is spent
  (conftest.py divides the budget once the tests are collected).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

from hypothesis import HealthCheck, settings

FUZZ_SECONDS = float(os.environ.get("TOPENG_FUZZ_SECONDS") or 0)
LONG = FUZZ_SECONDS > 0
share = {"seconds": FUZZ_SECONDS}


def fuzz_settings(quick: int, long: int = 2_000) -> settings:
    """Settings of one hypothesis search: `quick` examples in `make test`, `long` per search in
    the long form (which repeats searches until the time share is spent)."""
    return settings(
        max_examples=long if LONG else quick,
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
        ],
    )


def run_budgeted(check: Callable[[], None]) -> int:
    """Run a @given function once (quick form) or again and again for this test's share of
    TOPENG_FUZZ_SECONDS (each call is a new search). Returns the number of searches run."""
    check()
    runs = 1
    deadline = time.monotonic() + share["seconds"]
    while LONG and time.monotonic() < deadline:
        check()
        runs += 1
    return runs


class Hang(Exception):
    """A feed that should take microseconds took seconds: a loop that does not end."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise Hang in the main thread if the block runs longer than `seconds`."""

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        raise Hang(f"no result within {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
