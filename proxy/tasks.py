"""Background tasks that are never garbage-collected while they run.

asyncio keeps only a weak reference to a task; a task nobody holds can vanish mid-flight.
`spawn` keeps a strong reference until the task finishes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

_running: set[asyncio.Task[Any]] = set()


def spawn(coro: Coroutine[Any, Any, Any], *, name: str | None = None) -> asyncio.Task[Any]:
    task = asyncio.get_running_loop().create_task(coro, name=name)
    _running.add(task)
    task.add_done_callback(_running.discard)
    return task
