"""A stoppable, fault-injecting TCP relay for the fault tests (after asyncpg's test_adversity).

Strategy: the relay runs its own asyncio loop in a daemon thread, so a test may drive it from
synchronous code (psycopg, raw sockets) as well as from its own event loop (asyncpg) without the
two loops blocking each other. Every control method is thread-safe: it hands the change to the
relay's loop and waits until it has taken effect.

Faults:
- `kill_all()`: abort every relayed connection (both sides see a reset); `kill_newest()`: only
  the connection accepted last.
- `stop_accepting()` / `start_accepting()`: close the listening socket (connects are refused)
  and open it again on the same port; connections already relayed go on.
- `stall()` / `resume()`: stop forwarding in both directions without closing anything (bytes
  wait in the socket buffers, as behind a dead router); `resume()` lets them through.
- `cut_after(n, direction)`: after `n` more bytes in `direction` ("up": towards the target,
  "down": towards the client), forward exactly that many and abort the connection.
- `delay(seconds)`: hold every chunk this long before forwarding it.

With `record=True` every connection's traffic is kept as `(direction, bytes)` events in
`transcripts`, in the order the relay forwarded them (the fuzz corpus is made that way).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")
UP, DOWN = "up", "down"


@dataclass(eq=False)
class _Link:
    """One relayed connection."""

    client: asyncio.StreamWriter
    number: int
    target: asyncio.StreamWriter | None = None
    sent: dict[str, int] = field(default_factory=lambda: {UP: 0, DOWN: 0})
    budget: dict[str, int | None] = field(default_factory=lambda: {UP: None, DOWN: None})
    events: list[tuple[str, bytes]] | None = None

    def abort(self) -> None:
        for writer in (self.client, self.target):
            if writer is not None:
                with contextlib.suppress(Exception):
                    writer.transport.abort()


class FaultProxy:
    """A relay from 127.0.0.1:`port` to `target_host`:`target_port`. See the module docstring."""

    def __init__(self, target_host: str, target_port: int, *, record: bool = False) -> None:
        self.target = (target_host, target_port)
        self.record = record
        self.port = 0
        self.transcripts: list[list[tuple[str, bytes]]] = []
        self.accepted = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._flowing: asyncio.Event | None = None
        self._delay = 0.0
        self._cut: tuple[str, int] | None = None  # for connections accepted from now on

    # -- lifecycle

    def start(self) -> FaultProxy:
        self._thread.start()
        self._call(self._init_event)
        self.start_accepting()
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._run(self._close_all())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> str:
        """Topeng's --upstream (or a client's host:port) through this relay."""
        return f"postgresql://127.0.0.1:{self.port}"

    @property
    def open_links(self) -> int:
        return self._call(lambda: len(self._links))

    # -- faults

    def start_accepting(self) -> None:
        self._run(self._listen())

    def stop_accepting(self) -> None:
        self._run(self._unlisten())

    def kill_all(self) -> None:
        def kill() -> None:
            for link in list(self._links):
                link.abort()

        self._call(kill)

    def kill_newest(self) -> None:
        def kill() -> None:
            if self._links:
                max(self._links, key=lambda link: link.number).abort()

        self._call(kill)

    def stall(self) -> None:
        self._call(lambda: self._event().clear())

    def resume(self) -> None:
        self._call(lambda: self._event().set())

    def delay(self, seconds: float) -> None:
        def set_delay() -> None:
            self._delay = seconds

        self._call(set_delay)

    def cut_after(self, nbytes: int, direction: str = UP) -> None:
        """Cut every connection, current and future, after `nbytes` more bytes in `direction`."""
        assert direction in (UP, DOWN)

        def arm() -> None:
            self._cut = (direction, nbytes)
            for link in self._links:
                link.budget[direction] = link.sent[direction] + nbytes

        self._call(arm)

    def clear_cut(self) -> None:
        def disarm() -> None:
            self._cut = None
            for link in self._links:
                link.budget = {UP: None, DOWN: None}

        self._call(disarm)

    # -- plumbing (runs on the relay's loop)

    def _call(self, fn: Callable[[], T]) -> T:
        """Run fn on the relay's loop and return its result."""

        async def wrapper() -> T:
            return fn()

        return self._run(wrapper())

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(15)

    def _init_event(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()

    def _event(self) -> asyncio.Event:
        assert self._flowing is not None
        return self._flowing

    async def _listen(self) -> None:
        if self._server is not None:
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        self._server = await asyncio.start_server(self._accept, sock=sock)

    async def _unlisten(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            # Connections in flight stay: wait_closed would wait for them too.

    async def _close_all(self) -> None:
        await self._unlisten()
        for link in list(self._links):
            link.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro: Any) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._spawn(self._relay(reader, writer))

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = _Link(writer, self.accepted)
        if self.record:
            link.events = []
            self.transcripts.append(link.events)
        if self._cut is not None:
            link.budget[self._cut[0]] = self._cut[1]
        self._links.add(link)
        try:
            try:
                t_reader, t_writer = await asyncio.open_connection(*self.target)
            except OSError:
                link.abort()
                return
            link.target = t_writer
            await asyncio.gather(
                self._pump(link, UP, reader, t_writer),
                self._pump(link, DOWN, t_reader, writer),
            )
        finally:
            self._links.discard(link)
            link.abort()

    async def _pump(
        self,
        link: _Link,
        direction: str,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
    ) -> None:
        try:
            while True:
                data = await src.read(65536)
                if not data:
                    break
                await self._event().wait()
                if self._delay:
                    await asyncio.sleep(self._delay)
                    await self._event().wait()
                budget = link.budget[direction]
                cut = budget is not None and link.sent[direction] + len(data) >= budget
                if cut:
                    assert budget is not None
                    data = data[: max(budget - link.sent[direction], 0)]
                link.sent[direction] += len(data)
                if link.events is not None and data:
                    link.events.append((direction, data))
                dst.write(data)
                await dst.drain()
                if cut:
                    link.abort()
                    return
            if dst.can_write_eof():
                dst.write_eof()
        except (OSError, asyncio.IncompleteReadError):
            link.abort()
