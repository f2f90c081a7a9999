"""Unrestricted plaintext sessions relayed by a C thread, off the event loop.

Strategy: an unrestricted session forwards bytes unchanged, and Topeng only walks the message
headers (`MessageScanner`). In the event loop that is one Python callback per chunk each way,
which is most of what such a session costs. The C module `proxy._relay` (built at install, like
the masking loop; a missing compiler leaves it out) runs one thread per process that reads,
walks and writes those chunks itself, and hands the session back to the event loop whenever
anything needs Python: an ErrorResponse, a COPY, a DDL command tag, a header past the limits,
the end of either stream. The chunk that needs Python comes back unforwarded, with the scanners'
state, so the Python fast path handles it exactly as if it had seen every chunk; then the
session is handed over again.

A restricted session can be handed over GATED, with approvals the session's policy made
(`Session.gate_approvals`): the thread then forwards only the round trips of those prepared
statements whose rows it knows to pass unchanged, and hands back everything else before
forwarding it (see proxy/_relay.c). It counts what it ran per approval, with the rows and a
duration histogram, for the metrics; a request in flight when it hands back comes back too, for
`Session.replay_request`.

`Relay` wraps the thread for one event loop: `add` hands a session over, `recall` takes it back
(before Topeng itself writes to or closes the session), `peek` reads what it counted without
taking it back, and hand-backs arrive at each session's `on_back`. `TOPENG_PURE_PYTHON=1` in
the environment turns it off.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from proxy import native
from proxy.observe import metrics
from proxy.wire.framing import MessageScanner

if TYPE_CHECKING:
    # GateSpec, a gate for `Relay.add`: the approvals (`Approval.spec` of each), the finite
    # upper bounds of the duration histogram the thread fills, the rate budget the policy
    # charged ahead (`GateBudget.spec`) and the transaction status ('I', or 'T' in a block).
    from proxy._relay import BackTuple, GateSpec

__all__ = ["AVAILABLE", "GateReport", "Handback", "Relay", "ScanReport"]


_relay: Final = native.load("proxy._relay")
AVAILABLE: Final = _relay is not None
"""Whether unrestricted plaintext sessions are relayed in C (`topeng serve` logs it)."""

# Why a session came back (the BACK_* codes of _relay.c), and their metric labels.
RECALLED, CHUNK, CLOSED, WRITE_ERROR = 0, 1, 2, 3
REASONS = ("recalled", "chunk", "closed", "write_error")
CLIENT, SERVER = 0, 1


@dataclass(frozen=True, slots=True)
class ScanReport:
    """One direction, as the relay left it: the scanner's position, and the messages and
    bytes it passed since it last reported."""

    skip: int
    head: bytes
    partial_type: int
    last_type: int
    last_status: int
    tag_seen: int
    counts: list[tuple[int, int]]
    nbytes: int

    def apply(self, scanner: MessageScanner) -> None:
        scanner.absorb(
            self.skip,
            self.head,
            self.partial_type,
            self.last_type,
            self.last_status,
            self.tag_seen,
            self.counts,
        )


@dataclass(frozen=True, slots=True)
class GateReport:
    """What a gated session's thread ran since it last reported: statements run and rows
    sent per approval (in the order given to `add`), the duration histogram's bucket counts
    and sum, (when it came back) the request it had forwarded and not seen answered, and what
    its replies changed of the session's state: the transaction status and the unnamed
    portal."""

    runs: list[int]
    rows: list[int]
    buckets: list[int]
    seconds: float
    request: bytes
    inflight: int  # the approval of that request; -1: none
    status: str  # the transaction status of the last reply it forwarded (or as handed over)
    cleared: int  # a transaction ended since it last reported (its portals with it)
    bound: int  # the approval that last bound the unnamed portal and left it open; -1: none
    bound_described: int  # ... with a Describe of the portal


@dataclass(frozen=True, slots=True)
class Handback:
    """A session back from the relay (or a report on one still there, from `peek`)."""

    why: int  # RECALLED, CHUNK, CLOSED or WRITE_ERROR
    side: int  # CLIENT or SERVER: where the chunk came from, or which socket ended or failed
    client: ScanReport
    server: ScanReport
    last_activity: float  # time.monotonic() of the last client chunk relayed, 0.0 if none
    to_client: bytes  # read and walked, not yet written: to be written first
    to_server: bytes
    chunk: bytes  # CHUNK: the chunk that needs the Python path, unforwarded and unwalked
    gate: GateReport | None = None  # a gated session's report


def _handback(item: BackTuple) -> tuple[int, Handback]:
    rid, why, side, client, server, last_activity, to_client, to_server, chunk, gate = item
    return rid, Handback(
        why=why,
        side=side,
        client=ScanReport(*client),
        server=ScanReport(*server),
        last_activity=last_activity,
        to_client=to_client,
        to_server=to_server,
        chunk=chunk,
        gate=None if gate is None else GateReport(*gate),
    )


class Relay:
    """The relay thread of this process, for the sessions of one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        assert _relay is not None
        self._c = _relay.Relay()
        self._loop = loop
        self._owners: dict[int, Callable[[Handback], None]] = {}
        self._handovers = metrics.RELAY_HANDOVERS
        self._handbacks = [metrics.RELAY_HANDBACKS.labels(reason) for reason in REASONS]
        loop.add_reader(self._c.fileno(), self._on_back)

    @classmethod
    def create(cls, loop: asyncio.AbstractEventLoop) -> Relay | None:
        """A relay if the C module is in use, else None."""
        return cls(loop) if AVAILABLE else None

    def add(
        self,
        client_fd: int,
        server_fd: int,
        client: MessageScanner,
        server: MessageScanner,
        on_back: Callable[[Handback], None],
        gate: GateSpec | None = None,
    ) -> int | None:
        """Relays the session from here on; None if its scanners cannot be handed over now
        (one is collecting a watched message's body). The caller has stopped reading both
        sockets and has nothing left to write to them. `gate`: (approvals, histogram bounds)
        of a restricted session, each approval as `Approval.spec` gives it."""
        client_state, server_state = client.relay_state(), server.relay_state()
        if client_state is None or server_state is None:
            return None
        rid: int = self._c.add(
            client_fd,
            server_fd,
            client.relay_config(),
            server.relay_config(),
            client_state,
            server_state,
            gate,
        )
        self._owners[rid] = on_back
        self._handovers.inc()
        return rid

    def recall(self, rid: int) -> Handback:
        """Takes a session back, whatever it was doing."""
        self._owners.pop(rid, None)
        self._handbacks[RECALLED].inc()
        return _handback(self._c.recall(rid))[1]

    def peek(self, rid: int) -> Handback:
        """What a relayed session counted since it last reported; it stays relayed."""
        return _handback(self._c.peek(rid))[1]

    def active(self) -> int:
        """Sessions in the relay (relayed, or handed back and not yet taken)."""
        count: int = self._c.active()
        return count

    def close(self) -> None:
        """Stops watching for hand-backs (the thread lives as long as the process)."""
        if not self._loop.is_closed():
            self._loop.remove_reader(self._c.fileno())

    def _on_back(self) -> None:
        # Every owner is looked up before any is called: a callback hands its session over
        # again, and must not find another's entry (ids are never reused, but be plain).
        calls = []
        for item in self._c.take():
            rid, back = _handback(item)
            self._handbacks[back.why].inc()
            on_back = self._owners.pop(rid, None)
            if on_back is not None:
                calls.append((on_back, back))
        for on_back, back in calls:
            on_back(back)
