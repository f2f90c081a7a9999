"""Per-statement metrics added up in plain Python and handed to prometheus_client in bulk.

Strategy: every prometheus_client update takes a lock (and with `--workers` writes to a shared
file), and a restricted session makes five of them per statement: about a fifth of the CPU
Topeng spends on a `pgbench -S` transaction. A tally keeps a counter's increments, or a
histogram's bucket counts and sum, in plain numbers; `flush_all()` hands everything over. The
sweep calls it four times a second, a session calls it when it ends, and `/metrics` calls it
before it answers: so a scrape of a single process is exact, an ended session's statements are
counted with it, and an open session's figures in another worker are at most a quarter of a
second behind.

A histogram's counts go into its bucket and sum values directly (prometheus_client's
`_buckets` and `_sum`, which `observe` itself updates); if a future prometheus_client lacks
them, the tally falls back to calling `observe` for each value at flush time.
`tests/unit/test_tally.py` holds a tallied histogram to a directly observed one.
"""

from __future__ import annotations

import bisect
from typing import Any, TypeVar

__all__ = ["CounterTally", "HistogramTally", "counter", "flush_all", "histogram"]


class CounterTally:
    __slots__ = ("child", "n")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.n = 0

    def inc(self, amount: int = 1) -> None:
        self.n += amount

    def flush(self) -> None:
        if self.n:
            n, self.n = self.n, 0
            self.child.inc(n)


class HistogramTally:
    __slots__ = ("child", "bounds", "counts", "total", "values", "_direct")

    def __init__(self, child: Any) -> None:
        self.child = child
        self._direct = all(hasattr(child, a) for a in ("_buckets", "_sum", "_upper_bounds"))
        self.bounds: list[float] = list(child._upper_bounds) if self._direct else []
        self.counts = [0] * len(self.bounds)
        self.total = 0.0
        self.values: list[float] = []  # only without direct access

    def observe(self, amount: float) -> None:
        if self._direct:
            # The first bucket whose upper bound is >= amount, as Histogram.observe finds it.
            self.counts[bisect.bisect_left(self.bounds, amount)] += 1
            self.total += amount
        else:
            self.values.append(amount)

    def merge(self, counts: list[int], total: float) -> bool:
        """Bucket counts (one per bound, in order) and their sum, observed elsewhere (the relay
        thread's gate); False if this tally cannot take them (no direct access)."""
        if not self._direct or len(counts) != len(self.counts):
            return False
        mine = self.counts
        for i, n in enumerate(counts):
            if n:
                mine[i] += n
        self.total += total
        return True

    def flush(self) -> None:
        if not self._direct:
            values, self.values = self.values, []
            for v in values:
                self.child.observe(v)
            return
        counts = self.counts
        if not any(counts):
            return
        total, self.total = self.total, 0.0
        self.child._sum.inc(total)
        buckets = self.child._buckets
        for i, n in enumerate(counts):
            if n:
                buckets[i].inc(n)
                counts[i] = 0


_tallies: dict[int, CounterTally | HistogramTally] = {}
_T = TypeVar("_T", CounterTally, HistogramTally)


def _tally(child: Any, kind: type[_T]) -> _T:
    """One tally per child per process (the tally keeps the child, so its id stays its own)."""
    found = _tallies.get(id(child))
    if found is None:
        found = _tallies[id(child)] = kind(child)
    assert isinstance(found, kind)
    return found


def counter(child: Any) -> CounterTally:
    """The tally of a counter (a metric or a `labels()` child)."""
    return _tally(child, CounterTally)


def histogram(child: Any) -> HistogramTally:
    """The tally of a histogram (a metric or a `labels()` child)."""
    return _tally(child, HistogramTally)


def flush_all() -> None:
    """Hand every tally's figures to prometheus_client."""
    for t in _tallies.values():
        t.flush()
