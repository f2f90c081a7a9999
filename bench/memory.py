"""Topeng's resident memory with many idle client connections.

A fresh Topeng per measurement, so that one measurement's freed memory does not flatter the
next. One connection is opened and closed first (imports and caches that the first session
brings in belong to the baseline), then `count` asyncpg connections are opened (startup and
SCRAM authentication through Topeng, so each also holds a PostgreSQL backend) and left idle
while VmRSS of the Topeng process is read.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from bench.report import MemoryResult
from bench.services import DATABASE, LOOPBACK, BenchError, Process, rss_kb

_CONCURRENCY = 32


async def _connect(port: int, user: str, password: str) -> Any:
    import asyncpg

    return await asyncpg.connect(
        host=LOOPBACK, port=port, user=user, password=password, database=DATABASE, ssl=False,
        timeout=60, statement_cache_size=0,
    )  # fmt: skip


async def _measure(
    topeng: Process, who: str, user: str, password: str, count: int, log: Callable[[str], None]
) -> MemoryResult:
    first = await _connect(topeng.port, user, password)
    await first.fetchval("SELECT 1")
    await first.close()
    await asyncio.sleep(0.5)
    before = rss_kb(topeng.pid)
    gate = asyncio.Semaphore(_CONCURRENCY)
    connections: list[Any] = []

    async def one() -> None:
        async with gate:
            connections.append(await _connect(topeng.port, user, password))

    started = time.monotonic()
    try:
        results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            raise BenchError(
                f"{len(failures)} of {count} connections through Topeng failed: {failures[0]!r}"
            )
        log(f"memory: {count} {who} connections open in {time.monotonic() - started:.1f} s")
        await asyncio.sleep(1.0)
        after = rss_kb(topeng.pid)
    finally:
        await asyncio.gather(*(c.close(timeout=10) for c in connections), return_exceptions=True)
    return MemoryResult(who=who, connections=count, before_kb=before, after_kb=after)


def measure_memory(
    topeng: Process, who: str, user: str, password: str, count: int, log: Callable[[str], None]
) -> MemoryResult:
    return asyncio.run(_measure(topeng, who, user, password, count, log))
