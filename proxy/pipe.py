"""One side of a proxied connection as an asyncio Protocol.

Strategy: during the startup phase a connection is read with `await read()`; once the session
is established the hot path switches to callbacks (`on_data`), so every chunk is handled where it
arrives with no task switch. Flow control couples the two sides: when one side's write buffer
is full, the other side stops reading until it drains.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Pipe(asyncio.Protocol):
    __slots__ = (
        "transport",
        "peer",
        "on_data",
        "on_lost",
        "closed",
        "_buf",
        "_eof",
        "_waiter",
        "_paused_peer",
    )

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Pipe | None = None
        self.on_data: Callable[[bytes], None] | None = None
        self.on_lost: Callable[[Exception | None], None] | None = None
        self.closed = False
        self._buf = bytearray()
        self._eof = False
        self._waiter: asyncio.Future[None] | None = None
        self._paused_peer = False

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self.on_data is not None:
            self.on_data(data)
            return
        self._buf += data
        self._wake()

    def eof_received(self) -> bool | None:
        self._eof = True
        self._wake()
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._eof = True
        self._wake()
        if self.peer is not None and self._paused_peer:
            self._paused_peer = False
        if self.on_lost is not None:
            callback, self.on_lost = self.on_lost, None
            callback(exc)

    def pause_writing(self) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.closed:
            peer.transport.pause_reading()
            self._paused_peer = True

    def resume_writing(self) -> None:
        peer = self.peer
        if self._paused_peer and peer is not None and peer.transport is not None:
            self._paused_peer = False
            if not peer.closed:
                peer.transport.resume_reading()

    @property
    def holding_peer(self) -> bool:
        """This side's writes are backed up, so its peer has stopped reading."""
        return self._paused_peer

    # -- reading during setup

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def read(self) -> bytes:
        """What has arrived, waiting for something; b"" at end of stream."""
        while not self._buf and not self._eof:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def take_buffered(self) -> bytes:
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def write(self, data: bytes) -> None:
        if data and self.transport is not None and not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()
