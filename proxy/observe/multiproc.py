"""Metrics with `--workers N`: prometheus_client's multiprocess mode.

Strategy: the parent process creates a private directory and puts it in
PROMETHEUS_MULTIPROC_DIR *before* prometheus_client is first imported (the library picks its
value class at import time), then forks the workers. Every worker writes its counters, gauges
and histograms to memory-mapped files there; whichever worker answers a scrape (they share the
metrics port with SO_REUSEPORT) reads all the files with a MultiProcessCollector, so every
answer is the sum over the workers. When a worker exits its live gauges are dropped
(`worker_exited`); its counters stay, so totals never go backwards. The parent removes the
directory when it exits.

An operator may set PROMETHEUS_MULTIPROC_DIR themselves (a tmpfs, say): then that directory is
used, emptied of stale metric files at startup, and left in place.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

ENV = "PROMETHEUS_MULTIPROC_DIR"

log = logging.getLogger("topeng")


@dataclass(frozen=True, slots=True)
class MultiprocDir:
    path: str
    owned: bool  # created by us: removed at exit

    def cleanup(self) -> None:
        if self.owned:
            shutil.rmtree(self.path, ignore_errors=True)


def enabled() -> bool:
    return bool(os.environ.get(ENV))


def prepare() -> MultiprocDir | None:
    """Set up the metrics directory for forked workers; None if it cannot work here.

    Must run before `prometheus_client` is imported for the first time in this process.
    """
    if "prometheus_client" in sys.modules and not _values_are_multiprocess():
        log.warning(
            "prometheus_client was imported before the workers were set up: "
            "each worker's /metrics shows that worker only"
        )
        return None
    given = os.environ.get(ENV)
    if given:
        os.makedirs(given, exist_ok=True)
        for stale in glob.glob(os.path.join(given, "*.db")):
            os.unlink(stale)
        return MultiprocDir(given, owned=False)
    path = tempfile.mkdtemp(prefix="topeng-metrics-")
    os.environ[ENV] = path
    return MultiprocDir(path, owned=True)


def _values_are_multiprocess() -> bool:
    from prometheus_client import values

    return "MultiProcess" in getattr(values.ValueClass, "__qualname__", "")


def worker_started() -> None:
    """In a freshly forked worker: set this worker's gauges.

    prometheus_client gives a forked process its own file, with every value at 0: the gauges the
    parent set before forking (the rules loaded: 1) must be set again, or `livemin` would say 0.
    """
    if not enabled():
        return
    from proxy import __version__
    from proxy.observe import metrics

    metrics.RULES_LAST_RELOAD_SUCCESS.set(1)  # the parent loaded the rules before forking
    metrics.BUILD_INFO.labels(__version__).set(1)


def worker_exited(pid: int) -> None:
    """Drop the live gauges of a worker that is gone (its counters stay)."""
    if not enabled():
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def scrape_registry(default: Any) -> Any:
    """The registry a scrape should read: all workers' files in multiprocess mode."""
    if not enabled():
        return default
    from prometheus_client import CollectorRegistry, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry
