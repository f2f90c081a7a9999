"""Types of the C module proxy/_relay.c (see proxy/relay.py)."""

from proxy.wire.framing import ScanConfig

ScanTuple = tuple[int, bytes, int, int, int, int, list[tuple[int, int]], int]
"""(skip, head, partial_type, last_type, last_status, tag_seen, counts, bytes)"""

BackTuple = tuple[int, int, int, ScanTuple, ScanTuple, float, bytes, bytes, bytes]
"""(id, why, side, client, server, last_activity, to_client, to_server, chunk)"""

BACK_RECALLED: int
BACK_CHUNK: int
BACK_CLOSED: int
BACK_WRITE_ERROR: int
CHUNK: int

class Relay:
    def __init__(self) -> None: ...
    def add(
        self,
        client_fd: int,
        server_fd: int,
        client_config: ScanConfig,
        server_config: ScanConfig,
        client_state: tuple[int, bytes, int, int, int, int],
        server_state: tuple[int, bytes, int, int, int, int],
        /,
    ) -> int: ...
    def recall(self, rid: int, /) -> BackTuple: ...
    def peek(self, rid: int, /) -> BackTuple: ...
    def take(self) -> list[BackTuple]: ...
    def fileno(self) -> int: ...
    def active(self) -> int: ...
