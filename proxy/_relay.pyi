"""Types of the C module proxy/_relay.c (see proxy/relay.py)."""

from proxy.wire.framing import ScanConfig

ScanTuple = tuple[int, bytes, int, int, int, int, list[tuple[int, int]], int]
"""(skip, head, partial_type, last_type, last_status, tag_seen, counts, bytes)"""

GateTuple = tuple[list[int], list[int], list[int], float, bytes, int, str, int, int, int]
"""(runs, rows, buckets, seconds, request, inflight, status, cleared, bound, bound_described)"""

BackTuple = tuple[int, int, int, ScanTuple, ScanTuple, float, bytes, bytes, bytes, GateTuple | None]
"""(id, why, side, client, server, last_activity, to_client, to_server, chunk, gate)"""

GateSpec = tuple[
    tuple[
        tuple[bytes, bytes, bytes, bool, int, tuple[tuple[bytes, int], ...] | None, bytes], ...
    ],
    tuple[float, ...],
    tuple[int, int, float],
    str,
]
"""((name, formats, description, bare, max_rows, template, command), ...), histogram bounds,
budget, transaction status"""

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
        gate: GateSpec | None = None,
        /,
    ) -> int: ...
    def recall(self, rid: int, /) -> BackTuple: ...
    def peek(self, rid: int, /) -> BackTuple: ...
    def take(self) -> list[BackTuple]: ...
    def fileno(self) -> int: ...
    def active(self) -> int: ...
