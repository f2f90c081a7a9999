"""Protocol fuzzing of the sans-I/O Session: hostile clients, a hostile upstream, no sockets.

Strategy: a fuzz case is a list of steps, each a burst of bytes from the client or from the
(fake) server, fed to `proxy.session.Session` in a random chunking (whole, one byte at a time,
random cuts). Bursts mix well-formed messages that drive the session deep into its states
(queries, extended batches, COPY, the replies a server would give) with hostile ones: random
type bytes, garbage bodies, lying lengths (short, huge, negative), truncations, startup packets
in the wrong phase, DataRows whose field lengths do not add up, RowDescriptions that do not
match their rows, ReadyForQuery with a bad status. The same is done to real sessions recorded
from asyncpg, psycopg and a raw client (corpus/sessions.json, made by record_corpus.py), with
bytes flipped, inserted, deleted and streams truncated.

Invariants, for every case:
- the only exception the session ever raises is ProtocolViolation (the caller then ends the
  session with a clear FATAL error); no AssertionError, IndexError, struct.error, ...
- every feed returns promptly (a SIGALRM watchdog turns a loop that does not end into Hang);
- fail closed: under a policy that masks column 0 of every statement, every DataRow that reaches
  the client carries the mask marker (or NULL) in column 0, and the fake server's secret never
  appears in one; under RefuseAll no DataRow reaches the client at all.

Quick form: a few hundred examples per test. Long form: TOPENG_FUZZ_SECONDS (see fuzzkit.py).
Regressions found by the fuzzer stay here as @example seeds.
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fuzzkit import run_budgeted, time_limit
from hypothesis import strategies as st
from wirekit import (
    AUTH_OK,
    BIND_COMPLETE,
    CLOSE_COMPLETE,
    COPY_DONE,
    EMPTY_QUERY,
    FLUSH,
    NO_DATA,
    PARSE_COMPLETE,
    PORTAL_SUSPENDED,
    SYNC,
    TERMINATE,
    auth_request,
    backend_key,
    bind,
    close_portal,
    close_statement,
    complete,
    copy_both_response,
    copy_data,
    copy_in_response,
    copy_out_response,
    data_row,
    describe_portal,
    describe_statement,
    error,
    execute,
    field_values,
    function_result,
    notice,
    notification,
    param_desc,
    param_status,
    parse,
    password,
    query,
    ready_session,
    row_desc,
    split_messages,
    startup,
)

from proxy.policy.decision import ColumnMask, Decision, Mask, Refuse
from proxy.policy.engine import AllowAll, RefuseAll
from proxy.session import POISON_NAME, Phase, RowLimit, RowRewriter, Session, StatementPolicy
from proxy.wire import messages as m
from proxy.wire.framing import BACKEND_TYPES, FRONTEND_TYPES, ProtocolViolation, StartupReader
from proxy.wire.startup import SSL_REQUEST, CancelRequest, StartupMessage, decode_startup_packet

pytestmark = pytest.mark.fuzz

SECRET = b"3171011708900001"  # the fake server's NIK, in column 0 of its rows
MASKED = b"xxxx"  # what the test policy's rewriter writes in column 0
FEED_SECONDS = 5.0  # a whole fuzz case takes milliseconds; this much means a loop
CORPUS = Path(__file__).resolve().parent / "corpus" / "sessions.json"

MASK = Mask({0: ColumnMask("nik", "partial")})
REFUSAL = Refuse("42501", "topeng: refused by the fuzz policy")


class MaskFirstColumn(AllowAll):
    """A restricted-like policy: every statement is masked in column 0 (NULL stays NULL, any
    other value becomes MASKED); function calls, COPY of masked data and portals it never saw
    bound are refused. What it does not override (bookkeeping hooks) is AllowAll's."""

    needs_descriptions = True

    def __init__(self, limit: RowLimit | None = None) -> None:
        self.limit = limit

    def judge_query(self, sql: str) -> Refuse | tuple[Decision, ...]:
        return tuple(MASK for part in sql.split(";") if part.strip())

    def judge_parse(self, sql: str, param_types: tuple[int, ...]) -> Decision:
        return MASK

    def judge_function_call(self, call: m.FunctionCall) -> Decision:
        return REFUSAL

    def plan_rows(
        self, decision: Decision, description: m.RowDescription, formats: tuple[int, ...]
    ) -> RowRewriter | Refuse | None:
        if not isinstance(decision, Mask):
            return REFUSAL
        columns = len(description.fields)

        def rewrite(body: memoryview) -> bytes:
            values = m.split_data_row(body)
            if len(values) != columns:  # as RowMasker does
                raise ProtocolViolation(f"DataRow has {len(values)} fields, not {columns}")
            return m.encode_data_row(
                [MASKED if i == 0 and v is not None else v for i, v in enumerate(values)]
            )

        return rewrite

    def plan_copy(self, decision: Decision, response: m.CopyResponse) -> Refuse | None:
        return REFUSAL if isinstance(decision, Mask) else None

    def row_limit(self, decision: Decision) -> RowLimit | None:
        return self.limit

    def unknown_portal(self) -> Decision:
        return REFUSAL


POLICIES: dict[str, Callable[[], StatementPolicy | None]] = {
    "fast": lambda: None,
    "allow_all": AllowAll,
    "refuse_all": lambda: RefuseAll("topeng: refused by the fuzz policy"),
    "mask": MaskFirstColumn,
    "mask_limit": lambda: MaskFirstColumn(RowLimit(2)),
    "mask_truncate": lambda: MaskFirstColumn(RowLimit(2, truncate=True)),
}
MASKING = frozenset({"mask", "mask_limit", "mask_truncate"})


# --------------------------------------------------------------------------- byte strategies


def framed(mtype: int, body: bytes) -> bytes:
    return bytes([mtype]) + struct.pack("!I", len(body) + 4) + body


def lying(mtype: int, length: int, body: bytes) -> bytes:
    """A message whose length field says `length`, followed by `body` whatever its size."""
    return bytes([mtype]) + struct.pack("!I", length) + body


LENGTHS = st.one_of(
    st.sampled_from([0, 1, 3, 4, 5, 8, 10_003, 10_005, 2**28, 2**31 - 1, 2**31, 2**32 - 1]),
    st.integers(0, 2**32 - 1),
)
NAMES = st.sampled_from(["", "s1", "p1", POISON_NAME])
SQLS = st.sampled_from(
    [
        "SELECT nik FROM customers",
        "SELECT 1; SELECT 2",
        "",
        "BEGIN",
        "COMMIT",
        "COPY t FROM STDIN",
        "COPY t TO STDOUT",
        "SELECT 'a;b'",
        "CREATE TABLE t (a int)",
    ]
)
FORMATS = st.lists(st.sampled_from([0, 1]), max_size=3).map(tuple)


def truncated(messages: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    return st.tuples(messages, st.integers(1, 12)).map(lambda t: t[0][: max(len(t[0]) - t[1], 0)])


VALID_CLIENT = st.one_of(
    SQLS.map(query),
    st.builds(
        lambda name, sql, types: parse(sql, name, types),
        NAMES,
        SQLS,
        st.lists(st.sampled_from([0, 23, 25]), max_size=2).map(tuple),
    ),
    st.builds(
        lambda portal, stmt, params, formats: bind(portal, stmt, params, formats),
        NAMES,
        NAMES,
        st.lists(field_values, max_size=2).map(tuple),
        FORMATS,
    ),
    NAMES.map(describe_statement),
    NAMES.map(describe_portal),
    st.builds(execute, NAMES, st.integers(0, 2)),
    NAMES.map(close_statement),
    NAMES.map(close_portal),
    st.sampled_from([SYNC, SYNC, FLUSH, COPY_DONE, m.CopyFail("stop").encode()]),
    st.binary(max_size=12).map(copy_data),
    st.sampled_from([0, 666, 1598]).map(lambda oid: m.FunctionCall(oid, (), (b"1",), 0).encode()),
)
HOSTILE_CLIENT = st.one_of(
    st.builds(framed, st.sampled_from(sorted(FRONTEND_TYPES)), st.binary(max_size=24)),
    st.builds(framed, st.integers(0, 255), st.binary(max_size=24)),
    st.builds(lying, st.sampled_from(sorted(FRONTEND_TYPES)), LENGTHS, st.binary(max_size=24)),
    truncated(VALID_CLIENT),
    st.sampled_from(
        [
            SSL_REQUEST,
            startup().encode(),
            CancelRequest(42, b"\0\0\0\1").encode(),
            TERMINATE,
            password("secret"),
        ]
    ),
    st.binary(min_size=1, max_size=24),
)


@st.composite
def secret_rows(draw: st.DrawFn) -> bytes:
    """A DataRow of the fake server: the secret (or NULL) in column 0, then random fields."""
    first = draw(st.sampled_from([SECRET, SECRET, None]))
    rest = draw(st.lists(field_values, max_size=3))
    return data_row(first, *rest)


@st.composite
def bad_data_rows(draw: st.DrawFn) -> bytes:
    """A DataRow whose count and field lengths do not add up to its body."""
    count = draw(st.integers(-2, 4))
    parts = [struct.pack("!h", count)]
    for _ in range(draw(st.integers(0, 4))):
        size = draw(st.sampled_from([-2, -1, 0, 3, 16, 1000, 2**31 - 1]))
        parts.append(struct.pack("!i", size) + draw(st.sampled_from([b"", SECRET, SECRET[:3]])))
    return framed(ord("D"), b"".join(parts))


ROW_DESCS = st.builds(
    lambda n, fmt: row_desc(*[f"c{i}" for i in range(n)], formats=[fmt] * n),
    st.integers(0, 4),
    st.sampled_from([0, 1]),
)
STATUSES = st.sampled_from([b"I", b"T", b"E", b"X", b"\0", b"", b"II"])
SERVER_REPLY = st.one_of(
    ROW_DESCS,
    secret_rows(),
    st.sampled_from(["SELECT 1", "SELECT 0", "INSERT 0 1", "CREATE TABLE", "COPY 1", ""]).map(
        complete
    ),
    STATUSES.map(lambda status: framed(ord("Z"), status)),
    st.sampled_from(
        [
            error(),
            m.error_response("57P01", "terminating connection", severity="FATAL"),
            notice("hello"),
            param_status("client_encoding", "LATIN1"),
            param_status("client_encoding", "nonsense"),
            PARSE_COMPLETE,
            BIND_COMPLETE,
            CLOSE_COMPLETE,
            NO_DATA,
            PORTAL_SUSPENDED,
            EMPTY_QUERY,
            param_desc(23),
            copy_in_response(),
            copy_out_response(),
            copy_both_response(),
            COPY_DONE,
            copy_data(SECRET + b"\t1\n"),
            function_result(SECRET),
            notification("ch", "payload"),
            backend_key(),
            auth_request(),
            AUTH_OK,
        ]
    ),
)


@st.composite
def server_results(draw: st.DrawFn) -> bytes:
    """What a server plausibly answers to one statement: a result set, then maybe Ready."""
    columns = draw(st.integers(1, 3))
    rows = draw(st.integers(0, 4))
    out = []
    if draw(st.booleans()):
        out += [PARSE_COMPLETE, BIND_COMPLETE]
    out.append(row_desc(*[f"c{i}" for i in range(columns)]))
    out += [data_row(SECRET, *([b"v"] * (columns - 1))) for _ in range(rows)]
    out.append(complete(f"SELECT {rows}"))
    if draw(st.booleans()):
        out.append(framed(ord("Z"), draw(STATUSES)))
    return b"".join(out)


HOSTILE_SERVER = st.one_of(
    bad_data_rows(),
    st.builds(framed, st.sampled_from(sorted(BACKEND_TYPES)), st.binary(max_size=24)),
    st.builds(framed, st.integers(0, 255), st.binary(max_size=24)),
    st.builds(lying, st.sampled_from(sorted(BACKEND_TYPES)), LENGTHS, st.binary(max_size=24)),
    truncated(SERVER_REPLY),
    st.binary(min_size=1, max_size=24),
)


def bursts(valid: st.SearchStrategy[bytes], hostile: st.SearchStrategy[bytes]) -> st.Strategy:
    """A burst of 1 to 5 messages, mostly well formed."""
    one = st.one_of(valid, valid, valid, hostile)
    return st.lists(one, min_size=1, max_size=5).map(b"".join)


CLIENT_BURSTS = bursts(VALID_CLIENT, HOSTILE_CLIENT)
SERVER_BURSTS = bursts(st.one_of(SERVER_REPLY, server_results()), HOSTILE_SERVER)
STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("client"), CLIENT_BURSTS),
        st.tuples(st.just("server"), SERVER_BURSTS),
    ),
    max_size=10,
)


# --------------------------------------------------------------------------- driving a session


@dataclass
class Run:
    """What one fuzz case made the session say."""

    to_client: bytearray = field(default_factory=bytearray)
    to_server: bytearray = field(default_factory=bytearray)
    violation: ProtocolViolation | None = None


def chunked(data: bytes, rng: random.Random) -> list[bytes]:
    how = rng.randrange(3)
    if how == 0:
        return [data]
    if how == 1:
        return [data[i : i + 1] for i in range(len(data))]
    out, pos = [], 0
    while pos < len(data):
        size = rng.randint(1, 9)
        out.append(data[pos : pos + size])
        pos += size
    return out


def drive(
    session: Session,
    steps: Sequence[tuple[str, bytes]],
    seed: int,
    policy: Callable[[], StatementPolicy | None] | None = None,
) -> Run:
    """Feed every step; stop at the first ProtocolViolation (the session is over then).

    When the session reaches SETUP and `policy` is given, it is handed over with that policy.
    Any exception other than ProtocolViolation propagates and fails the test.
    """
    rng = random.Random(seed)
    run = Run()
    with time_limit(FEED_SECONDS):
        try:
            for side, data in steps:
                for chunk in chunked(data, rng):
                    if side == "client":
                        run.to_server += session.from_client(chunk)
                    else:
                        run.to_client += session.from_server(chunk)
                    run.to_server += session.take_to_server()
                    run.to_client += session.take_to_client()
                    if policy is not None and session.phase is Phase.SETUP:
                        run.to_server += session.begin(policy=policy())
                        run.to_server += session.take_to_server()
                        run.to_client += session.take_to_client()
        except ProtocolViolation as exc:
            run.violation = exc
    return run


def assert_fail_closed(name: str, to_client: bytes) -> None:
    """No row of the fake server reaches the client without its masking plan applied: no
    DataRow unmasked in column 0 (where the fake server puts its secret), and the secret in no
    CopyData of a COPY OUT Topeng announced to the client. (Stray CopyData outside any COPY
    and the function result of a refused call have regression tests of their own, below.)"""
    in_copy_out = False
    for msg in split_messages(bytes(to_client)):
        kind = msg[:1]
        if kind == b"H":
            in_copy_out = True
        elif kind in (b"c", b"Z", b"E"):
            in_copy_out = False
        elif kind == b"d" and in_copy_out:
            assert SECRET not in msg, f"the secret reached the client in a COPY: {msg!r}"
        elif kind == b"D":
            assert name != "refuse_all", f"a DataRow passed RefuseAll: {msg!r}"
            values = m.split_data_row(memoryview(msg)[5:])
            if values:
                assert values[0] is None or bytes(values[0]) == MASKED, f"unmasked row {msg!r}"


# --------------------------------------------------------------------------- the tests


AUTH_SERVER = bursts(
    st.one_of(
        st.sampled_from(
            [
                auth_request(),
                auth_request(m.AUTH_SASL, b"SCRAM-SHA-256\0\0"),
                auth_request(m.AUTH_SASL_CONTINUE, b"r=abc"),
                AUTH_OK,
                backend_key(),
                param_status("client_encoding", "UTF8"),
                param_status("client_encoding", "LATIN1"),
                notice("hi"),
                m.NegotiateProtocolVersion(0, ("_pq_.x",)).encode(),
                m.error_response("28P01", "password authentication failed", severity="FATAL"),
            ]
        ),
        STATUSES.map(lambda status: framed(ord("Z"), status)),
    ),
    st.one_of(HOSTILE_SERVER, SERVER_REPLY),
)
AUTH_CLIENT = bursts(
    st.one_of(st.binary(max_size=20).map(lambda b: framed(ord("p"), b)), VALID_CLIENT),
    HOSTILE_CLIENT,
)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_authentication_and_setup(name: str) -> None:
    """From the StartupMessage on: the password exchange, the server's verdict, the handover
    (with Topeng's own queries answered by the fake server), then anything."""

    def check(
        auth_steps: list[tuple[str, bytes]],
        later: list[tuple[str, bytes]],
        internal: bool,
        seed: int,
    ) -> None:
        session = Session(startup())
        run = drive(session, auth_steps, seed)
        if run.violation is None and session.phase is Phase.SETUP:
            try:
                if internal:
                    session.start_internal("SELECT 1")
                    run.to_server += session.take_to_server()
                    more = drive(session, later[:2], seed)
                    run.to_client += more.to_client
                    if more.violation is not None or session.phase is not Phase.SETUP:
                        return
                    if len(session._queue):  # the internal query has not finished
                        return
                run.to_server += session.begin(policy=POLICIES[name]())
            except ProtocolViolation:
                return
            run.to_client += session.take_to_client()
            more = drive(session, later, seed)
            run.to_client += more.to_client
        if name in MASKING or name == "refuse_all":
            assert_fail_closed(name, run.to_client)

    run_budgeted(
        check,
        st.lists(
            st.one_of(
                st.tuples(st.just("client"), AUTH_CLIENT),
                st.tuples(st.just("server"), AUTH_SERVER),
            ),
            max_size=8,
        ),
        st.lists(
            st.one_of(
                st.tuples(st.just("client"), CLIENT_BURSTS),
                st.tuples(st.just("server"), SERVER_BURSTS),
            ),
            max_size=5,
        ),
        st.booleans(),
        st.integers(0, 2**16),
        quick=150,
    )


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_ready_streams(name: str) -> None:
    """A handed-over session, fast or tracked, under mixed client and server bursts."""

    def check(steps: list[tuple[str, bytes]], seed: int) -> None:
        pb = ready_session(POLICIES[name]())
        run = drive(pb.session, steps, seed)
        if name in MASKING or name == "refuse_all":
            assert_fail_closed(name, run.to_client)

    run_budgeted(check, STEPS, st.integers(0, 2**16), quick=150)


@pytest.mark.parametrize("name", sorted(MASKING | {"refuse_all"}))
def test_hostile_server_after_real_statements(name: str) -> None:
    """The client sends ordinary statements; the fake server answers with anything, mostly
    result sets carrying the secret. Fail closed whatever it says."""

    def check(client: bytes, server: bytes, seed: int) -> None:
        pb = ready_session(POLICIES[name]())
        run = drive(pb.session, [("client", client), ("server", server)], seed)
        assert_fail_closed(name, run.to_client)

    run_budgeted(
        check,
        st.lists(VALID_CLIENT, min_size=1, max_size=6).map(b"".join),
        st.lists(st.one_of(server_results(), SERVER_REPLY, HOSTILE_SERVER), max_size=8).map(
            b"".join
        ),
        st.integers(0, 2**16),
        quick=150,
    )


# --------------------------------------------------------------------------- conversations


@st.composite
def exchange(draw: st.DrawFn) -> tuple[list[bytes], list[bytes]]:
    """One statement as a client sends it and the server's coherent reply, message by message:
    simple or extended (with or without Describe, with a row limit on Execute), COPY TO STDOUT,
    a function call, or an error."""
    columns = draw(st.integers(1, 3))
    rows = draw(st.integers(0, 4))
    desc = row_desc(
        *[f"c{i}" for i in range(columns)], formats=[draw(st.sampled_from([0, 1]))] * columns
    )
    data = [data_row(SECRET, *([b"v"] * (columns - 1))) for _ in range(rows)]
    kind = draw(
        st.sampled_from(["simple", "extended", "no_describe", "statement", "copy", "call", "error"])
    )
    status = draw(st.sampled_from(["I", "I", "T"]))
    ready_msg = framed(ord("Z"), status.encode())
    name = draw(st.sampled_from(["", "s1"]))
    if kind == "simple":
        return [query("SELECT nik FROM customers")], [
            desc,
            *data,
            complete(f"SELECT {rows}"),
            ready_msg,
        ]
    if kind == "copy":
        return [query("COPY customers TO STDOUT")], [
            copy_out_response(columns),
            copy_data(SECRET + b"\n"),
            COPY_DONE,
            complete("COPY 1"),
            ready_msg,
        ]
    if kind == "call":
        return [m.FunctionCall(1598, (), (), 0).encode()], [function_result(SECRET), ready_msg]
    if kind == "error":
        return [query("SELECT nik FROM nowhere")], [error("42P01", "no such table"), ready_msg]
    max_rows = draw(st.sampled_from([0, 0, 1, 2]))
    suspended = 0 < max_rows < rows
    end = PORTAL_SUSPENDED if suspended else complete(f"SELECT {rows}")
    shown = data[:max_rows] if suspended else data
    sql = "SELECT nik FROM customers WHERE id = $1"
    if kind == "statement":
        return [
            parse(sql, name, (23,)),
            describe_statement(name),
            SYNC,
            bind("", name, (b"1",)),
            execute("", max_rows),
            SYNC,
        ], [
            PARSE_COMPLETE,
            param_desc(23),
            desc,
            ready_msg,
            BIND_COMPLETE,
            *shown,
            end,
            ready_msg,
        ]
    client = [parse(sql, name, (23,)), bind("", name, (b"1",))]
    if kind == "extended":
        client.append(describe_portal(""))
    client += [execute("", max_rows), SYNC]
    return client, [PARSE_COMPLETE, BIND_COMPLETE, desc, *shown, end, ready_msg]


MESSAGE_MUTATIONS = ("drop", "duplicate", "swap", "replace", "insert", "columns", "status")


@st.composite
def conversations(draw: st.DrawFn) -> list[tuple[str, bytes]]:
    """Coherent exchanges, pipelined or one at a time, then mutated message by message on the
    server side (dropped, duplicated, swapped, replaced by or preceded by hostile messages,
    DataRows that disagree with their RowDescription, ReadyForQuery with a bad status)."""
    pairs = draw(st.lists(exchange(), min_size=1, max_size=4))
    server = [msg for _, reply in pairs for msg in reply]
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(MESSAGE_MUTATIONS))
        i = draw(st.integers(0, len(server) - 1)) if server else 0
        if not server:
            break
        if op == "drop":
            del server[i]
        elif op == "duplicate":
            server.insert(i, server[i])
        elif op == "swap" and i + 1 < len(server):
            server[i], server[i + 1] = server[i + 1], server[i]
        elif op == "replace":
            server[i] = draw(st.one_of(HOSTILE_SERVER, SERVER_REPLY))
        elif op == "insert":
            server.insert(i, draw(st.one_of(HOSTILE_SERVER, SERVER_REPLY, secret_rows())))
        elif op == "columns" and server[i][:1] == b"D":
            first = draw(st.sampled_from([SECRET, None]))
            server[i] = data_row(first, *draw(st.lists(st.sampled_from([None, b"v"]), max_size=4)))
        elif op == "status" and server[i][:1] == b"Z":
            server[i] = framed(ord("Z"), draw(STATUSES))
    if draw(st.booleans()):  # pipelined: every statement first, then every reply
        client_bytes = b"".join(b"".join(c) for c, _ in pairs)
        return [("client", client_bytes), ("server", b"".join(server))]
    steps: list[tuple[str, bytes]] = []
    pos = 0
    for client, reply in pairs:
        steps.append(("client", b"".join(client)))
        steps.append(("server", b"".join(server[pos : pos + len(reply)])))
        pos += len(reply)
    if pos < len(server):
        steps.append(("server", b"".join(server[pos:])))
    return steps


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_conversations_with_a_misbehaving_server(name: str) -> None:
    """Deep states: real statement/reply exchanges with the server's side mutated."""

    def check(steps: list[tuple[str, bytes]], seed: int) -> None:
        pb = ready_session(POLICIES[name]())
        run = drive(pb.session, steps, seed)
        if name in MASKING or name == "refuse_all":
            assert_fail_closed(name, run.to_client)

    run_budgeted(check, conversations(), st.integers(0, 2**16), quick=150)


def test_conversations_reach_masked_rows() -> None:
    """The conversation strategy is not vacuous: unmutated, masked rows reach the client, and
    a policy that forgets to mask is caught by the fail-closed check."""
    steps = [
        ("client", query("SELECT nik FROM customers")),
        ("server", row_desc("nik") + data_row(SECRET) + complete("SELECT 1") + framed(90, b"I")),
    ]
    run = drive(ready_session(MaskFirstColumn()).session, steps, 0)
    assert run.violation is None
    assert data_row(MASKED) in bytes(run.to_client)
    assert_fail_closed("mask", run.to_client)
    leaky = drive(ready_session(AllowAll()).session, steps, 0)
    with pytest.raises(AssertionError):
        assert_fail_closed("mask", leaky.to_client)


# --------------------------------------------------------------------------- regressions

READY_I = framed(ord("Z"), b"I")


@pytest.mark.parametrize("name", ["mask", "refuse_all"])
def test_refused_function_call_result_is_not_forwarded(name: str) -> None:
    """Found by test_conversations_with_a_misbehaving_server. PostgreSQL answers the poison
    FunctionCall(0) with an error, so only a misbehaving upstream gets here; fail closed
    would be a ProtocolViolation (or the refusal) instead of the server's value."""
    steps = [
        ("client", m.FunctionCall(1598, (), (), 0).encode()),
        ("server", function_result(SECRET) + READY_I),
    ]
    run = drive(ready_session(POLICIES[name]()).session, steps, 0)
    assert SECRET not in bytes(run.to_client)


@pytest.mark.parametrize("name", ["mask", "refuse_all"])
def test_stray_copy_data_is_not_forwarded(name: str) -> None:
    """Found by test_conversations_with_a_misbehaving_server (the CopyOutResponse dropped).
    Fail closed: CopyData outside a COPY Topeng has planned is a ProtocolViolation."""
    steps = [
        ("client", query("COPY customers TO STDOUT")),
        ("server", copy_data(SECRET + b"\n") + COPY_DONE + complete("COPY 1") + READY_I),
    ]
    run = drive(ready_session(POLICIES[name]()).session, steps, 0)
    assert SECRET not in bytes(run.to_client)


# --------------------------------------------------------------------------- recorded sessions


def load_corpus() -> list[list[tuple[str, bytes]]]:
    sessions = json.loads(CORPUS.read_text())
    return [[(d, bytes.fromhex(h)) for d, h in events] for events in sessions]


Steps = list[tuple[str, bytes]]


def split_startup(events: Steps) -> tuple[StartupMessage, Steps]:
    """The recorded StartupMessage, and the rest of the transcript as steps."""
    direction, first = events[0]
    assert direction == "up"
    reader = StartupReader()
    reader.feed(first)
    packet = reader.next_packet()
    assert packet is not None
    startup_message = decode_startup_packet(*packet)
    assert isinstance(startup_message, StartupMessage)
    rest = reader.take_rest()
    steps = [("client", rest)] if rest else []
    steps += [("client" if d == "up" else "server", data) for d, data in events[1:]]
    return startup_message, steps


CORPUS_SESSIONS = load_corpus()


@pytest.mark.parametrize("index", range(len(CORPUS_SESSIONS)))
@pytest.mark.parametrize("name", ["fast", "allow_all"])
def test_recorded_session_replays_byte_for_byte(name: str, index: int) -> None:
    """Unmutated, a recorded session passes through unchanged (the corpus is sound)."""
    startup_message, steps = split_startup(CORPUS_SESSIONS[index])
    session = Session(startup_message)
    run = drive(session, steps, seed=index, policy=POLICIES[name])
    assert run.violation is None
    assert bytes(run.to_client) == b"".join(d for side, d in steps if side == "server")
    assert bytes(run.to_server) == b"".join(d for side, d in steps if side == "client")


MUTATIONS = ("flip", "insert", "delete", "truncate", "duplicate", "swap")


def mutate(steps: Steps, rng: random.Random, count: int) -> Steps:
    out = list(steps)
    for _ in range(count):
        if not out:
            break
        op = rng.choice(MUTATIONS)
        i = rng.randrange(len(out))
        side, data = out[i]
        pos = rng.randrange(len(data) + 1)
        if op == "flip" and data:
            pos = min(pos, len(data) - 1)
            data = data[:pos] + bytes([data[pos] ^ (1 << rng.randrange(8))]) + data[pos + 1 :]
        elif op == "insert":
            data = data[:pos] + rng.randbytes(rng.randint(1, 8)) + data[pos:]
        elif op == "delete":
            data = data[:pos] + data[pos + rng.randint(1, 8) :]
        elif op == "truncate":
            out = [*out[:i], (side, data[:pos])]
            continue
        elif op == "duplicate":
            out.insert(i, (side, data))
        elif op == "swap" and i + 1 < len(out):
            out[i], out[i + 1] = out[i + 1], out[i]
            continue
        out[i] = (side, data)
    return out


@pytest.mark.parametrize("name", ["fast", "allow_all", "mask", "mask_limit", "refuse_all"])
def test_recorded_sessions_mutated(name: str) -> None:
    """Real asyncpg, psycopg and raw sessions with bytes flipped, inserted, deleted, whole
    packets duplicated or swapped, streams cut short."""

    def check(index: int, count: int, seed: int) -> None:
        startup_message, steps = split_startup(CORPUS_SESSIONS[index])
        rng = random.Random(seed)
        session = Session(startup_message)
        run = drive(session, mutate(steps, rng, count), seed, policy=POLICIES[name])
        if name in MASKING or name == "refuse_all":
            assert_fail_closed(name, run.to_client)

    run_budgeted(
        check,
        st.integers(0, len(CORPUS_SESSIONS) - 1),
        st.integers(1, 4),
        st.integers(0, 2**32),
        quick=150,
    )
