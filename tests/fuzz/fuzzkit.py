"""Helpers of the fuzz tests: time budgets, hypothesis searches, a hang detector.

- TOPENG_FUZZ_SECONDS unset: every fuzz test runs one hypothesis search of a bounded number of
  examples (`quick`, a few hundred), as `make test` always has.
- TOPENG_FUZZ_SECONDS=N: a wall-clock budget for all the tests marked `fuzz` together. The clock
  starts when collection ends and covers fixture setup (Topeng and PostgreSQL starting) too.
  Each test, when it starts, gets an equal share of what is left of the budget among the fuzz
  tests still to run (so time one test leaves unused, or overspends, moves to the others) and
  runs fresh hypothesis searches (new random seeds) until its share is spent. The first search
  has `quick` examples; each later one is sized from the rate measured so far to fit in what is
  left of the share (at most `long` examples), so no test overruns its share by more than about
  one quick search. The whole run takes the budget plus fixed costs: interpreter start and
  collection, the quick form's minimum of one search per test once the budget is spent, and
  stopping PostgreSQL.
"""

from __future__ import annotations

import os
import signal
import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis.strategies import SearchStrategy

FUZZ_SECONDS = float(os.environ.get("TOPENG_FUZZ_SECONDS") or 0)
LONG = FUZZ_SECONDS > 0

_SAFETY = 0.7
"""A later search is sized to take this fraction of the time left (examples grow slower later,
and the machine is shared)."""

_budget = {"deadline": 0.0, "tests_left": 0, "share_deadline": 0.0}


def start_budget(tests: int) -> None:
    """The fuzz tests are collected: the budget's clock starts now."""
    _budget["deadline"] = time.monotonic() + FUZZ_SECONDS
    _budget["tests_left"] = tests
    _budget["share_deadline"] = _budget["deadline"]


def begin_test() -> None:
    """A fuzz test is about to be set up: its share is an equal part of what is left."""
    now = time.monotonic()
    left = max(0.0, _budget["deadline"] - now)
    tests = max(1, int(_budget["tests_left"]))
    _budget["tests_left"] = tests - 1
    _budget["share_deadline"] = now + left / tests


def share_deadline() -> float:
    """The time.monotonic() by which the running fuzz test should finish (long form)."""
    return _budget["share_deadline"]


def _settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
        ],
    )


def _search(check: Callable[..., None], strategies: tuple[Any, ...], examples: int) -> None:
    """One hypothesis search of `check` over `strategies` (a fresh function object each time:
    hypothesis binds its settings to the function it decorates)."""
    fresh = types.FunctionType(
        check.__code__, check.__globals__, check.__name__, check.__defaults__, check.__closure__
    )
    fresh.__dict__.update(check.__dict__)  # @example seeds, if any
    fresh.__qualname__ = check.__qualname__
    fresh.__module__ = check.__module__
    _settings(examples)(given(*strategies)(fresh))()


def run_budgeted(
    check: Callable[..., None], *strategies: SearchStrategy[Any], quick: int, long: int = 2_000
) -> int:
    """Search `check` over `strategies` with hypothesis: once with `quick` examples (quick
    form), or again and again until this test's share of TOPENG_FUZZ_SECONDS is spent (long
    form; see the module docstring). Returns the number of searches run."""
    started = time.monotonic()
    _search(check, strategies, quick)
    runs, examples = 1, quick
    if not LONG:
        return runs
    deadline = share_deadline()
    while True:
        now = time.monotonic()
        per_example = max(now - started, 1e-3) / examples
        left = deadline - now
        if left < per_example * quick:
            return runs
        size = max(quick, min(long, int(left * _SAFETY / per_example)))
        _search(check, strategies, size)
        runs += 1
        examples += size


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
