"""The C relay thread (proxy/_relay.c) between two socketpairs, against MessageScanner.

The relay must forward every byte exactly once and in order, walk the headers exactly as the
Python fast path does (its final state, fed the same stream, equals MessageScanner's), and hand
a session back, with the chunk unforwarded, whenever a message needs Python. A small driver
plays the event loop's part: it hands the session over, takes hand-backs, runs the handed-back
chunk through a MessageScanner as the fast path would, and hands the session over again.
"""

from __future__ import annotations

import asyncio
import select
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from harness import needs_tool
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wirekit import send_all

from proxy import relay as relays
from proxy.session import DDL_TAGS
from proxy.wire.framing import (
    BACKEND_LIMITS,
    FRONTEND_LIMITS,
    Limits,
    MessageScanner,
    ProtocolViolation,
)

if relays.AVAILABLE:
    from proxy import _relay


@pytest.fixture(autouse=True)
def _built() -> None:
    if not relays.AVAILABLE:
        needs_tool("the C module proxy._relay is not built (pip install -e . builds it)")


READY, CMD_COMPLETE, ERROR, COPY_IN, DATA_ROW = (ord(c) for c in "ZCEGD")
WATCHED = frozenset((COPY_IN, ERROR))
SERVER_LIMITS = Limits(
    max_message=1 << 20, allowed_types=BACKEND_LIMITS.allowed_types, small_types=frozenset()
)


def server_scanner() -> MessageScanner:
    return MessageScanner(
        SERVER_LIMITS,
        WATCHED,
        status_type=READY,
        tag_type=CMD_COMPLETE,
        tag_prefixes=DDL_TAGS,
    )


def client_scanner() -> MessageScanner:
    return MessageScanner(FRONTEND_LIMITS, frozenset())


def msg(mtype: str, body: bytes) -> bytes:
    return mtype.encode() + (len(body) + 4).to_bytes(4, "big") + body


@dataclass
class Driver:
    """Two socketpairs with the relay between them, and the event loop's part in Python."""

    client_scan: MessageScanner = field(default_factory=client_scanner)
    server_scan: MessageScanner = field(default_factory=server_scanner)
    handbacks: list[relays.Handback] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    python_chunks: int = 0  # chunks the Python path relayed while the relay did not have it

    hub: Hub | None = None  # a relay shared with other drivers; else one of its own

    def __post_init__(self) -> None:
        self.client_app, self.client_end = socket.socketpair()
        self.server_end, self.server_app = socket.socketpair()
        for s in (self.client_app, self.client_end, self.server_end, self.server_app):
            s.setblocking(False)
        self.relay = self.hub.wrapper._c if self.hub is not None else _relay.Relay()
        self.rid: int | None = None
        self.hand_over()

    def close(self) -> None:
        self.recall()
        for s in (self.client_app, self.client_end, self.server_end, self.server_app):
            s.close()

    def hand_over(self) -> None:
        """Hands the session over if the scanners allow (as Connection._try_relay)."""
        cstate, sstate = self.client_scan.relay_state(), self.server_scan.relay_state()
        if cstate is None or sstate is None:
            return  # a watched body is being collected: Python goes on until it is whole
        if self.hub is not None:
            cfd, sfd = self.client_end.fileno(), self.server_end.fileno()
            scans = self.client_scan, self.server_scan
            self.rid = self.hub.wrapper.add(cfd, sfd, *scans, self.on_back)
            return
        self.rid = self.relay.add(
            self.client_end.fileno(),
            self.server_end.fileno(),
            self.client_scan.relay_config(),
            self.server_scan.relay_config(),
            cstate,
            sstate,
        )

    def _apply(self, item: _relay.BackTuple) -> relays.Handback:
        back = relays._handback(item)[1]
        back.client.apply(self.client_scan)
        back.server.apply(self.server_scan)
        return back

    def _feed(self, scan: MessageScanner, dest: socket.socket, chunk: bytes) -> None:
        """The Python fast path for one chunk: walk it, forward it. A ReadyForQuery or
        CommandComplete split across chunks comes out of the scanner whole, and is read as
        Session._fast_watched reads it."""
        try:
            watched = scan.feed(chunk)
        except ProtocolViolation as exc:
            self.violations.append(str(exc))
            return  # the session would end here
        for mtype, body in watched or ():
            if mtype == READY:
                scan.last_status = body[0] if body else ord("I")
            elif mtype == CMD_COMPLETE and body.startswith(DDL_TAGS):
                scan.tag_seen = True
        send_all(dest, chunk)

    def _resume(self, back: relays.Handback) -> None:
        """What Connection._relay_back does: pending bytes first, then the chunk through the
        Python fast path, then hand over again."""
        self.handbacks.append(back)
        send_all(self.client_end, back.to_client)
        send_all(self.server_end, back.to_server)
        if back.chunk:
            if back.side == relays.CLIENT:
                self._feed(self.client_scan, self.server_end, back.chunk)
            else:
                self._feed(self.server_scan, self.client_end, back.chunk)
        if back.why == relays.CHUNK and not self.violations:
            self.hand_over()

    def python_relay(self) -> None:
        """While the session is not handed over: the Python fast path, a chunk at a time,
        handing over again after each (as Connection's on_client and on_server do)."""
        for src, scan, dest in (
            (self.client_end, self.client_scan, self.server_end),
            (self.server_end, self.server_scan, self.client_end),
        ):
            if self.rid is not None or self.violations:
                return
            try:
                chunk = src.recv(1 << 18)
            except BlockingIOError:
                continue
            self.python_chunks += 1
            self._feed(scan, dest, chunk)
            if not self.violations:
                self.hand_over()

    def recall(self) -> relays.Handback | None:
        if self.rid is None:
            return None
        back = self._apply(self.relay.recall(self.rid))
        self.rid = None
        return back

    def service(self) -> None:
        if self.hub is not None:
            self.hub.service()
        else:
            for item in self.relay.take():
                self.take_back(item)
        if self.rid is None:
            self.python_relay()

    def take_back(self, item: _relay.BackTuple) -> None:
        assert item[0] == self.rid
        self.rid = None
        self._resume(self._apply(item))

    def on_back(self, back: relays.Handback) -> None:
        """A hand-back through proxy.relay.Relay, as Connection._relay_back gets it."""
        self.rid = None
        back.client.apply(self.client_scan)
        back.server.apply(self.server_scan)
        self._resume(back)

    def stream(self, data: bytes, chunks: list[int], *, from_server: bool = True) -> bytes:
        """Sends `data` in pieces of the given sizes from one app end; returns what reached
        the other app end."""
        src, dst = self.server_app, self.client_app
        if not from_server:
            src, dst = dst, src
        got = bytearray()
        pos, i = 0, 0
        deadline = time.monotonic() + 30
        while len(got) < len(data) and not self.violations:
            assert time.monotonic() < deadline, f"stuck at {len(got)} of {len(data)}"
            if pos < len(data):
                size = chunks[i % len(chunks)]
                i += 1
                try:
                    pos += src.send(data[pos : pos + size])
                except BlockingIOError:
                    pass
            self.service()
            watch = [dst, self.relay.fileno(), self.client_end, self.server_end]
            readable, _, _ = select.select(watch, [], [], 0.05)
            if dst in readable:
                try:
                    got += dst.recv(1 << 20)
                except BlockingIOError:
                    pass
        self.service()
        return bytes(got)


class Hub:
    """One relay shared by several drivers through proxy.relay.Relay, which routes each
    hand-back to its session's callback (its event loop is not run: `service` does what the
    loop's reader callback does)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.wrapper = relays.Relay(self.loop)

    def service(self) -> None:
        self.wrapper._on_back()

    def close(self) -> None:
        self.wrapper.close()
        self.loop.close()


@pytest.fixture
def driver() -> Iterator[Driver]:
    d = Driver()
    yield d
    d.close()


def assert_same_state(relayed: MessageScanner, reference: MessageScanner) -> None:
    assert relayed.counts == reference.counts
    assert relayed.last_type == reference.last_type
    assert relayed.last_status == reference.last_status
    assert relayed.partial_type == reference.partial_type
    assert relayed.at_boundary() == reference.at_boundary()


# -- server streams ---------------------------------------------------------------------------

PLAIN_MESSAGES = st.one_of(
    st.binary(max_size=300).map(lambda b: msg("D", b)),
    st.binary(min_size=60_000, max_size=300_000).map(lambda b: msg("D", b)),
    st.sampled_from([b"SELECT 1\0", b"UPDATE 3\0", b"COPY 2\0"]).map(lambda t: msg("C", t)),
    st.sampled_from(b"ITE").map(lambda s: msg("Z", bytes([s]))),
    st.binary(max_size=40).map(lambda b: msg("N", b)),
    st.just(msg("T", b"\x00\x00")),
)
WATCHED_MESSAGES = st.one_of(
    st.just(msg("E", b"SERROR\0C42P01\0Mno such table\0\0")),
    st.just(msg("G", b"\x00\x00\x00")),
    st.sampled_from([b"CREATE TABLE\0", b"ALTER TABLE\0", b"DROP VIEW\0"]).map(
        lambda t: msg("C", t)
    ),
)
CHUNKS = st.lists(st.integers(min_value=1, max_value=70_000), min_size=1, max_size=8)


def relayed_stream(data: bytes, chunks: list[int]) -> Driver:
    """A driver that has streamed `data` from the server in pieces of `chunks` and taken the
    session back; its scanners are checked against a MessageScanner fed `data`."""
    d = Driver()
    try:
        assert d.stream(data, chunks) == data
        d.recall()
        reference = server_scanner()
        reference.feed(data)
        assert_same_state(d.server_scan, reference)
    finally:
        d.close()
    return d


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    messages=st.lists(st.one_of(PLAIN_MESSAGES, WATCHED_MESSAGES), min_size=1, max_size=25),
    chunks=CHUNKS,
)
def test_any_stream_in_any_pieces_is_forwarded_whole_and_walked_alike(
    messages: list[bytes], chunks: list[int]
) -> None:
    d = relayed_stream(b"".join(messages), chunks)
    ddl = [m for m in messages if m[0] == CMD_COMPLETE and m[5:].startswith(DDL_TAGS)]
    watched = [m for m in messages if m[0] in WATCHED] + ddl
    chunk_backs = [b for b in d.handbacks if b.why == relays.CHUNK]
    if watched:
        assert chunk_backs, "a message that needs Python went through without it"
    # At most one hand-back per message of a type the scanner reads (split or watched).
    assert len(chunk_backs) <= sum(1 for m in messages if m[0] in b"CZEG")


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    messages=st.lists(
        st.one_of(
            st.binary(max_size=300).map(lambda b: msg("D", b)),
            st.sampled_from([b"SELECT 1\0", b"UPDATE 3\0"]).map(lambda t: msg("C", t)),
            st.sampled_from(b"ITE").map(lambda s: msg("Z", bytes([s]))),
        ),
        min_size=1,
        max_size=30,
    )
)
def test_whole_plain_messages_never_need_python(messages: list[bytes]) -> None:
    """Small whole messages in one write (the relay reads them whole): no hand-back at all."""
    data = b"".join(messages)
    d = relayed_stream(data, [len(data)])
    assert d.handbacks == [] and d.python_chunks == 0


def test_a_ddl_tag_comes_back_before_the_client_sees_it(driver: Driver) -> None:
    ddl = msg("C", b"CREATE TABLE\0") + msg("Z", b"I")
    driver.server_app.send(ddl)
    deadline = time.monotonic() + 10
    while not driver.handbacks:
        assert time.monotonic() < deadline
        select.select([driver.relay.fileno()], [], [], 0.1)
        items = driver.relay.take()
        for item in items:
            driver.rid = None
            back = driver._apply(item)
            # Handed back unforwarded: nothing has reached the client yet.
            with pytest.raises(BlockingIOError):
                driver.client_app.recv(100)
            assert back.why == relays.CHUNK and back.side == relays.SERVER
            assert back.chunk == ddl
            driver._resume(back)
    assert driver.server_scan.tag_seen
    assert driver.server_scan.last_status == ord("I")


def test_a_message_over_the_limits_comes_back_and_is_refused(driver: Driver) -> None:
    huge = b"Q" + (FRONTEND_LIMITS.max_message + 100).to_bytes(4, "big") + b"x" * 100
    driver.stream(huge, [len(huge)], from_server=False)
    assert driver.violations and "over the limit" in driver.violations[0]
    assert driver.handbacks[-1].why == relays.CHUNK
    assert driver.handbacks[-1].side == relays.CLIENT


def test_a_header_split_across_chunks_is_followed(driver: Driver) -> None:
    data = msg("D", b"abc") + msg("Z", b"T") + msg("D", b"x" * 10)
    # One byte at a time: every header and body is split.
    assert driver.stream(data, [1]) == data
    driver.recall()
    reference = server_scanner()
    reference.feed(data)
    assert_same_state(driver.server_scan, reference)
    assert driver.server_scan.last_status == ord("T")


def test_peek_reports_counts_once_and_leaves_the_session_relayed(driver: Driver) -> None:
    rows = msg("D", b"row") * 5 + msg("C", b"SELECT 5\0") + msg("Z", b"I")
    assert driver.stream(rows, [len(rows)]) == rows
    assert driver.rid is not None
    first = driver._apply(driver.relay.peek(driver.rid))
    assert dict(first.server.counts)[DATA_ROW] == 5
    assert first.server.nbytes == len(rows)
    again = driver._apply(driver.relay.peek(driver.rid))
    assert again.server.counts == [] and again.server.nbytes == 0
    assert driver.server_scan.counts[DATA_ROW] == 5
    # Still relayed: more traffic flows without a hand-back.
    assert driver.stream(rows, [len(rows)]) == rows
    assert driver.handbacks == []


def test_a_slow_reader_holds_bytes_that_a_recall_returns(driver: Driver) -> None:
    """The client stops reading: the relay keeps what it cannot write and stops reading the
    server; a recall hands those bytes back to be written first, so nothing is lost."""
    big = msg("D", b"v" * 1_000_000) * 8
    sent = 0
    deadline = time.monotonic() + 10
    while sent < len(big) and time.monotonic() < deadline:
        try:
            sent += driver.server_app.send(big[sent : sent + 65536])
        except BlockingIOError:
            time.sleep(0.01)
    assert sent < len(big), "the relay should have stopped reading the server"
    back = driver.recall()
    assert back.to_client, "bytes read but not yet written come back"
    # The event loop's part: write them first, then relay the rest in Python.
    got = bytearray()
    pending = back.to_client
    while len(got) < sent:
        if pending:
            try:
                n = driver.client_end.send(pending)
                pending = pending[n:]
            except BlockingIOError:
                pass
        if not pending:
            try:
                more = driver.server_end.recv(1 << 20)
                pending = more
            except BlockingIOError:
                pass
        try:
            got += driver.client_app.recv(1 << 20)
        except BlockingIOError:
            pass
    assert bytes(got) == big[:sent]


def test_end_of_stream_hands_the_session_back(driver: Driver) -> None:
    driver.client_app.close()
    deadline = time.monotonic() + 10
    items: list[_relay.BackTuple] = []
    while not items:
        assert time.monotonic() < deadline
        select.select([driver.relay.fileno()], [], [], 0.1)
        items = driver.relay.take()
    back = driver._apply(items[0])
    driver.rid = None
    assert back.why == relays.CLOSED and back.side == relays.CLIENT
    assert back.chunk == b""
    driver.client_app = socket.socket()  # closed above; close() needs something to close


def test_client_activity_is_timed(driver: Driver) -> None:
    before = time.monotonic()
    q = msg("Q", b"SELECT 1\0")
    assert driver.stream(q, [len(q)], from_server=False) == q
    assert driver.rid is not None
    back = driver._apply(driver.relay.peek(driver.rid))
    assert before <= back.last_activity <= time.monotonic()
    assert dict(back.client.counts)[ord("Q")] == 1


def test_a_session_handed_back_is_not_in_the_relay_any_more(driver: Driver) -> None:
    assert driver.relay.active() == 1
    driver.recall()
    assert driver.relay.active() == 0
    with pytest.raises(KeyError):
        driver.relay.recall(0)
    driver.hand_over()
    assert driver.relay.active() == 1


def test_sessions_sharing_the_relay_keep_their_own_bytes() -> None:
    """Twelve sessions on one relay, each handed back and over again many times (an error
    every few messages): each client receives exactly its own server's bytes."""
    hub = Hub()
    drivers = [Driver(hub=hub) for _ in range(12)]
    error = msg("E", b"SERROR\0C22012\0Mdivision by zero\0\0")
    streams = [
        b"".join(
            msg("D", f"session {i} row {k};".encode() * (1 + k % 40))
            + (error if k % 3 == 0 else msg("C", b"SELECT 1\0"))
            + msg("Z", b"I")
            for k in range(150)
        )
        for i in range(len(drivers))
    ]
    sent = [0] * len(drivers)
    got = [bytearray() for _ in drivers]
    deadline = time.monotonic() + 60
    try:
        while any(len(g) < len(data) for g, data in zip(got, streams, strict=True)):
            assert time.monotonic() < deadline, [len(g) for g in got]
            for i, d in enumerate(drivers):
                if sent[i] < len(streams[i]):
                    try:
                        sent[i] += d.server_app.send(streams[i][sent[i] : sent[i] + 3000])
                    except BlockingIOError:
                        pass
            hub.service()
            for d in drivers:
                if d.rid is None:
                    d.python_relay()
            time.sleep(0.001)
            for i, d in enumerate(drivers):
                try:
                    got[i] += d.client_app.recv(1 << 20)
                except BlockingIOError:
                    pass
        for i, d in enumerate(drivers):
            assert bytes(got[i]) == streams[i], f"session {i}"
            assert d.handbacks, "each session was handed back at least once"
            assert not d.violations
    finally:
        for d in drivers:
            d.close()
        hub.close()


def test_slots_are_taken_again_and_the_table_grows() -> None:
    """150 sessions at once (the slot table starts with room for 64), all taken back, then
    handed over again: they take the same slots again, and each still relays its own bytes."""
    hub = Hub()
    drivers = [Driver(hub=hub) for _ in range(150)]
    try:
        slots = {d.rid & 0xFFFFFFFF for d in drivers if d.rid is not None}
        assert len(slots) == 150 and hub.wrapper.active() == 150
        for d in drivers[::2]:
            d.recall()
        assert hub.wrapper.active() == 75
        for d in drivers[::2]:
            d.hand_over()
        assert {d.rid & 0xFFFFFFFF for d in drivers if d.rid is not None} == slots
        assert hub.wrapper.active() == 150
        for i, d in enumerate(drivers):
            d.server_app.send(msg("D", f"row {i}".encode()))
        deadline = time.monotonic() + 20
        for i, d in enumerate(drivers):
            want = msg("D", f"row {i}".encode())
            got = b""
            while len(got) < len(want):
                assert time.monotonic() < deadline, f"session {i}"
                try:
                    got += d.client_app.recv(1 << 16)
                except BlockingIOError:
                    time.sleep(0.001)
            assert got == want
    finally:
        for d in drivers:
            d.close()
        hub.close()
