"""Builders for PostgreSQL message sequences and a Playbook to drive a Session without sockets.

A test says: the client sends these messages, the server answers with those, and the session
must pass on exactly these bytes. `Playbook` feeds each side's bytes through a chunking (whole,
one byte at a time, ...) and gathers everything the session returns or queues, so the same
test runs under every chunking and must give the same output.
"""

from __future__ import annotations

import random
import select
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from hypothesis import strategies as st

from proxy.policy.decision import (
    ALLOW,
    INSUFFICIENT_PRIVILEGE,
    Allow,
    ColumnMask,
    Decision,
    Mask,
    Refuse,
)
from proxy.session import RowLimit, Session
from proxy.wire import messages as m
from proxy.wire.framing import BACKEND_TYPES, Limits, MessageReader
from proxy.wire.startup import PROTOCOL_3_0, StartupMessage

# --------------------------------------------------------------------------- chunkings

Chunking = Callable[[bytes], list[bytes]]


def whole(data: bytes) -> list[bytes]:
    return [data] if data else []


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def random_chunks(seed: int) -> Chunking:
    def chunk(data: bytes) -> list[bytes]:
        rng = random.Random(seed + len(data))
        out = []
        pos = 0
        while pos < len(data):
            size = rng.randint(1, 7)
            out.append(data[pos : pos + size])
            pos += size
        return out

    return chunk


def cut(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    """Split data at the given offsets (sorted, deduplicated, clipped)."""
    points = sorted({c for c in cuts if 0 < c < len(data)})
    out = []
    prev = 0
    for c in [*points, len(data)]:
        out.append(data[prev:c])
        prev = c
    return out


# --------------------------------------------------------------------------- framing helpers

ANY_LIMITS = Limits(
    max_message=1 << 30,
    allowed_types=frozenset(range(256)),
    small_types=frozenset(),
)


def split_messages(data: bytes) -> list[bytes]:
    """Whole typed messages (header included) of a byte string; it must end on a boundary."""
    reader = MessageReader(ANY_LIMITS)
    reader.feed(data)
    out = []
    while (msg := reader.next_raw()) is not None:
        out.append(bytes(msg[2]))
    assert reader.pending() == 0, f"{reader.pending()} bytes after the last whole message"
    return out


def types_of(data: bytes) -> str:
    """The type letters of the messages in data, e.g. 'TDDCZ'."""
    return "".join(chr(msg[0]) for msg in split_messages(data))


def join(*msgs: bytes) -> bytes:
    return b"".join(msgs)


# --------------------------------------------------------------------------- client messages


def startup(user: str = "agent_budi", database: str = "bank", **extra: str) -> StartupMessage:
    params = [("user", user), ("database", database), *extra.items()]
    return StartupMessage(PROTOCOL_3_0, tuple(params))


def password(secret: str) -> bytes:
    return m.frame(b"p", m.cstr(secret))


def query(sql: str) -> bytes:
    return m.Query(sql).encode()


def parse(sql: str, name: str = "", param_types: tuple[int, ...] = ()) -> bytes:
    return m.Parse(name, sql, param_types).encode()


def bind(
    portal: str = "",
    statement: str = "",
    params: tuple[bytes | None, ...] = (),
    result_formats: tuple[int, ...] = (),
) -> bytes:
    return m.Bind(portal, statement, (), params, result_formats).encode()


def describe_statement(name: str = "") -> bytes:
    return m.Describe("S", name).encode()


def describe_portal(name: str = "") -> bytes:
    return m.Describe("P", name).encode()


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    return m.Execute(portal, max_rows).encode()


def close_statement(name: str) -> bytes:
    return m.Close("S", name).encode()


def close_portal(name: str) -> bytes:
    return m.Close("P", name).encode()


def copy_data(data: bytes) -> bytes:
    return m.CopyData(data).encode()


SYNC = m.SYNC
FLUSH = m.FLUSH
TERMINATE = m.TERMINATE
COPY_DONE = m.COPY_DONE


def extended(sql: str, *, name: str = "", portal: str = "") -> bytes:
    """Parse/Bind/Describe portal/Execute/Sync of one statement, as libpq's PQexecParams."""
    return join(
        parse(sql, name),
        bind(portal, name),
        describe_portal(portal),
        execute(portal),
        SYNC,
    )


# --------------------------------------------------------------------------- server messages

TEXT_OID = 25
INT4_OID = 23
CUSTOMER_OID = 16401


def auth_request(code: int = m.AUTH_CLEARTEXT, data: bytes = b"") -> bytes:
    return m.Authentication(code, data).encode()


AUTH_OK = m.AUTHENTICATION_OK


def param_status(name: str, value: str) -> bytes:
    return m.ParameterStatus(name, value).encode()


def backend_key(pid: int = 4242, key: bytes = b"\x01\x02\x03\x04") -> bytes:
    return m.BackendKeyData(pid, key).encode()


def ready(status: str = "I") -> bytes:
    return m.ReadyForQuery(status).encode()


def field_desc(
    name: str,
    *,
    table_oid: int = CUSTOMER_OID,
    column: int = 1,
    type_oid: int = TEXT_OID,
    fmt: int = 0,
) -> m.FieldDescription:
    return m.FieldDescription(name, table_oid, column, type_oid, -1, -1, fmt)


def row_desc(*names: str, formats: Sequence[int] | None = None) -> bytes:
    fmts = formats if formats is not None else [0] * len(names)
    return m.RowDescription(
        tuple(
            field_desc(n, column=i + 1, fmt=f)
            for i, (n, f) in enumerate(zip(names, fmts, strict=True))
        )
    ).encode()


def data_row(*values: str | bytes | None) -> bytes:
    return m.encode_data_row([v.encode() if isinstance(v, str) else v for v in values])


def complete(tag: str) -> bytes:
    return m.CommandComplete(tag).encode()


def error(
    sqlstate: str = "42601",
    message: str = "syntax error",
    *,
    detail: str | None = None,
    hint: str | None = None,
) -> bytes:
    return m.error_response(sqlstate, message, detail=detail, hint=hint)


def notice(message: str) -> bytes:
    return m.notice_response(message)


def notification(channel: str, payload: str, pid: int = 77) -> bytes:
    return m.NotificationResponse(pid, channel, payload).encode()


def param_desc(*oids: int) -> bytes:
    return m.ParameterDescription(tuple(oids)).encode()


def copy_out_response(columns: int = 1) -> bytes:
    return m.CopyResponse(b"H", 0, (0,) * columns).encode()


def copy_in_response(columns: int = 1) -> bytes:
    return m.CopyResponse(b"G", 0, (0,) * columns).encode()


def copy_both_response() -> bytes:
    return m.CopyResponse(b"W", 0, ()).encode()


def function_result(value: bytes | None) -> bytes:
    return m.FunctionCallResponse(value).encode()


PARSE_COMPLETE = m.PARSE_COMPLETE
BIND_COMPLETE = m.BIND_COMPLETE
CLOSE_COMPLETE = m.CLOSE_COMPLETE
NO_DATA = m.NO_DATA
PORTAL_SUSPENDED = m.PORTAL_SUSPENDED
EMPTY_QUERY = m.EMPTY_QUERY_RESPONSE

# What PostgreSQL answers to POISON_SQL.
POISON_ERROR = error("42601", 'syntax error at or near "TOPENG_REFUSED"')


def rows_reply(names: Sequence[str], rows: Sequence[Sequence[str | None]], tag: str = "") -> bytes:
    """RowDescription, the DataRows and CommandComplete of one SELECT."""
    return join(
        row_desc(*names),
        *(data_row(*r) for r in rows),
        complete(tag or f"SELECT {len(rows)}"),
    )


# --------------------------------------------------------------------------- a test policy

REFUSE_MARKER = "FORBIDDEN"
EXECUTE_REFUSE_MARKER = "RATED"  # judged fine at Parse, refused at each Execute
MASK_MARKER = "MASKME"
MASKED = b"xxxx"

MARKER_REFUSAL = Refuse(
    INSUFFICIENT_PRIVILEGE,
    "topeng: statement refused by rule test.marker",
    detail="the statement contains FORBIDDEN",
    hint="remove FORBIDDEN from the statement",
)


@dataclass
class MarkerPolicy:
    """Refuses SQL containing REFUSE_MARKER; masks column 0 of statements containing
    MASK_MARKER (replacing the value with MASKED); allows everything else.

    A simple query is split on ';' into one decision per statement when any statement masks.
    Every plan_rows call is recorded.
    """

    plans: list[tuple[Decision, m.RowDescription, tuple[int, ...]]] = field(default_factory=list)
    judged: list[str] = field(default_factory=list)
    limit: RowLimit | None = None  # row_limit() for every statement
    refuse_rows: Refuse | None = None  # plan_rows() answer for every result, when set
    needs_descriptions: bool = False  # ask for a RowDescription of every Execute
    sent: list[int] = field(default_factory=list)  # rows_sent() calls
    statement_timeout: float | None = None

    def _decide(self, sql: str) -> Decision:
        if REFUSE_MARKER in sql:
            return MARKER_REFUSAL
        if MASK_MARKER in sql:
            return Mask({0: ColumnMask("nik", "redact")})
        return ALLOW

    def judge_query(self, sql: str) -> Refuse | Allow | tuple[Decision, ...]:
        self.judged.append(sql)
        if REFUSE_MARKER in sql:
            return MARKER_REFUSAL
        if MASK_MARKER not in sql:
            return ALLOW
        return tuple(self._decide(s) for s in sql.split(";") if s.strip())

    def judge_parse(self, sql: str, param_types: tuple[int, ...]) -> Decision:
        self.judged.append(sql)
        return self._decide(sql)

    generation = 0

    def judge_execute(self, sql: str, generation: int) -> tuple[Decision | None, int]:
        return (MARKER_REFUSAL if EXECUTE_REFUSE_MARKER in sql else None), 0

    def judge_function_call(self, call: m.FunctionCall) -> Decision:
        if call.function_oid == 666:
            return MARKER_REFUSAL
        return ALLOW

    def plan_rows(
        self, decision: Decision, description: m.RowDescription, formats: tuple[int, ...]
    ) -> Callable[[memoryview], bytes] | Refuse | None:
        self.plans.append((decision, description, formats))
        if self.refuse_rows is not None:
            return self.refuse_rows
        if not isinstance(decision, Mask):
            return None
        columns = set(decision.columns)

        def rewrite(body: memoryview) -> bytes:
            values = m.split_data_row(body)
            return m.encode_data_row(
                [MASKED if i in columns and v is not None else v for i, v in enumerate(values)]
            )

        return rewrite

    def row_limit(self, decision: Decision) -> RowLimit | None:
        return self.limit

    def unknown_portal(self) -> Decision:
        return UNKNOWN_PORTAL_REFUSAL

    def plan_copy(self, decision: Decision, response: m.CopyResponse) -> object:
        if isinstance(decision, Mask):
            return UpperCopy()
        return None

    def rows_sent(self, decision: Decision, rows: int) -> None:
        self.sent.append(rows)

    def check_parameter(self, name: str, value: str) -> Refuse | None:
        return None

    def scrub(self, decision: Decision | None, error: m.ErrorFields) -> m.ErrorFields | None:
        return None


class UpperCopy:
    """A COPY rewriter for tests: upper-cases the data, marks the end."""

    def feed(self, data: bytes) -> bytes:
        return data.upper()

    def finish(self) -> bytes:
        return b"END\n"


UNKNOWN_PORTAL_REFUSAL = Refuse("0A000", "topeng: rows of a portal Topeng did not see bound")


def refusal_bytes(refusal: Refuse = MARKER_REFUSAL) -> bytes:
    """The ErrorResponse a client sees for a refusal."""
    return m.error_response(
        refusal.sqlstate, refusal.message, detail=refusal.detail, hint=refusal.hint
    )


# --------------------------------------------------------------------------- the Playbook


@dataclass
class Flow:
    """What the session produced for one feed: bytes to the server and to the client."""

    to_server: bytes = b""
    to_client: bytes = b""


class Playbook:
    """Drives a Session: feed one side's bytes through a chunking, collect both directions."""

    def __init__(self, session: Session, chunking: Chunking = whole) -> None:
        self.session = session
        self.chunking = chunking

    def client(self, *msgs: bytes) -> Flow:
        flow = Flow()
        for chunk in self.chunking(b"".join(msgs)):
            flow.to_server += self.session.from_client(chunk)
            flow.to_server += self.session.take_to_server()
            flow.to_client += self.session.take_to_client()
        return flow

    def server(self, *msgs: bytes) -> Flow:
        flow = Flow()
        for chunk in self.chunking(b"".join(msgs)):
            flow.to_client += self.session.from_server(chunk)
            flow.to_client += self.session.take_to_client()
            flow.to_server += self.session.take_to_server()
        return flow

    def to_server(self, *msgs: bytes) -> bytes:
        """Client sends msgs; returns what goes to the server, checking nothing goes back."""
        flow = self.client(*msgs)
        assert flow.to_client == b"", split_messages(flow.to_client)
        return flow.to_server

    def to_client(self, *msgs: bytes) -> bytes:
        """Server sends msgs; returns what goes to the client, checking nothing goes back."""
        flow = self.server(*msgs)
        assert flow.to_server == b"", split_messages(flow.to_server)
        return flow.to_client


HANDSHAKE = join(
    AUTH_OK,
    param_status("server_version", "15.4"),
    param_status("client_encoding", "UTF8"),
    backend_key(),
)


def authenticated(chunking: Chunking = whole, **startup_params: str) -> Playbook:
    """A session through cleartext authentication, in SETUP with ReadyForQuery held."""
    session = Session(startup(**startup_params))
    pb = Playbook(session, chunking)
    assert pb.to_client(auth_request()) == auth_request()
    assert pb.to_server(password("s3cret")) == password("s3cret")
    assert pb.to_client(HANDSHAKE, ready("I")) == HANDSHAKE
    return pb


def ready_session(policy: object | None, chunking: Chunking = whole) -> Playbook:
    """A session handed over to the client (fast without a policy, else tracked)."""
    pb = authenticated(chunking)
    assert pb.session.begin(policy=policy) == b""  # type: ignore[arg-type]
    assert pb.session.take_to_client() == ready("I")
    assert pb.session.take_to_server() == b""
    return pb


# --------------------------------------------------------------------------- hypothesis

# Text PostgreSQL strings can carry: no NUL, no lone surrogates.
pg_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"))
int16s = st.integers(-(2**15), 2**15 - 1)
uint16s = st.integers(0, 2**16 - 1)
int32s = st.integers(-(2**31), 2**31 - 1)
uint32s = st.integers(0, 2**32 - 1)
field_values = st.one_of(st.none(), st.binary(max_size=40))


@st.composite
def typed_messages(draw: st.DrawFn, types: frozenset[int] = BACKEND_TYPES) -> bytes:
    mtype = draw(st.sampled_from(sorted(types)))
    body = draw(st.binary(max_size=40))
    return m.frame(bytes([mtype]), body)


def message_streams(types: frozenset[int] = BACKEND_TYPES) -> st.SearchStrategy[list[bytes]]:
    return st.lists(typed_messages(types), max_size=25)


def chunkings_of(data: bytes) -> st.SearchStrategy[list[bytes]]:
    """Strategies for cutting data into chunks at arbitrary points (empty chunks included)."""
    return st.lists(st.integers(0, len(data)), max_size=20).map(
        lambda cuts: _cut_keep_empty(data, cuts)
    )


def _cut_keep_empty(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted(cuts)
    out = []
    prev = 0
    for c in [*points, len(data)]:
        out.append(data[prev:c])
        prev = c
    return out


def send_all(sock: socket.socket, data: bytes) -> None:
    """All of `data` on a non-blocking socket, waiting while its buffer is full."""
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            select.select([], [sock], [], 1.0)
