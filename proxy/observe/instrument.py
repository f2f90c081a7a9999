"""Metrics of objects that live elsewhere: the analysis cache.

Strategy: `register_analysis_cache(cache)` wraps the one cache instance's `analyze` so that
every lookup is timed (`topeng_analysis_duration_seconds`), counted as a hit or a miss
(`topeng_analysis_cache_total{result}`, from the cache's own `hits` / `misses` counters) and
leaves the cache's size in `topeng_analysis_cache_entries`. The numbers go into ordinary
prometheus_client metrics, not a scrape-time collector, so that with `--workers N` they land in
the multiprocess files and every scrape sums all workers (a collector could only report the one
worker that happens to answer the scrape). The counts and timings are tallied
(proxy/observe/tally.py) and handed over four times a second: two clock reads and a few
additions per statement analysed.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from proxy.observe import metrics, tally

if TYPE_CHECKING:
    from proxy.policy.cache import AnalysisCache

__all__ = ["register_analysis_cache"]


def register_analysis_cache(cache: AnalysisCache) -> None:
    """Export the metrics of this process's analysis cache. Call once, at startup."""
    if getattr(cache, "_topeng_instrumented", False):
        return
    inner: Callable[..., Any] = cache.analyze
    hit = tally.counter(metrics.ANALYSIS_CACHE.labels("hit"))
    miss = tally.counter(metrics.ANALYSIS_CACHE.labels("miss"))
    duration = tally.histogram(metrics.ANALYSIS_DURATION)
    size = metrics.ANALYSIS_CACHE_SIZE

    entries = [len(cache)]  # what the size gauge says now

    @functools.wraps(inner)
    def analyze(*args: Any, **kwargs: Any) -> Any:
        hits, misses = cache.hits, cache.misses
        started = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            duration.observe(time.perf_counter() - started)
            hit.n += cache.hits - hits
            miss.n += cache.misses - misses
            now = len(cache)
            if now != entries[0]:  # a hit changes nothing: set the gauge only when it moves
                entries[0] = now
                size.set(now)

    setattr(cache, "analyze", analyze)  # noqa: B010 - an instance attribute, on purpose
    setattr(cache, "_topeng_instrumented", True)  # noqa: B010
    size.set(entries[0])
