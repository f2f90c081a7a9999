"""One client's conversation with the database, sans-I/O.

Strategy: the session is fed the bytes each side sends (`from_client`, `from_server`) and
returns the bytes to pass on; anything it must say itself (a refusal, a fatal error) is queued
and taken with `take_to_client()` / `take_to_server()`. It never touches a socket and never
imports asyncio, so every behaviour here is tested by feeding bytes.

A session goes through three phases:

- AUTH: the client's StartupMessage has gone to the server and the password exchange is relayed
  as it is. The server's verdict comes back unchanged; AuthenticationOk makes the user known.
- SETUP: the server has said ReadyForQuery for the first time. Topeng holds that message back
  while the caller decides the session's role (possibly running its own queries on this same
  upstream connection with `start_internal`), then calls `begin(...)`.
- READY: normal traffic, in one of two modes.

  * `fast` (unrestricted roles): nothing needs changing, so bytes are forwarded as they came, in
    whole chunks; a `MessageScanner` walks only the message headers to keep the transaction
    state and counts.
  * `tracked` (restricted roles): every client message is framed and judged, and a queue of the
    replies the server owes (`Pending`) ties every RowDescription, DataRow and CommandComplete
    to the statement and portal that produced it, under pipelining and after errors
    (the server skips to Sync after an error in the extended protocol, and so does the queue).

Refusals keep the server authoritative: a refused message is replaced by a "poison" message
that the server is certain to reject (a syntax error, an unknown portal), and the server's
error is then replaced by Topeng's refusal. So the transaction state, skip-until-Sync and every
later reply come from PostgreSQL itself, exactly as if PostgreSQL had refused the statement.
"""

from __future__ import annotations

import enum
import struct
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol, runtime_checkable

from proxy.policy.decision import ALLOW, Allow, Decision, Mask, Refuse
from proxy.policy.template import HOLE_END, Template
from proxy.wire import messages as m
from proxy.wire.framing import (
    BACKEND_LIMITS,
    FRONTEND_LIMITS,
    INT32,
    TYPED_HEADER,
    Limits,
    MessageReader,
    MessageScanner,
    ProtocolViolation,
)
from proxy.wire.startup import StartupMessage

# Message type bytes.
Q, P, B, DESC, E, CLOSE, S, H, F, X = (ord(c) for c in "QPBDECSHFX")
COPY_DATA, COPY_DONE, COPY_FAIL, PASSWORD = (ord(c) for c in "dcfp")
AUTH, KEY, PARAM_STATUS, READY = (ord(c) for c in "RKSZ")
ROW_DESC, DATA_ROW, CMD_COMPLETE, EMPTY_QUERY = (ord(c) for c in "TDCI")
ERROR, NOTICE, NOTIFY, PARAM_DESC, NO_DATA = (ord(c) for c in "ENAtn")
PARSE_OK, BIND_OK, CLOSE_OK, SUSPENDED = (ord(c) for c in "123s")
COPY_IN, COPY_OUT, COPY_BOTH, FUNC_RESULT, NEGOTIATE = (ord(c) for c in "GHWVv")

# What a refused message is replaced with: statements the server is certain to reject.
POISON_SQL = "TOPENG_REFUSED"
POISON_NAME = "topeng_refused\x01"  # no client can have created a statement of this name

# What NoData describes: a statement that returns no columns.
NO_COLUMNS = m.RowDescription(())

# Extended-protocol messages: a batch of them is open until a Sync.
BATCH_TYPES = frozenset((P, B, DESC, E, CLOSE, H))

# PostgreSQL client_encoding names and the Python codecs that read them. Every string in the
# protocol after startup (SQL, statement and portal names, column names, error and notice text,
# notification payloads) is in the client_encoding. The two encodings Python has no codec for
# (EUC_TW, MULE_INTERNAL) are read as latin-1: every byte string decodes and encodes back to
# itself, so an unrestricted session's bytes still pass unchanged (restricted sessions may only
# use UTF8, see proxy.policy.decide).
PG_CODECS = {
    "UTF8": "utf-8",
    "UNICODE": "utf-8",
    "SQL_ASCII": "latin-1",
    "LATIN1": "latin-1",
    "LATIN2": "iso8859-2",
    "LATIN3": "iso8859-3",
    "LATIN4": "iso8859-4",
    "LATIN5": "iso8859-9",
    "LATIN6": "iso8859-10",
    "LATIN7": "iso8859-13",
    "LATIN8": "iso8859-14",
    "LATIN9": "iso8859-15",
    "LATIN10": "iso8859-16",
    "ISO_8859_5": "iso8859-5",
    "ISO_8859_6": "iso8859-6",
    "ISO_8859_7": "iso8859-7",
    "ISO_8859_8": "iso8859-8",
    "WIN866": "cp866",
    "WIN874": "cp874",
    "WIN1250": "cp1250",
    "WIN1251": "cp1251",
    "WIN1252": "cp1252",
    "WIN1253": "cp1253",
    "WIN1254": "cp1254",
    "WIN1255": "cp1255",
    "WIN1256": "cp1256",
    "WIN1257": "cp1257",
    "WIN1258": "cp1258",
    "KOI8R": "koi8-r",
    "KOI8U": "koi8-u",
    "EUC_JP": "euc_jp",
    "EUC_JIS_2004": "euc_jis_2004",
    "EUC_CN": "gb2312",
    "EUC_KR": "euc_kr",
    "JOHAB": "johab",
    "UHC": "cp949",
    "SJIS": "shift_jis",
    "SHIFT_JIS_2004": "shift_jis_2004",
    "GBK": "gbk",
    "GB18030": "gb18030",
    "BIG5": "big5",
}


def pg_codec(client_encoding: str) -> str:
    """The Python codec of a PostgreSQL client_encoding name, as ParameterStatus reports it."""
    return PG_CODECS.get(client_encoding.upper().replace("-", "_"), "latin-1")


# CommandComplete tags after which the schema may have changed.
DDL_TAGS = (b"CREATE", b"ALTER", b"DROP", b"COMMENT", b"GRANT", b"REVOKE", b"SECURITY LABEL")


class Phase(enum.Enum):
    AUTH = "auth"
    SETUP = "setup"
    READY = "ready"
    CLOSED = "closed"


class Kind(enum.Enum):
    """What reply group a Pending entry waits for."""

    SIMPLE = "simple"  # Query: results until ReadyForQuery
    INTERNAL = "internal"  # Topeng's own Query: results go to Topeng, not the client
    PARSE = "parse"
    BIND = "bind"
    DESCRIBE_STATEMENT = "describe_statement"
    DESCRIBE_PORTAL = "describe_portal"
    EXECUTE = "execute"
    CLOSE = "close"
    SYNC = "sync"
    FUNCTION = "function"
    POISON = "poison"  # Topeng's failing Query that aborts the server's transaction
    COPY_END = "copy_end"  # marker: the client ended a COPY it had not yet been asked for


EXTENDED = frozenset(
    {
        Kind.PARSE,
        Kind.BIND,
        Kind.DESCRIBE_STATEMENT,
        Kind.DESCRIBE_PORTAL,
        Kind.EXECUTE,
        Kind.CLOSE,
    }
)


# Entries whose reply group ends with ReadyForQuery.
GROUP_ENDS = frozenset({Kind.SIMPLE, Kind.SYNC, Kind.FUNCTION})
DESCRIBES = frozenset({Kind.DESCRIBE_STATEMENT, Kind.DESCRIBE_PORTAL})


class RowRewriter(Protocol):
    """Rewrites one DataRow body; returns the whole new message.

    A rewriter may also have `run(buf, start, max_rows, max_len) -> (messages, end, rows)`:
    the whole DataRow messages of `buf` from `start` (at most `max_rows`, length words of at
    most `max_len`) rewritten in one call (the C loop of proxy.policy.fastmask has one);
    without it the session rewrites a run of rows one by one.
    """

    def __call__(self, body: memoryview) -> bytes: ...


class StatementPolicy(Protocol):
    """Judges what a restricted role sends; implemented by proxy.policy.

    A policy may also have `passes(decision, description, formats) -> bool`: True only when
    `plan_rows` would return None for these very objects without planning anything new (it
    remembered so, under the rules in force). With it, the session handles a reply group of
    the common shape in one step instead of message by message; without it, never.
    """

    def judge_query(self, sql: str) -> Refuse | Allow | tuple[Decision, ...]:
        """A simple-protocol Query: one decision per statement, a refusal of the whole, or
        Allow for the whole (every statement, whatever it returns, passes unchanged)."""
        ...

    def judge_parse(self, sql: str, param_types: tuple[int, ...]) -> Decision: ...

    def judge_function_call(self, call: m.FunctionCall) -> Decision: ...

    @property
    def generation(self) -> int:
        """Which rules the policy judges by now (it changes when the rules are reloaded)."""
        ...

    def judge_execute(self, sql: str, generation: int) -> tuple[Decision | None, int]:
        """Each Execute of a statement prepared under rules `generation`: a new decision if
        the rules changed (None: the prepared one stands; a Refuse refuses the execution), and
        the generation it belongs to. Rates are charged per execution."""
        ...

    def plan_rows(
        self, decision: Decision, description: m.RowDescription, formats: tuple[int, ...]
    ) -> RowRewriter | Refuse | None:
        """How to rewrite the rows of one result; None when they pass as they are; a Refuse
        when the result must not reach the client at all (the row description disagrees with
        the analysis, say): the statement is then cancelled and ends with that error."""
        ...

    def row_limit(self, decision: Decision) -> RowLimit | None:
        """The most rows one result of this statement may have."""
        ...

    def unknown_portal(self) -> Decision:
        """What to do with rows of a portal Topeng never saw bound."""
        ...

    def plan_copy(
        self, decision: Decision, response: m.CopyResponse
    ) -> CopyRewriter | Refuse | None:
        """How to rewrite the data of a COPY ... TO STDOUT; None when it passes as it is."""
        ...

    def rows_sent(self, decision: Decision, rows: int) -> None:
        """A result ended after `rows` rows reached the client (for rate limits)."""
        ...

    @property
    def statement_timeout(self) -> float | None:
        """Seconds a statement may run before Topeng cancels it (None: no limit)."""
        ...

    def check_parameter(self, name: str, value: str) -> Refuse | None:
        """A server parameter changed (ParameterStatus): a Refuse ends the session."""
        ...

    def scrub(self, decision: Decision | None, error: m.ErrorFields) -> m.ErrorFields | None:
        """An ErrorResponse or NoticeResponse of a statement, made safe to show; None when it
        passes as it is."""
        ...

    @property
    def needs_descriptions(self) -> bool:
        """Whether every result must be checked against its RowDescription (Topeng asks for
        one itself when the client did not)."""
        ...


@runtime_checkable
class GatePolicy(StatementPolicy, Protocol):
    """A policy whose approved statements the relay thread may run on its own (the gate;
    RestrictedPolicy)."""

    def gateable(self) -> bool:
        """Whether the role has nothing the thread cannot do per statement (rules followed)."""
        ...

    def passes(
        self, decision: Decision, description: m.RowDescription, formats: tuple[int, ...]
    ) -> bool:
        """Whether these rows are known to pass unchanged under the rules in force."""
        ...

    def approve_query(self, sql: str) -> Refuse | Allow | tuple[Decision, ...]:
        """`judge_query` without charging the statement to a rate: it is not run here."""
        ...

    def query_template(self, sql: str) -> Template | None:
        """The template of a simple query, or None."""
        ...

    def gate_row_limit(self) -> int:
        """The most rows one gated reply may hold (0: no limit); rates are the budget's."""
        ...

    def reserve_gate(self, release: Callable[[], None]) -> GateBudget | None:
        """The rate budget to hand over with the session, charged ahead; None: not now."""
        ...

    def gate_ran(self, decision: Decision, runs: int, rows: int) -> None:
        """Statements the thread ran and the rows they sent."""
        ...

    def end_gate(self, in_flight: bool = False) -> None:
        """The session is back: the unused budget is given back."""
        ...

    replaying: bool
    """A request the thread forwarded is being replayed: judged as it was then."""


@dataclass(slots=True)
class Statement:
    """A prepared statement as Topeng knows it."""

    name: str
    sql: str
    decision: Decision
    description: m.RowDescription | None = None
    created: bool = False  # ParseComplete seen
    closing: bool = False  # a Close for it is on its way to the server
    generation: int = 0  # the policy's rules generation its decision was made under
    described: bool = False  # a Describe for it was sent (its reply may be on its way)
    # The result formats of a Bind and the RowDescription message (bytes) of a whole reply
    # group that passed unchanged: what the gate may approve (Session.gate_approvals).
    passed: tuple[tuple[int, ...], bytes] | None = None
    # The result formats of a Bind, Execute, Sync (no Describe: the statement's description
    # stands for the portal's) whose rows passed unchanged.
    passed_bare: tuple[int, ...] | None = None


@dataclass(frozen=True, slots=True)
class Approval:
    """What the relay thread may run on its own (proxy/relay.py, the gate).

    A prepared statement (`template` None): Bind of the unnamed portal to `name` with these
    result formats (the tail of the Bind body), Describe of the portal (if `description`; none
    if `bare`), Execute, Sync. A simple
    query (`template`): one Query whose text fills the template's holes (see
    proxy/policy/template.py). Either way the reply must describe the rows as `description`
    did (the whole message, byte for byte) and hold at most `max_rows` rows (0: no limit);
    `decision` is what the policy decided for them. A command (`command`): one Query of
    exactly the template's text (a transaction-control statement: BEGIN, COMMIT, ...), whose
    reply is exactly that CommandComplete message and a ReadyForQuery.
    """

    decision: Decision
    name: bytes
    formats: bytes
    description: bytes
    max_rows: int
    template: Template | None = None
    bare: bool = False  # Bind, Execute, Sync without Describe too (the reply has no description)
    # A command (a transaction-control Query, its text the template): its CommandComplete.
    command: bytes = b""
    # A prepared statement's: the statement and the result formats of its Bind.
    statement: str = ""
    result_formats: tuple[int, ...] = ()

    def spec(self) -> tuple[bytes, bytes, bytes, bool, int, Template | None, bytes]:
        """As the C module takes it: (name, formats, description, bare, max_rows, template,
        command)."""
        return (
            self.name,
            self.formats,
            self.description,
            self.bare,
            self.max_rows,
            self.template,
            self.command,
        )


@dataclass(frozen=True, slots=True)
class GateBudget:
    """What the relay thread may spend of the user's rate limits on a gated session's
    statements: statements and rows (-1: no limit), for `seconds` (0: no end). The policy
    charged them ahead (RestrictedPolicy.reserve_gate)."""

    queries: int
    rows: int
    seconds: float

    def spec(self) -> tuple[int, int, float]:
        return self.queries, self.rows, self.seconds


UNLIMITED_GATE: Final = GateBudget(-1, -1, 0.0)


class GateMismatch(Exception):
    """Replaying what the relay thread forwarded did not give the same bytes: the session's
    state cannot be trusted and it must end."""


@dataclass(slots=True)
class Portal:
    name: str
    statement: Statement
    result_formats: tuple[int, ...]
    description: m.RowDescription | None = None
    described: bool = False  # a Describe for it was sent (its reply may be on its way)


@dataclass(frozen=True, slots=True)
class RowLimit:
    """At most `rows` rows of one result; past that refuse (with `refusal`, by default the
    54000 of max_rows_per_query), or cut it (`truncate`)."""

    rows: int
    truncate: bool = False
    refusal: Refuse | None = None


class CopyRewriter(Protocol):
    """Rewrites the CopyData payloads of one COPY ... TO STDOUT."""

    def feed(self, data: bytes) -> bytes: ...

    def finish(self) -> bytes: ...


_MANY_ROWS: Final = 1 << 62  # "no row limit" for a run of DataRows

# CommandComplete bodies of the transaction-control statements the gate may run itself.
_TRANSACTION_TAGS: Final = frozenset(
    {b"BEGIN\0", b"START TRANSACTION\0", b"COMMIT\0", b"ROLLBACK\0", b"SAVEPOINT\0", b"RELEASE\0"}
)

# ReadyForQuery status bytes and what transaction_status says for each.
_STATUS: Final = {ord("I"): "I", ord("T"): "T", ord("E"): "E"}

# Where the messages of one reply group lie in a chunk (see _reply_group): the start of the last
# opening message, of the DataRows, their count, the start of the CommandComplete, of the
# ReadyForQuery, and the end of the group.
_Group = tuple[int, int, int, int, int, int]


def _whole_messages(data: bytes, longest: tuple[int, ...], most: int = 4) -> list[int] | None:
    """Where each message of `data` starts, and the end of the last: when `data` is at most
    `most` whole messages of acceptable lengths, else None."""
    size = len(data)
    unpack = TYPED_HEADER.unpack_from
    pos = 0
    starts: list[int] = []
    while pos < size:
        if size - pos < 5 or len(starts) == most:
            return None
        mtype, length = unpack(data, pos)
        if not 4 <= length <= longest[mtype]:
            return None
        starts.append(pos)
        pos += 1 + length
    if pos != size:
        return None
    starts.append(size)
    return starts


def _reply_group(
    data: bytes, pos: int, longest: tuple[int, ...], opening: bytes, *, suspended: bool = False
) -> _Group | None:
    """The common shape of the replies to one statement, read in place from `data` at `pos`:
    one message of each type of `opening` in that order, DataRows, a CommandComplete (or, if
    `suspended`, a PortalSuspended: an Execute with a row count) and a ReadyForQuery with a
    valid status, every one of them whole and of an acceptable length. None for anything else
    (the general loop then reads it, and says what is wrong if it is)."""
    size = len(data)
    unpack = TYPED_HEADER.unpack_from
    last = pos
    for expected in opening:
        if size - pos < 5:
            return None
        mtype, length = unpack(data, pos)
        if mtype != expected or not 4 <= length <= longest[mtype]:
            return None
        last = pos
        pos += 1 + length
    rows = pos
    count = 0
    while True:
        if size - pos < 5:
            return None
        mtype, length = unpack(data, pos)
        if not 4 <= length <= longest[mtype]:
            return None
        if mtype != DATA_ROW:
            break
        pos += 1 + length
        count += 1
    if mtype != CMD_COMPLETE and not (suspended and mtype == SUSPENDED):
        return None
    tag = pos
    ready = pos + 1 + length
    if size - ready < 6 or data[ready] != READY or INT32.unpack_from(data, ready + 1)[0] != 5:
        return None
    if data[ready + 5] not in _STATUS:
        return None
    return last, rows, count, tag, ready, ready + 6


@dataclass(slots=True)
class Result:
    """The result set currently streaming: how its rows are rewritten, and whether it was cut
    short (`aborted`: the refusal that replaces its end; `truncated`: rows dropped past the
    limit)."""

    decision: Decision
    rewriter: RowRewriter | None
    limit: RowLimit | None = None
    rows: int = 0
    aborted: Refuse | None = None
    truncated: bool = False
    copy: CopyRewriter | None = None  # COPY OUT: how its data is rewritten
    is_copy: bool = False


@dataclass(slots=True)
class InternalResult:
    """What one of Topeng's own queries returned."""

    columns: tuple[str, ...] = ()
    rows: list[tuple[str | None, ...]] = field(default_factory=list)
    error: m.ErrorFields | None = None
    done: bool = False


@dataclass(slots=True)
class StatementRecord:
    """What one statement did, for the audit log and metrics (tracked sessions only).

    One record per Query message (all its statements) or per Execute; a refused Parse or
    FunctionCall gets one too. `decision`: allowed, masked or refused.
    """

    sql: str
    decision: str
    started: float
    reason: str | None = None  # a refusal's metrics label
    message: str | None = None  # a refusal's message (names the rule)
    labels: tuple[str, ...] = ()  # labels whose columns were masked
    finished: float = 0.0
    rows: int = 0
    error: str | None = None  # SQLSTATE of the error that ended it, the server's or Topeng's

    def refused(self, refusal: Refuse) -> None:
        self.decision = "refused"
        self.reason = refusal.reason
        self.message = refusal.message
        self.error = refusal.sqlstate


def _summary(verdict: Decision | tuple[Decision, ...]) -> tuple[str, tuple[str, ...]]:
    """(decision, masked labels) of one statement's or one query's verdict."""
    decisions = verdict if isinstance(verdict, tuple) else (verdict,)
    labels: list[str] = []
    for d in decisions:
        if isinstance(d, Mask):
            labels.extend(c.label for c in d.columns.values() if c.label not in labels)
    return ("masked" if labels else "allowed"), tuple(labels)


NO_STATEMENTS = Refuse(
    "0A000", "topeng: the query has no statements Topeng could judge", reason="unsupported"
)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a Query's decisions come to: the refusal of the whole (the first refused statement,
    or NO_STATEMENTS), whether any statement masks, and the record's decision and labels."""

    refusal: Refuse | None
    masks: bool
    decision: str
    labels: tuple[str, ...]

    @classmethod
    def of(cls, decisions: tuple[Decision, ...]) -> Verdict:
        refusal = next((d for d in decisions if isinstance(d, Refuse)), None)
        if refusal is None and not decisions:
            refusal = NO_STATEMENTS
        decision, labels = _summary(decisions)
        masks = any(isinstance(d, Mask) for d in decisions)
        return cls(refusal, masks, decision, labels)


@dataclass(slots=True)
class Pending:
    kind: Kind
    refusal: Refuse | None = None
    statement: Statement | None = None
    portal: Portal | None = None
    portal_name: str = ""
    decisions: tuple[Decision, ...] = ()  # SIMPLE: one per statement
    allow_all: bool = False  # SIMPLE: every statement allowed as it is
    index: int = 0  # SIMPLE: which statement's results are streaming
    internal: InternalResult | None = None
    new_statement: bool = False  # PARSE: this Parse registered the statement
    silent: bool = False  # replies are consumed, not forwarded (after an aborted result)
    hidden: bool = False  # Topeng's own Describe: replies recorded, not forwarded
    record: StatementRecord | None = None  # SIMPLE/EXECUTE/PARSE/FUNCTION: for the audit log
    aborted: bool = False  # SIMPLE/SYNC: a result in this group was aborted by Topeng


@dataclass(slots=True)
class Counters:
    """What a session did, for metrics; read and reset by the caller."""

    queries: int = 0
    refused: int = 0
    masked: int = 0
    rows: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


def _tx_is_idle(status: str) -> bool:
    return status == "I"


class Session:
    """One client's conversation. See the module docstring."""

    def __init__(
        self,
        startup: StartupMessage,
        *,
        client_limits: Limits = FRONTEND_LIMITS,
        server_limits: Limits = BACKEND_LIMITS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.startup = startup
        self.clock = clock
        # Finished statements (tracked sessions), for the caller to take and log.
        self.records: list[StatementRecord] = []
        self.user = startup.user
        self.database = startup.database
        self.phase = Phase.AUTH
        self.authenticated = False
        self.mode = "fast"
        self.policy: StatementPolicy | None = None
        self._tx_status = "I"
        self.parameters: dict[str, str] = {}
        # The Python codec of the client_encoding the server last reported (ParameterStatus).
        self.client_codec = "utf-8"
        self.backend_key: m.BackendKeyData | None = None
        self.auth_error: m.ErrorFields | None = None
        self._terminated = False  # the client sent Terminate
        self._schema_changed = False  # a DDL command completed since last looked
        self.server_said_goodbye = False  # the server sent a FATAL error: it is closing
        self._counters = Counters()
        self.client_limits = client_limits
        self.server_limits = server_limits
        self._client = MessageReader(client_limits)
        self._server = MessageReader(server_limits)
        self._client_scan: MessageScanner | None = None
        self._server_scan: MessageScanner | None = None
        self._to_client: list[bytes | memoryview] = []
        self._to_server: list[bytes | memoryview] = []
        self._held_ready: bytes | None = None
        self._held_client: list[bytes] = []
        self._queue: deque[Pending] = deque()
        self._statements: dict[str, Statement] = {}
        # Simple queries whose rows passed unchanged, and their RowDescription messages: what
        # the gate may approve as templates (gate_approvals).
        self._simple_passed: dict[str, bytes] = {}
        # Transaction-control queries (BEGIN, COMMIT, ...) whose whole reply was one
        # CommandComplete and a ReadyForQuery: text -> that CommandComplete, for the gate.
        self._simple_commands: dict[str, bytes] = {}
        self._ungateable_at = -1  # the policy generation whose rules allow no gate
        self._portals: dict[str, Portal] = {}
        self._result: Result | None = None
        # RowDescriptions by their exact bytes, each with the formats it names: a statement
        # run again gets the same object, on which the policy may remember its verdict.
        self._descriptions: dict[bytes, tuple[m.RowDescription, tuple[int, ...]]] = {}
        # The last Query's decisions and what they come to; the last Execute's decision and
        # its record's summary (a policy hands a repeated statement the same objects).
        self._last_decisions: tuple[Decision, ...] | None = None
        self._last_verdict = Verdict.of(())
        self._last_executed: Decision | None = None
        self._last_summary: tuple[str, tuple[str, ...]] = ("allowed", ())
        self._copy_in = False
        self._ignored_syncs = 0  # fast mode: Syncs the server ignored inside COPY FROM STDIN
        self._in_batch = False  # tracked mode: extended-protocol messages sent since the Sync
        self._skipping = False  # the server discards messages until the client's next Sync
        self._copy_markers = 0  # COPY_END markers in the queue
        self.on_internal_done: Callable[[InternalResult], None] | None = None
        # The policy's `passes` (see StatementPolicy): with it, whole reply groups of the
        # common shape are handled in one step (_whole_groups).
        self._passes: Callable[[Decision, m.RowDescription, tuple[int, ...]], bool] | None = None
        # Set when the running statement must be cancelled on the server (a result Topeng
        # aborted); the caller sends the CancelRequest and clears it.
        self.cancel_requested = False

    # ------------------------------------------------------------------ output queues

    def take_to_client(self) -> bytes:
        if not self._to_client:
            return b""
        out = b"".join(self._to_client)
        self._to_client.clear()
        return out

    def take_to_server(self) -> bytes:
        parts = self._to_server
        if not parts:
            return b""
        if len(parts) == 1 and type(parts[0]) is bytes:
            out = parts[0]
            parts.clear()
            return out
        out = b"".join(parts)
        self._to_server.clear()
        return out

    # ------------------------------------------------------------------ state

    @property
    def transaction_status(self) -> str:
        """'I' idle, 'T' in a transaction, 'E' in a failed one: from the last ReadyForQuery."""
        scan = self._server_scan
        if scan is not None and scan.last_status >= 0:
            return chr(scan.last_status)
        return self._tx_status

    @transaction_status.setter
    def transaction_status(self, status: str) -> None:
        self._tx_status = status

    @property
    def schema_changed(self) -> bool:
        """A DDL command completed since this was last reset."""
        scan = self._server_scan
        return self._schema_changed or (scan is not None and scan.tag_seen)

    @schema_changed.setter
    def schema_changed(self, changed: bool) -> None:
        self._schema_changed = changed
        if self._server_scan is not None:
            self._server_scan.tag_seen = changed

    def _fast_outstanding(self) -> int:
        """Fast mode: Query, Sync and FunctionCall messages sent that await ReadyForQuery."""
        client, server = self._client_scan, self._server_scan
        assert client is not None and server is not None
        c = client.counts
        return c[Q] + c[S] + c[F] - server.counts[READY] - self._ignored_syncs

    def _batch_open(self) -> bool:
        """Extended-protocol messages were sent that no Sync has closed yet."""
        if self.mode == "fast":
            return self._client_scan is not None and self._client_scan.last_type in BATCH_TYPES
        return self._in_batch

    @property
    def counters(self) -> Counters:
        """What the session did so far (fast mode counts by message type, read here)."""
        client, server = self._client_scan, self._server_scan
        if self.mode == "fast" and client is not None and server is not None:
            self._counters.queries = client.counts[Q] + client.counts[E]
            self._counters.rows = server.counts[DATA_ROW]
        return self._counters

    @property
    def terminated(self) -> bool:
        """The client sent Terminate."""
        client = self._client_scan
        return self._terminated or (client is not None and client.counts[X] > 0)

    @property
    def idle(self) -> bool:
        """Nothing in flight and no transaction open: the session can be closed cleanly."""
        if self.phase is not Phase.READY or self._copy_in:
            return False
        if not _tx_is_idle(self.transaction_status):
            return False
        if self._batch_open():
            return False
        if self.mode == "fast":
            return self._fast_outstanding() <= 0 and bool(
                self._client_scan
                and self._client_scan.at_boundary()
                and self._server_scan
                and self._server_scan.at_boundary()
            )
        waiting = len(self._queue) - self._copy_markers  # markers expect no reply
        return not waiting and self._client.pending() == 0 and self._server.pending() == 0

    @property
    def quiet(self) -> bool:
        """The server owes nothing and no transaction is open: the client is the one keeping
        the session (even half-way through sending a message). For idle timeouts."""
        if self.phase is not Phase.READY or self._copy_in or self._batch_open():
            return False
        if not _tx_is_idle(self.transaction_status):
            return False
        if self.mode == "fast":
            scan = self._server_scan
            client = self._client_scan
            outstanding = self._fast_outstanding()
            if client is not None and client.partial_type in (Q, S, F):
                outstanding -= 1  # counted, but the server has not all of it yet
            return outstanding <= 0 and bool(scan and scan.at_boundary())
        return len(self._queue) - self._copy_markers == 0 and self._server.pending() == 0

    # ------------------------------------------------------------------ client side

    def from_client(self, data: bytes) -> bytes:
        """Bytes from the client; returns the bytes to send to the server."""
        self._counters.bytes_in += len(data)
        if self.phase is Phase.READY:
            if self.mode == "fast":
                return self._fast_client(data)
            return self._tracked_client(data)
        if self.phase is Phase.AUTH:
            return self._auth_client(data)
        if self.phase is Phase.SETUP:
            # Nothing the client says is acted on until its role is known.
            self._held_client.append(bytes(data))
            return b""
        return b""

    def _auth_client(self, data: bytes) -> bytes:
        reader = self._client
        reader.feed(data)
        out: list[bytes | memoryview] = []
        while (msg := reader.next_raw()) is not None:
            mtype, _, raw = msg
            if mtype == X:
                self._terminated = True
                out.append(raw)
                break
            if mtype != PASSWORD:
                raise ProtocolViolation(
                    f"expected a password response, got message type {chr(mtype)!r}"
                )
            out.append(raw)
        return b"".join(out)

    def _fast_client(self, data: bytes) -> bytes:
        scan = self._client_scan
        assert scan is not None
        scan.feed(data)  # counts and limits; what they mean is worked out when asked
        return data

    def fast_client(self, data: bytes) -> None:
        """Fast mode's whole client path: count the bytes, walk the headers (the caller
        forwards `data` itself). ProtocolViolation for a message past the limits."""
        self._counters.bytes_in += len(data)
        scan = self._client_scan
        assert scan is not None
        scan.feed(data)

    def fast_server(self, data: bytes) -> None:
        """Fast mode's whole server path (the caller forwards `data` itself)."""
        self._counters.bytes_out += len(data)
        scan = self._server_scan
        assert scan is not None
        watched = scan.feed(data)
        if watched is not None:
            self._fast_watched(watched)

    @property
    def scanners(self) -> tuple[MessageScanner, MessageScanner]:
        """Fast mode: the header scanners of the client's and the server's streams."""
        client, server = self._client_scan, self._server_scan
        assert client is not None and server is not None
        return client, server

    def relayed(self, bytes_in: int, bytes_out: int) -> None:
        """Fast mode: bytes forwarded outside this object (the relay thread); their messages
        were counted into `scanners`."""
        self._counters.bytes_in += bytes_in
        self._counters.bytes_out += bytes_out

    # ------------------------------------------------------------------ the gate
    # Strategy: between requests, a restricted session's steady state (a prepared statement
    # run again and again, its rows passing unchanged) can be handed to the relay thread with
    # approvals (proxy/relay.py). The thread forwards exactly the requests and replies
    # approved here and hands back everything else before forwarding it, with the request in
    # flight if there is one; `replay_request` then feeds that request through the session
    # as if it had come now (its bytes must come out unchanged), so the session is where it
    # would be had it seen every byte. What the thread ran is added with `gated`.

    def gate_approvals(self) -> list[Approval] | None:
        """The approvals for the relay thread's gate, or None if the session cannot be handed
        over now (not between requests, or a policy with something to do per statement)."""
        policy, passes = self.policy, self._passes
        if not self._statements and not self._simple_passed and not self._simple_commands:
            return None
        if policy is not None and policy.generation == self._ungateable_at:
            return None  # judged so under these rules: no look per chunk (rated roles)
        if (
            self.mode != "tracked"
            or self.phase is not Phase.READY
            or policy is None
            or passes is None
            or self._queue
            or self._result is not None
            or self._copy_in
            or self._skipping
            or self._batch_open()
            or self.transaction_status not in ("I", "T")
            or self._to_client
            or self._to_server
            or self._held_ready is not None
            or self._client.pending()
            or self._server.pending()
        ):
            return None
        if not isinstance(policy, GatePolicy) or not policy.gateable():
            self._ungateable_at = policy.generation  # (a reload moves it on: asked again)
            return None
        generation = policy.generation
        codec = self.client_codec
        max_rows = policy.gate_row_limit()
        approvals: list[Approval] = []
        for stmt in self._statements.values():
            if (
                not stmt.created
                or stmt.closing
                or stmt.generation != generation
                or isinstance(stmt.decision, Refuse)
            ):
                continue
            # result formats -> (the RowDescription message a Describe returns, or b""; bare)
            runs: dict[tuple[int, ...], tuple[bytes, bool]] = {}
            if stmt.passed is not None:
                result_formats, raw = stmt.passed
                found = self._descriptions.get(raw[5:])
                if found is not None and self._passes_for(stmt, result_formats, found[0]):
                    runs[result_formats] = (raw, False)
            bare = stmt.passed_bare
            if (
                bare is not None
                and stmt.described  # so Topeng adds no Describe of its own (_client_execute)
                and stmt.description is not None
                and self._passes_for(stmt, bare, stmt.description)
            ):
                runs[bare] = (runs.get(bare, (b"", True))[0], True)
            for result_formats, (raw, bare_too) in runs.items():
                approvals.append(
                    Approval(
                        decision=stmt.decision,
                        name=stmt.name.encode(codec),
                        formats=struct.pack(
                            f"!h{len(result_formats)}h", len(result_formats), *result_formats
                        ),
                        description=raw,
                        max_rows=max_rows,
                        bare=bare_too,
                        statement=stmt.name,
                        result_formats=result_formats,
                    )
                )
        if codec != "utf-8":
            return approvals
        for sql, tag in self._simple_commands.items():
            verdict = policy.approve_query(sql)
            if (
                isinstance(verdict, tuple)
                and len(verdict) == 1
                and isinstance(verdict[0], Allow)
            ):
                approvals.append(
                    Approval(
                        decision=verdict[0],
                        name=b"",
                        formats=b"",
                        description=b"",
                        max_rows=0,
                        template=((sql.encode(codec), HOLE_END),),
                        command=tag,
                    )
                )
        for sql, raw in self._simple_passed.items():
            found = self._descriptions.get(raw[5:])
            if found is None:
                continue
            # Judged again, now (and charged to no rate: it is not run here): the decision
            # in force is the one the thread carries.
            verdict = policy.approve_query(sql)
            if not isinstance(verdict, tuple) or len(verdict) != 1:
                continue
            judged = Verdict.of(verdict)
            decision = verdict[0]
            if judged.refusal is not None or judged.masks:
                continue
            if not passes(decision, found[0], found[1]):
                continue
            template = policy.query_template(sql)
            if template is None:
                continue
            approvals.append(
                Approval(
                    decision=decision,
                    name=b"",
                    formats=b"",
                    description=raw,
                    max_rows=max_rows,
                    template=template,
                )
            )
        return approvals

    def _passes_for(
        self, stmt: Statement, result_formats: tuple[int, ...], description: m.RowDescription
    ) -> bool:
        """The policy knows a portal of `stmt` with these formats passes unchanged."""
        passes = self._passes
        portal = Portal("", stmt, result_formats)
        return passes is not None and passes(
            stmt.decision, description, self._formats(portal, description)
        )

    def gate_scanners(self) -> tuple[MessageScanner, MessageScanner]:
        """Header scanners, between messages, for the relay thread to hold each stream to the
        limits with (the gate judges the messages themselves)."""
        return (
            MessageScanner(self.client_limits, frozenset()),
            MessageScanner(self.server_limits, frozenset()),
        )

    def replay_request(self, request: bytes) -> None:
        """A request the relay thread forwarded before it handed the session back: taken in
        as if it came now. GateMismatch if the session would not have forwarded it as it
        was (then it must end). It is judged as it was when the thread forwarded it: by the
        rules and the rate budget of then (see RestrictedPolicy.replaying)."""
        policy = self._gate_policy()
        policy.replaying = True
        try:
            out = self.from_client(request)
        finally:
            policy.replaying = False
        self._counters.bytes_in -= len(request)  # counted by the relay already
        if out != request or self._to_client:
            raise GateMismatch("the session would not have forwarded the relayed request as is")

    def gated(self, approval: Approval, runs: int, rows: int) -> None:
        """Statements the relay thread ran under `approval`: counted here as if they had
        come through this object."""
        if approval.template is not None:
            self._counters.queries += runs
        if rows:
            self._counters.rows += rows
        # (a command is charged to no rate, as Python charges none)
        self._gate_policy().gate_ran(approval.decision, 0 if approval.command else runs, rows)

    def gate_moved(self, approvals: list[Approval], status: str, cleared: bool, bound: int,
                   described: bool) -> None:
        """What the replies the relay thread forwarded changed of the session's state, as
        Python would have seen it: the transaction status; the portals, which ended with a
        transaction (`cleared`); the unnamed portal, which the Bind of approval `bound` (-1:
        none) left open inside a transaction block."""
        self.transaction_status = status
        if cleared:
            self._portals.clear()
        if bound < 0:
            return
        approval = approvals[bound]
        stmt = self._statements.get(approval.statement)
        if stmt is None:  # (closed since? it cannot be: a Close comes back to Python)
            self._portals.pop("", None)
            return
        portal = Portal("", stmt, approval.result_formats, described=described)
        if described:
            found = self._descriptions.get(approval.description[5:])
            portal.description = None if found is None else found[0]
        self._portals[""] = portal

    def gate_budget(self, release: Callable[[], None]) -> GateBudget | None:
        """The rate budget the relay thread may spend on this session once handed over
        (charged ahead now; see RestrictedPolicy.reserve_gate); None: not now. `release`
        takes the session back for another session of the user that needs the budget."""
        return self._gate_policy().reserve_gate(release)

    def gate_ended(self, approvals: Sequence[Approval] = (), inflight: int = -1) -> None:
        """Back from the relay thread (or never handed over after `gate_budget`): what the
        budget held and the thread did not spend is given back. `inflight`: the approval of
        the request it came back with (see `replay_request`), -1 if none; that request stays
        charged, unless it is a command (charged to no rate, as in Python)."""
        charged = inflight >= 0 and not approvals[inflight].command
        self._gate_policy().end_gate(charged)

    def _gate_policy(self) -> GatePolicy:
        policy = self.policy
        assert isinstance(policy, GatePolicy), "only a gated policy's session is gated"
        return policy

    def _tracked_client(self, data: bytes) -> bytes:
        reader = self._client
        if (
            not reader.pending()
            and not self._to_server
            and not self._copy_in
            and not self._skipping
            and self._whole_request(data)
        ):
            return self.take_to_server()
        reader.feed(data)
        out = self._to_server
        while (msg := reader.next_raw()) is not None:
            mtype, body, raw = msg
            if self._copy_in:
                if mtype in (COPY_DATA, COPY_DONE, COPY_FAIL):
                    if mtype != COPY_DATA:
                        self._copy_in = False
                    out.append(raw)
                    continue
                if mtype in (S, H):
                    # PostgreSQL ignores Sync and Flush during COPY FROM STDIN.
                    out.append(raw)
                    continue
            if self._skipping and mtype not in (S, X):
                # After an extended-protocol error the server discards everything up to the
                # client's next Sync: so nothing is judged or expected of these.
                out.append(raw)
                continue
            if mtype == Q:
                self._client_query(m.query_sql(body, self.client_codec), raw)
            elif mtype == P:
                self._client_parse(m.Parse.decode(body, self.client_codec), raw)
            elif mtype == B:
                self._client_bind(*m.bind_target(body, self.client_codec), raw)
            elif mtype == DESC:
                self._client_describe(*m.describe_target(body, self.client_codec), raw)
            elif mtype == E:
                self._client_execute(*m.execute_target(body, self.client_codec), raw)
            elif mtype == CLOSE:
                self._client_close(m.Close.decode(body, self.client_codec), raw)
            elif mtype == S:
                self._client_sync(raw)
            elif mtype == H:
                out.append(raw)
            elif mtype == F:
                self._client_function_call(m.FunctionCall.decode(body), raw)
            elif mtype == X:
                self._terminated = True
                out.append(raw)
                break
            elif mtype in (COPY_DATA, COPY_DONE, COPY_FAIL):
                # Not in COPY IN as far as Topeng knows yet: the client may have sent its data
                # before the server said CopyInResponse. Mark where the COPY ends, so the Syncs
                # the server ignores inside it can be told from the ones after it.
                if mtype != COPY_DATA:
                    self._queue.append(Pending(Kind.COPY_END))
                    self._copy_markers += 1
                out.append(raw)
            else:
                raise ProtocolViolation(f"unexpected message type {chr(mtype)!r}")
        return self.take_to_server()

    # Strategy: a client chunk that is exactly one Query, or exactly Bind, [Describe,] Execute,
    # Sync (how libpq and most drivers run a prepared statement), is framed in one walk over
    # its headers and handed to the same handlers the general loop below calls, in the same
    # order, with the same decoded values: only the framing and the dispatch are skipped. The
    # general loop's per-message checks (COPY IN, skipping to Sync) cannot change inside such
    # a chunk, so they are made once, before.

    def _whole_request(self, data: bytes) -> bool:
        """Handles `data` if it is one of the common whole requests; False if not (nothing was
        done: the general loop reads it)."""
        size = len(data)
        if size < 5:
            return False
        codec = self.client_codec
        if data[0] == Q:
            (length,) = INT32.unpack_from(data, 1)
            if length != size - 1 or length > self._client.longest[Q]:
                return False
            self._client_query(m.query_sql(data[5:], codec), data)
            return True
        if data[0] != B:
            return False
        starts = _whole_messages(data, self._client.longest)
        if starts is None or data[starts[-2]] != S or data[starts[-3]] != E:
            return False
        count = len(starts) - 1
        if count == 4 and data[starts[1]] == DESC:
            self._whole_batch(data, starts, describe=True)
            return True
        if count == 3:
            self._whole_batch(data, starts, describe=False)
            return True
        return False

    def _whole_batch(self, data: bytes, starts: list[int], *, describe: bool) -> None:
        """Bind, [Describe,] Execute, Sync, in one chunk (`starts`: where each begins)."""
        codec = self.client_codec
        view = memoryview(data)
        bind = m.bind_target(data[5 : starts[1]], codec)
        if describe:
            at, end = starts[1], starts[2]
            kind, name = m.describe_target(data[at + 5 : end], codec)
            self._client_bind(*bind, view[: starts[1]])
            self._client_describe(kind, name, view[at:end])
        else:
            self._client_bind(*bind, view[: starts[1]])
        at, end = starts[-3], starts[-2]
        executed = view[at:end]
        self._client_execute(*m.execute_target(data[at + 5 : end], codec), executed)
        self._client_sync(view[end:])
        parts = self._to_server
        if len(parts) == len(starts) - 1 and parts[-2] is executed:
            # Each message went on as it came (Bind, Describe and Sync always do; the Execute
            # was neither refused nor preceded by Topeng's own Describe): the chunk goes whole.
            parts[:] = [data]

    def _client_sync(self, raw: memoryview) -> None:
        self._queue.append(Pending(Kind.SYNC))
        self._in_batch = False
        self._skipping = False
        self._to_server.append(raw)

    def _client_query(self, sql: str, raw: memoryview | bytes) -> None:
        assert self.policy is not None
        self._counters.queries += 1
        verdict = self.policy.judge_query(sql)
        record = StatementRecord(sql, "allowed", self.clock())
        if isinstance(verdict, Refuse):
            self._counters.refused += 1
            record.refused(verdict)
            self._queue.append(Pending(Kind.SIMPLE, refusal=verdict, record=record))
            self._to_server.append(m.Query(POISON_SQL).encode())
            return
        if isinstance(verdict, Allow):
            self._queue.append(Pending(Kind.SIMPLE, allow_all=True, record=record))
            self._to_server.append(raw)
            return
        if verdict is self._last_decisions:
            judged = self._last_verdict
        else:
            judged = Verdict.of(verdict)
            self._last_decisions, self._last_verdict = verdict, judged
        refusal = judged.refusal
        if refusal is not None:
            # One refused statement refuses the whole string, as one failing statement fails
            # the whole of a simple query.
            self._counters.refused += 1
            record.refused(refusal)
            self._queue.append(Pending(Kind.SIMPLE, refusal=refusal, record=record))
            self._to_server.append(m.Query(POISON_SQL).encode())
            return
        if judged.masks:
            self._counters.masked += 1
        record.decision, record.labels = judged.decision, judged.labels
        self._queue.append(Pending(Kind.SIMPLE, decisions=verdict, record=record))
        self._to_server.append(raw)

    def _client_parse(self, parse: m.Parse, raw: memoryview) -> None:
        self._in_batch = True
        assert self.policy is not None
        self._counters.queries += 1
        decision = self.policy.judge_parse(parse.sql, parse.param_types)
        existing = self._statements.get(parse.name) if parse.name else None
        if isinstance(decision, Refuse):
            self._counters.refused += 1
            record = StatementRecord(parse.sql, "refused", self.clock())
            record.refused(decision)
            # The server will reject the poison; a statement of this name is not created.
            self._queue.append(Pending(Kind.PARSE, refusal=decision, record=record))
            self._to_server.append(m.Parse(parse.name, POISON_SQL, ()).encode())
            return
        if isinstance(decision, Mask):
            self._counters.masked += 1
        pending = Pending(Kind.PARSE)
        if existing is None or existing.closing:
            # A named statement that exists already makes the server fail this Parse, and the
            # old statement stays: so the old entry stays too.
            stmt = Statement(parse.name, parse.sql, decision, generation=self.policy.generation)
            self._statements[parse.name] = stmt
            pending.statement = stmt
            pending.new_statement = True
        self._queue.append(pending)
        self._to_server.append(raw)

    def _client_bind(
        self, portal_name: str, statement: str, result_formats: tuple[int, ...], raw: memoryview
    ) -> None:
        self._in_batch = True
        stmt = self._statements.get(statement)
        if stmt is None:
            # The server knows no such statement either (or Topeng refused it): the server's
            # own error is what the client should see.
            self._queue.append(Pending(Kind.BIND, portal_name=portal_name))
            self._to_server.append(raw)
            return
        portal = Portal(portal_name, stmt, result_formats)
        self._portals[portal_name] = portal
        self._queue.append(Pending(Kind.BIND, statement=stmt, portal=portal))
        self._to_server.append(raw)

    def _client_describe(self, kind: str, name: str, raw: memoryview) -> None:
        self._in_batch = True
        if kind == "S":
            stmt = self._statements.get(name)
            if stmt is not None:
                stmt.described = True
            pending = Pending(Kind.DESCRIBE_STATEMENT, statement=stmt)
        else:
            portal = self._portals.get(name)
            if portal is not None:
                portal.described = True
            pending = Pending(Kind.DESCRIBE_PORTAL, portal=portal, portal_name=name)
        self._queue.append(pending)
        self._to_server.append(raw)

    def _client_execute(self, portal_name: str, max_rows: int, raw: memoryview) -> None:
        self._in_batch = True
        portal = self._portals.get(portal_name)
        assert self.policy is not None
        if portal is not None and not isinstance(portal.statement.decision, Refuse):
            stmt = portal.statement
            verdict, stmt.generation = self.policy.judge_execute(stmt.sql, stmt.generation)
            refusal = verdict if isinstance(verdict, Refuse) else None
            if verdict is not None and refusal is None:
                stmt.decision = verdict  # judged again under reloaded rules
            if refusal is not None:
                # Executing a portal that cannot exist fails on the server like any error
                # would, and its error is replaced by the refusal.
                self._counters.refused += 1
                record = StatementRecord(portal.statement.sql, "refused", self.clock())
                record.refused(refusal)
                self._queue.append(Pending(Kind.EXECUTE, refusal=refusal, record=record))
                self._to_server.append(m.Execute(POISON_NAME, max_rows).encode())
                return
        if (
            portal is not None
            and not portal.described
            and not portal.statement.described
            and (self.policy.needs_descriptions or isinstance(portal.statement.decision, Mask))
        ):
            # Rows to judge need their description; the client never asked for it, so Topeng
            # does, and keeps the answer to itself.
            portal.described = True
            self._queue.append(Pending(Kind.DESCRIBE_PORTAL, portal=portal, hidden=True))
            self._to_server.append(m.Describe("P", portal_name).encode())
        if portal is None:
            record = StatementRecord("", "allowed", self.clock())
        else:
            decision = portal.statement.decision
            if decision is not self._last_executed:
                self._last_executed, self._last_summary = decision, _summary(decision)
            summary, labels = self._last_summary
            record = StatementRecord(portal.statement.sql, summary, self.clock(), labels=labels)
            if isinstance(decision, Refuse):
                record.refused(decision)
        self._queue.append(
            Pending(Kind.EXECUTE, portal=portal, portal_name=portal_name, record=record)
        )
        self._to_server.append(raw)

    def _client_close(self, close: m.Close, raw: memoryview) -> None:
        self._in_batch = True
        pending = Pending(Kind.CLOSE)
        if close.kind == "S":
            stmt = self._statements.get(close.name)
            if stmt is not None:
                stmt.closing = True
            pending.statement = stmt
        else:
            pending.portal = self._portals.get(close.name)
        self._queue.append(pending)
        self._to_server.append(raw)

    def _client_function_call(self, call: m.FunctionCall, raw: memoryview) -> None:
        assert self.policy is not None
        decision = self.policy.judge_function_call(call)
        record = StatementRecord(f"<FunctionCall {call.function_oid}>", "allowed", self.clock())
        if isinstance(decision, Refuse):
            self._counters.refused += 1
            record.refused(decision)
            self._queue.append(Pending(Kind.FUNCTION, refusal=decision, record=record))
            self._to_server.append(m.FunctionCall(0).encode())
            return
        self._queue.append(Pending(Kind.FUNCTION, record=record))
        self._to_server.append(raw)

    # ------------------------------------------------------------------ server side

    def running_since(self) -> float | None:
        """When the oldest statement still in flight started (tracked sessions), or None."""
        for entry in self._queue:
            if entry.record is not None and entry.kind in (Kind.SIMPLE, Kind.EXECUTE):
                return entry.record.started
        return None

    def expire_running(self, refusal: Refuse) -> bool:
        """End the oldest statement in flight with `refusal` (a timeout): it is cancelled on the
        server, and whatever it still sends ends in this refusal. False if none is running."""
        for entry in self._queue:
            if entry.record is None or entry.kind not in (Kind.SIMPLE, Kind.EXECUTE):
                continue
            if entry.refusal is not None:
                return False  # already ended this way
            entry.refusal = refusal
            entry.record.refused(refusal)
            if entry is self._queue[0] and self._result is not None:
                self._abort_result(self._result, refusal)
            self.cancel_requested = True
            return True
        return False

    def _decision_of(self, head: Pending | None) -> Decision | None:
        """The decision of the statement whose replies are arriving, if Topeng knows it."""
        if head is None:
            return None
        if head.kind is Kind.SIMPLE:
            if head.index < len(head.decisions):
                return head.decisions[head.index]
            return ALLOW if head.allow_all else None
        if head.kind is Kind.EXECUTE and head.portal is not None:
            return head.portal.statement.decision
        if head.statement is not None:
            return head.statement.decision
        return None

    def _scrubbed(
        self, head: Pending | None, body: memoryview, raw: memoryview, mtype: bytes
    ) -> bytes:
        """A server error or notice as the client may see it (second line of defence)."""
        policy = self.policy
        if policy is None:
            return bytes(raw)
        codec = self.client_codec
        scrubbed = policy.scrub(self._decision_of(head), m.ErrorFields.decode(body, codec))
        return bytes(raw) if scrubbed is None else scrubbed.encode_as(mtype, codec)

    def _pop(self) -> Pending:
        """Take the head of the reply queue; a statement whose replies are over is recorded."""
        entry = self._queue.popleft()
        record = entry.record
        if record is not None:
            record.finished = self.clock()
            self.records.append(record)
        return entry

    def from_server(self, data: bytes) -> bytes:
        """Bytes from the server; returns the bytes to send to the client."""
        self._counters.bytes_out += len(data)
        if self.phase is Phase.READY:
            if self.mode == "fast":
                return self._fast_server(data)
            return self._tracked_server(data)
        if self.phase is Phase.AUTH:
            return self._auth_server(data)
        if self.phase is Phase.SETUP:
            return self._tracked_server(data)
        return b""

    def _auth_server(self, data: bytes) -> bytes:
        reader = self._server
        reader.feed(data)
        out: list[bytes | memoryview] = []
        while (msg := reader.next_raw()) is not None:
            mtype, body, raw = msg
            if mtype == AUTH:
                auth = m.Authentication.decode(body)
                if auth.code == m.AUTH_OK:
                    self.authenticated = True
            elif mtype == KEY:
                self.backend_key = m.BackendKeyData.decode(body)
            elif mtype == PARAM_STATUS:
                ps = m.ParameterStatus.decode(body)
                self._parameter(ps)
            elif mtype == ERROR:
                self.auth_error = m.ErrorFields.decode(body, self.client_codec)
                self._note_fatal(body)
            elif mtype == READY:
                if not self.authenticated:
                    raise ProtocolViolation("server said ReadyForQuery before AuthenticationOk")
                self.transaction_status = m.ReadyForQuery.decode(body).status
                self._held_ready = bytes(raw)
                self.phase = Phase.SETUP
                out.append(self._drain_rest_after_setup_start())
                break
            elif mtype not in (NOTICE, NEGOTIATE):
                raise ProtocolViolation(
                    f"unexpected message type {chr(mtype)!r} during authentication"
                )
            out.append(raw)
        return b"".join(out)

    def _drain_rest_after_setup_start(self) -> bytes:
        # The server sends nothing after its first ReadyForQuery until asked; anything already
        # buffered is handled in the SETUP phase.
        return b""

    def start_internal(self, sql: str) -> InternalResult:
        """Run Topeng's own query on this connection (only while SETUP, or idle and tracked).

        Returns the result object, filled in (`done`) as replies are fed to `from_server`.
        The Query bytes are queued for `take_to_server()`.
        """
        if self.phase is not Phase.SETUP:
            raise RuntimeError("internal queries run only before the session is handed over")
        result = InternalResult()
        self._queue.append(Pending(Kind.INTERNAL, internal=result))
        self._to_server.append(m.Query(sql).encode())
        return result

    def begin(self, *, policy: StatementPolicy | None) -> bytes:
        """Hand the session over to the client: fast mode without a policy, else tracked.

        Returns the bytes to send to the server (the client's messages held during setup);
        the held ReadyForQuery is queued for the client.
        """
        if self.phase is not Phase.SETUP or self._queue:
            raise RuntimeError("begin() needs a session in SETUP with no query in flight")
        self.policy = policy
        self.mode = "fast" if policy is None else "tracked"
        self._passes = getattr(policy, "passes", None)
        self.phase = Phase.READY
        if self.mode == "fast":
            self._client_scan = MessageScanner(self.client_limits, frozenset())
            self._server_scan = MessageScanner(
                self.server_limits,
                frozenset((COPY_IN, ERROR)),
                status_type=READY,
                tag_type=CMD_COMPLETE,
                tag_prefixes=DDL_TAGS,
            )
            # Bytes already framed but not yet read stay in the tracked readers: hand them on.
            rest = self._server.take_rest()
            if rest:
                raise ProtocolViolation("server sent data before it was asked anything")
        if self._held_ready is not None:
            self._to_client.append(self._held_ready)
            self._held_ready = None
        held = b"".join(self._held_client)
        self._held_client.clear()
        self._counters.bytes_in -= len(held)  # counted when it arrived
        if self.mode == "fast":
            rest = self._client.take_rest()
            return self.from_client(rest + held) if rest or held else b""
        return self.from_client(held) if held else b""

    def _fast_server(self, data: bytes) -> bytes:
        scan = self._server_scan
        assert scan is not None
        watched = scan.feed(data)
        if watched is not None:
            self._fast_watched(watched)
        return data

    def _fast_watched(self, watched: list[tuple[int, bytes]]) -> None:
        """The few server messages the fast path reads: errors (is the server closing?),
        COPY IN, and a ReadyForQuery or CommandComplete that was split across chunks."""
        scan = self._server_scan
        assert scan is not None
        for mtype, body in watched:
            if mtype == READY:
                scan.last_status = body[0] if body else ord("I")
            elif mtype == CMD_COMPLETE:
                if body.startswith(DDL_TAGS):
                    scan.tag_seen = True
            elif mtype == ERROR:
                self._note_fatal(body)
            elif mtype == COPY_IN:
                # The server ignores a Sync the client sent with an extended-protocol COPY FROM
                # STDIN (libpq sends Parse/Bind/Describe/Execute/Sync, then the data, then
                # CopyDone and another Sync).
                client = self._client_scan
                if client is not None and client.last_type == S and self._fast_outstanding() >= 1:
                    self._ignored_syncs += 1

    def _note_fatal(self, error: memoryview | bytes) -> None:
        """Notes whether this ErrorResponse body ends the session (read without decoding
        its text, which is in the client_encoding)."""
        if m.error_severity(error) in ("FATAL", "PANIC"):
            self.server_said_goodbye = True

    def _parameter(self, ps: m.ParameterStatus) -> None:
        self.parameters[ps.name] = ps.value
        if ps.name == "client_encoding":
            codec = pg_codec(ps.value)
            if codec != self.client_codec:
                self.client_codec = codec
                self._descriptions.clear()  # their column names were read in the old codec

    def _tracked_server(self, data: bytes) -> bytes:
        reader = self._server
        if self._passes is not None and not self._to_client and not reader.pending():
            done = self._whole_groups(data)
            if done == len(data):
                return data
            if done:
                self._to_client.append(data[:done])
                data = data[done:]
        reader.feed(data)
        out = self._to_client
        while (msg := reader.next_raw()) is not None:
            mtype, body, raw = msg
            if mtype == DATA_ROW:
                self._data_row(body, raw)
                continue
            if self._copy_markers:
                self._drop_stray_markers()
            head = self._queue[0] if self._queue else None
            if mtype in (NOTICE, PARAM_STATUS, NOTIFY):
                if mtype == PARAM_STATUS:
                    ps = m.ParameterStatus.decode(body)
                    self._parameter(ps)
                    if self.policy is not None:
                        refusal = self.policy.check_parameter(ps.name, ps.value)
                        if refusal is not None:
                            raise SessionRefused(refusal)
                if head is not None and head.kind is Kind.INTERNAL:
                    continue
                if mtype == NOTICE and self.policy is not None:
                    out.append(self._scrubbed(head, body, raw, b"N"))
                else:
                    out.append(bytes(raw))
                continue
            if mtype == ERROR:
                self._note_fatal(body)
            if head is None:
                if mtype == ERROR:
                    # A FATAL error the server sends on its own (shutdown, timeout).
                    out.append(bytes(raw))
                    continue
                raise ProtocolViolation(f"unexpected message {chr(mtype)!r} from server")
            if head.kind is Kind.INTERNAL:
                self._internal_reply(head, mtype, body)
                continue
            if head.kind is Kind.POISON:
                self._poison_reply(mtype, body, raw)
                continue
            self._reply(head, mtype, body, raw)
        return self.take_to_client()

    # Strategy: most replies of a restricted session are one statement's whole reply group in
    # one chunk: [BindComplete] [RowDescription] DataRow* CommandComplete ReadyForQuery, for a
    # statement already judged, whose description was seen before and whose rows the policy
    # already found to pass unchanged. Such a group is recognised by its headers alone and
    # handled in one step: the counts, the records and the state end up exactly as the general
    # loop (_reply and the methods below it) leaves them, and the bytes go out as they came.
    # Anything else (another shape, an error, a notice, rows to rewrite, a row limit reached,
    # a description or plan not seen yet) is left to the general loop, from the first byte of
    # the group on, before anything was changed.

    def _whole_groups(self, data: bytes) -> int:
        """Handles the whole reply groups of the common shape at the start of `data`; returns
        where the first other byte is (0 if none was handled)."""
        pos = 0
        size = len(data)
        while pos < size:
            end = self._whole_group(data, pos)
            if end == pos:
                break
            pos = end
        return pos

    def _whole_group(self, data: bytes, pos: int) -> int:
        queue = self._queue
        if not queue or self._result is not None or self._copy_in or self._copy_markers:
            return pos
        head = queue[0]
        if head.silent or head.refusal is not None:
            return pos
        if head.kind is Kind.SIMPLE:
            return self._whole_simple(head, data, pos)
        if head.kind is Kind.BIND and len(queue) >= 3:
            return self._whole_exchange(head, data, pos)
        return pos

    def _whole_simple(self, head: Pending, data: bytes, pos: int) -> int:
        """A Query of one statement: RowDescription DataRow* CommandComplete ReadyForQuery."""
        if head.aborted or head.index:
            return pos
        decision: Decision
        if head.allow_all:
            decision = ALLOW
        elif len(head.decisions) == 1:
            decision = head.decisions[0]
        else:
            return pos
        if data[pos] == CMD_COMPLETE:
            return self._whole_command(head, decision, data, pos)
        group = _reply_group(data, pos, self._server.longest, b"T")
        if group is None:
            return pos
        described, rows, count, tag, ready, end = group
        found = self._descriptions.get(data[described + 5 : rows])
        if found is None or not self._passing(decision, found[0], found[1], count):
            return pos
        if count and head.record is not None and not head.allow_all:
            # (the policy has just said these rows pass): the gate may approve the query
            passed = self._simple_passed
            if len(passed) >= 16 and head.record.sql not in passed:
                passed.clear()
            passed[head.record.sql] = data[described:rows]
        head.index += 1
        self._completed(head, decision, count, data, tag, ready)
        self._ready_at(data[ready + 5])
        return end

    def _whole_command(self, head: Pending, decision: Decision, data: bytes, pos: int) -> int:
        """A Query of one statement that returns no rows: CommandComplete ReadyForQuery."""
        group = _reply_group(data, pos, self._server.longest, b"")
        if group is None or not isinstance(decision, Allow):
            return pos
        _, _, count, tag, ready, end = group
        if count:
            return pos  # (rows with no description: the general loop says what is wrong)
        head.index += 1
        self._completed(head, decision, 0, data, tag, ready)
        self._ready_at(data[ready + 5])
        if (
            head.record is not None
            and not head.allow_all
            and data[tag + 5 : ready] in _TRANSACTION_TAGS
            and data[ready + 5] in (ord("I"), ord("T"))
        ):
            # A transaction-control statement: the gate may approve it (gate_approvals).
            commands = self._simple_commands
            if len(commands) >= 8 and head.record.sql not in commands:
                commands.clear()
            commands[head.record.sql] = data[tag:ready]
        return end

    def _whole_exchange(self, bind: Pending, data: bytes, pos: int) -> int:
        """Bind, Describe (portal), Execute, Sync of a judged statement, or Bind, Execute,
        Sync: BindComplete [RowDescription] DataRow* CommandComplete ReadyForQuery."""
        portal = bind.portal
        queue = self._queue
        if portal is None:
            return pos
        second = queue[1]
        if second.kind is Kind.DESCRIBE_PORTAL:
            if second.portal is not portal or second.hidden or second.silent or len(queue) < 4:
                return pos
            execute, sync, opening = queue[2], queue[3], b"2T"
        else:
            execute, sync, opening = second, queue[2], b"2"
        if (
            execute.kind is not Kind.EXECUTE
            or execute.portal is not portal
            or execute.refusal is not None
            or execute.silent
            or sync.kind is not Kind.SYNC
            or sync.silent
            or sync.aborted
        ):
            return pos
        decision = portal.statement.decision
        group = _reply_group(data, pos, self._server.longest, opening, suspended=True)
        if group is None:
            return pos
        described, rows, count, tag, ready, end = group
        description: m.RowDescription | None = None
        if opening == b"2T":
            found = self._descriptions.get(data[described + 5 : rows])
            if found is None:
                return pos
            description = found[0]
        if count:
            result_description = description or portal.description or portal.statement.description
            if result_description is None:
                return pos
            formats = self._formats(portal, result_description)
            if not self._passing(decision, result_description, formats, count):
                return pos
        elif isinstance(decision, Refuse):
            return pos
        self._pop()  # BindComplete
        if description is not None:
            portal.description = description
            if count:  # (the policy has just said these rows pass)
                portal.statement.passed = (portal.result_formats, data[described:rows])
            self._pop()  # RowDescription
        elif count and portal.description is None:
            portal.statement.passed_bare = portal.result_formats
        self._completed(execute, decision, count, data, tag, ready)
        self._pop()  # CommandComplete
        self._ready_at(data[ready + 5])
        return end

    def _passing(
        self, decision: Decision, description: m.RowDescription, formats: tuple[int, ...], rows: int
    ) -> bool:
        """The policy knows these rows pass unchanged, and there are not too many."""
        passes = self._passes
        if passes is None or isinstance(decision, Refuse):
            return False
        if not passes(decision, description, formats):
            return False
        if not rows:
            return True
        assert self.policy is not None
        limit = self.policy.row_limit(decision)
        return limit is None or rows <= limit.rows

    def _completed(
        self, head: Pending, decision: Decision, rows: int, data: bytes, tag: int, ready: int
    ) -> None:
        """The rows and the CommandComplete of a whole reply group, counted."""
        if data.startswith(DDL_TAGS, tag + 5, ready):
            self.schema_changed = True
        if rows:
            self._counters.rows += rows
            if head.record is not None:
                head.record.rows += rows
            assert self.policy is not None
            self.policy.rows_sent(decision, rows)

    def _ready_at(self, status: int) -> None:
        """The ReadyForQuery that ends a whole reply group (its group entry is the head)."""
        self._pop()
        self.transaction_status = _STATUS[status]
        if status == ord("I"):
            self._portals.clear()

    def _poison_reply(self, mtype: int, body: memoryview, raw: memoryview) -> None:
        # The server's error for Topeng's poison is not the client's business; its
        # ReadyForQuery (now 'E' in a transaction block) is.
        if mtype == READY:
            self._pop()
            self.transaction_status = m.ReadyForQuery.decode(body).status
            self._to_client.append(bytes(raw))
        elif mtype != ERROR:
            raise ProtocolViolation(f"unexpected message {chr(mtype)!r} after Topeng's poison")

    def _data_row(self, body: memoryview, raw: memoryview) -> None:
        head = self._queue[0] if self._queue else None
        if head is not None and head.kind is Kind.INTERNAL:
            assert head.internal is not None
            codec = self.client_codec
            try:
                row = tuple(
                    None if v is None else bytes(v).decode(codec) for v in m.split_data_row(body)
                )
            except UnicodeDecodeError as exc:
                raise ProtocolViolation(
                    f"the server sent text that is not valid {codec}: {exc}"
                ) from exc
            head.internal.rows.append(row)
            return
        if head is not None and head.silent:
            return
        result = self._result
        if result is None and head is not None and head.kind is Kind.EXECUTE:
            self._portal_result(head)
            result = self._result
        if result is None or head is None or head.kind not in (Kind.SIMPLE, Kind.EXECUTE):
            # A row Topeng cannot tie to a statement has no masking plan: never forward it.
            raise ProtocolViolation("server sent a row Topeng cannot tie to a statement")
        if result.aborted is not None or result.truncated:
            return
        rows = result.rows + 1
        limit = result.limit
        if limit is not None and rows > limit.rows:
            if limit.truncate:
                # The rest is drained, not cancelled: a cancel would fail the statement on the
                # server (and abort its transaction) although the client is told it succeeded.
                result.truncated = True
            else:
                self._abort_result(result, limit.refusal or self._row_limit_refusal(limit))
            return
        rewriter = result.rewriter
        if rewriter is None:
            self._to_client.append(raw)  # copied once, by take_to_client's join
        else:
            self._to_client.append(rewriter(body))
        # The DataRows right behind this one go in one step: up to the row limit, and never
        # past the next message of another kind (which the loop in _tracked_server reads).
        more = _MANY_ROWS if limit is None else limit.rows - rows
        count = 0
        if more > 0:
            run, count = self._server.take_run(DATA_ROW, more)
            if count:
                rows += count
                if rewriter is None:
                    self._to_client.append(run)
                else:
                    self._to_client.append(self._rewrite_run(rewriter, run))
        result.rows = rows
        self._counters.rows += 1 + count
        if head.record is not None:
            head.record.rows += 1 + count

    def _rewrite_run(self, rewriter: RowRewriter, run: memoryview) -> bytes:
        """A run of whole DataRow messages, rewritten: in one call if the rewriter can."""
        run_rows = getattr(rewriter, "run", None)
        if run_rows is not None:
            out, _, _ = run_rows(run, 0, _MANY_ROWS, len(run))
            assert isinstance(out, bytes)
            return out
        parts = []
        pos = 0
        end = len(run)
        while pos < end:
            (length,) = INT32.unpack_from(run, pos + 1)
            parts.append(rewriter(run[pos + 5 : pos + 1 + length]))
            pos += 1 + length
        return b"".join(parts)

    @staticmethod
    def _row_limit_refusal(limit: RowLimit) -> Refuse:
        return Refuse(
            "54000",
            f"topeng: result exceeds max_rows_per_query ({limit.rows} rows) for this role",
            detail=f"The statement returned more than {limit.rows} rows; it was cancelled.",
            hint="Add a LIMIT, or narrow the WHERE clause to the rows you need.",
            reason="row_limit",
        )

    def _abort_result(self, result: Result, refusal: Refuse) -> None:
        """Stop forwarding this result; cancel the statement; its end becomes the refusal."""
        result.aborted = refusal
        self.cancel_requested = True
        self._counters.refused += 1

    def _internal_reply(self, head: Pending, mtype: int, body: memoryview) -> None:
        result = head.internal
        assert result is not None
        if mtype == ROW_DESC:
            codec = self.client_codec
            result.columns = tuple(f.name for f in m.RowDescription.decode(body, codec).fields)
        elif mtype == ERROR:
            result.error = m.ErrorFields.decode(body, self.client_codec)
        elif mtype == READY:
            self.transaction_status = m.ReadyForQuery.decode(body).status
            self._pop()
            result.done = True
            if self.on_internal_done is not None:
                self.on_internal_done(result)
        elif mtype in (CMD_COMPLETE, EMPTY_QUERY):
            pass
        elif mtype in (COPY_IN, COPY_OUT, COPY_BOTH):
            raise ProtocolViolation("Topeng's own query started a COPY")

    def _start_result(
        self, decision: Decision, description: m.RowDescription | None, formats: tuple[int, ...]
    ) -> None:
        policy = self.policy
        if policy is None:
            self._result = Result(decision, None)
            return
        if isinstance(decision, Refuse):
            result = Result(decision, None)
            self._abort_result(result, decision)
            self._result = result
            return
        planned: RowRewriter | Refuse | None = None
        if isinstance(decision, Mask):
            if description is None:
                raise ProtocolViolation("rows to mask arrived without a row description")
            planned = policy.plan_rows(decision, description, formats)
        elif description is not None:
            # Allowed statements are checked too: the row description is the second source of
            # truth about where each column comes from.
            planned = policy.plan_rows(decision, description, formats)
        result = Result(decision, None, policy.row_limit(decision))
        if isinstance(planned, Refuse):
            self._abort_result(result, planned)
        else:
            result.rewriter = planned
        self._result = result

    def _reply(self, head: Pending, mtype: int, body: memoryview, raw: memoryview) -> None:
        out = self._to_client
        kind = head.kind
        if head.silent and mtype != READY:
            self._silent_reply(head, mtype)
            return
        if mtype == ERROR:
            self._error(head, raw, body)
            return
        if mtype == READY:
            status = m.ReadyForQuery.decode(body).status
            # Entries skipped after an error never got replies: drop them up to this one.
            while self._queue and self._queue[0].kind not in GROUP_ENDS:
                self._pop()
            if not self._queue:
                raise ProtocolViolation("server said ReadyForQuery when none was expected")
            group = self._pop()
            self.transaction_status = status
            self._result = None
            self._copy_in = False
            if status == "I":
                # Portals end with their transaction.
                self._portals.clear()
            if group.aborted and status == "T" and not self._queue:
                # PostgreSQL would have failed this transaction with the error Topeng sent in
                # its place: make the server's state match with a statement bound to fail.
                self._queue.append(Pending(Kind.POISON))
                self._to_server.append(m.Query(POISON_SQL).encode())
                return
            out.append(raw)
            return
        if kind is Kind.SIMPLE:
            self._simple_reply(head, mtype, body, raw)
            return
        if kind is Kind.PARSE and mtype == PARSE_OK:
            if head.statement is not None:
                head.statement.created = True
            self._pop()
        elif kind is Kind.BIND and mtype == BIND_OK:
            self._pop()
        elif kind is Kind.CLOSE and mtype == CLOSE_OK:
            # Only the object this Close was sent for: a Parse or Bind of the same name may
            # already have replaced it.
            stmt, portal = head.statement, head.portal
            if stmt is not None and self._statements.get(stmt.name) is stmt:
                del self._statements[stmt.name]
            if portal is not None and self._portals.get(portal.name) is portal:
                del self._portals[portal.name]
            self._pop()
        elif kind is Kind.DESCRIBE_STATEMENT and mtype == PARAM_DESC:
            pass  # RowDescription or NoData follows
        elif kind in DESCRIBES and mtype in (ROW_DESC, NO_DATA):
            desc = self._row_description(body)[0] if mtype == ROW_DESC else NO_COLUMNS
            if head.statement is not None:
                head.statement.description = desc
            if head.portal is not None:
                head.portal.description = desc
            self._pop()
            if head.hidden:
                return
        elif kind is Kind.EXECUTE and mtype in (COPY_OUT, COPY_IN, COPY_BOTH):
            replacement = self._copy_reply(head, mtype, body)
            if replacement is not None:
                self._to_client.append(replacement)
                return
        elif kind is Kind.EXECUTE and mtype in (COPY_DATA, COPY_DONE):
            replacement = self._copy_data(head, raw, body)
            if replacement is not None:
                self._to_client.append(replacement)
                return
        elif kind is Kind.EXECUTE:
            try:
                self._execute_reply(head, mtype, body)
            except _Replaced:
                return
        elif kind is Kind.FUNCTION and mtype == FUNC_RESULT:
            if head.refusal is not None:
                # Topeng sent a call bound to fail in its place: a result means the server is
                # not the PostgreSQL Topeng knows. Never forward it.
                raise ProtocolViolation("the server answered a function call Topeng refused")
        elif kind is Kind.SYNC:
            raise ProtocolViolation(f"unexpected message {chr(mtype)!r} before ReadyForQuery")
        else:
            raise ProtocolViolation(
                f"unexpected message {chr(mtype)!r} from server while waiting for {kind.value}"
            )
        out.append(raw)

    def _end_result(self, head: Pending, mtype: int, body: memoryview) -> bytes | None:
        """The end of a result (CommandComplete, EmptyQueryResponse, PortalSuspended, or an
        ErrorResponse). Returns what replaces it for the client, or None to forward it as is."""
        result = self._result
        self._result = None
        if result is None:
            return None
        if self.policy is not None and result.rows:
            self.policy.rows_sent(result.decision, result.rows)
        if result.aborted is not None:
            self._silence_rest(head)
            refusal = result.aborted
            if head.record is not None:
                head.record.refused(refusal)
            return m.error_response(
                refusal.sqlstate, refusal.message, detail=refusal.detail, hint=refusal.hint
            )
        if result.truncated and mtype in (CMD_COMPLETE, SUSPENDED):
            assert result.limit is not None
            notice = m.notice_response(
                f"topeng: result truncated at {result.limit.rows} rows (max_rows_per_query)",
                severity="NOTICE",
            )
            return notice + m.CommandComplete(f"SELECT {result.rows}").encode()
        return None

    def _silence_rest(self, head: Pending) -> None:
        """After an aborted result, emulate PostgreSQL's reaction to an error: the rest of a
        simple query, or the rest of an extended batch up to Sync, produces nothing more."""
        if head.kind is Kind.SIMPLE:
            head.silent = True
            head.aborted = True
            return
        for entry in self._queue:
            if entry.kind is Kind.SYNC:
                entry.aborted = True
                break
            entry.silent = True

    def _execute_reply(self, head: Pending, mtype: int, body: memoryview) -> None:
        if mtype in (CMD_COMPLETE, EMPTY_QUERY, SUSPENDED):
            if mtype == CMD_COMPLETE and bytes(body).startswith(DDL_TAGS):
                self.schema_changed = True
            replacement = self._end_result(head, mtype, body)
            self._pop()
            if replacement is not None:
                self._to_client.append(replacement)
                raise _Replaced
            return
        raise ProtocolViolation(f"unexpected message {chr(mtype)!r} in the result of Execute")

    def _drop_stray_markers(self) -> None:
        # A CopyDone or CopyFail outside any COPY expects no reply.
        while self._queue and self._queue[0].kind is Kind.COPY_END:
            self._queue.popleft()
            self._copy_markers -= 1

    def _drop_syncs_inside_copy(self) -> None:
        """The server ignores Syncs that arrive inside COPY FROM STDIN: forget those the client
        sent before it heard of the COPY (up to where it ended the COPY, if it has)."""
        if len(self._queue) < 2:
            return
        head = self._queue.popleft()
        kept: deque[Pending] = deque([head])
        inside = True
        while self._queue:
            entry = self._queue.popleft()
            if inside and entry.kind is Kind.SYNC:
                continue
            if inside and entry.kind is Kind.COPY_END:
                inside = False
                self._copy_markers -= 1
                self._copy_in = False
                continue
            kept.append(entry)
        self._queue = kept

    def _silent_reply(self, head: Pending, mtype: int) -> None:
        """Consume a reply the client must not see, keeping the queue in step."""
        kind = head.kind
        if mtype == COPY_IN:
            # The client will send no data for a COPY it never heard of: end it on the server.
            self._to_server.append(m.CopyFail("topeng: statement skipped after an error").encode())
        if kind is Kind.SIMPLE:
            return  # everything up to ReadyForQuery
        if mtype == ERROR:
            # The server now skips to Sync, as the client already believes it did.
            while self._queue and self._queue[0].kind is not Kind.SYNC:
                self._pop()
            return
        done = (
            (kind is Kind.PARSE and mtype == PARSE_OK)
            or (kind is Kind.BIND and mtype == BIND_OK)
            or (kind is Kind.CLOSE and mtype == CLOSE_OK)
            or (
                kind in (Kind.DESCRIBE_STATEMENT, Kind.DESCRIBE_PORTAL)
                and mtype in (ROW_DESC, NO_DATA)
            )
            or (kind is Kind.EXECUTE and mtype in (CMD_COMPLETE, EMPTY_QUERY, SUSPENDED))
        )
        if done:
            self._pop()

    def _portal_result(self, head: Pending) -> None:
        portal = head.portal
        assert self.policy is not None
        if portal is None:
            # Rows from a portal Topeng did not see bound (a statement of SQL-level PREPARE,
            # say) have no plan: the policy decides, and a restricted one refuses.
            self._start_result(self.policy.unknown_portal(), None, ())
            return
        description = portal.description or portal.statement.description
        formats = () if description is None else self._formats(portal, description)
        self._start_result(portal.statement.decision, description, formats)

    @staticmethod
    def _formats(portal: Portal, description: m.RowDescription) -> tuple[int, ...]:
        """The format of each column of a portal's result, as its Bind asked."""
        f = portal.result_formats
        count = len(description.fields)
        if not f:
            return (0,) * count
        if len(f) == 1:
            return (f[0],) * count
        return tuple(f[i] if i < len(f) else 0 for i in range(count))

    def _copy_reply(self, head: Pending, mtype: int, body: memoryview) -> bytes | None:
        """CopyInResponse / CopyOutResponse. Returns a replacement for a refused COPY OUT."""
        if mtype == COPY_IN:
            self._copy_in = True
            self._drop_syncs_inside_copy()
            self._result = None
            return None
        if mtype == COPY_BOTH:
            raise ProtocolViolation("COPY BOTH (replication) is not supported in a tracked session")
        # COPY OUT: its rows are judged like any other result's.
        decision: Decision
        if head.kind is Kind.SIMPLE:
            if head.allow_all:
                decision = ALLOW
            elif head.index < len(head.decisions):
                decision = head.decisions[head.index]
            else:
                raise ProtocolViolation("more results than statements")
        else:
            portal = head.portal
            assert self.policy is not None
            decision = portal.statement.decision if portal else self.policy.unknown_portal()
        result = Result(decision, None, is_copy=True)
        self._result = result
        policy = self.policy
        if policy is None:
            return None
        result.limit = policy.row_limit(decision)
        if isinstance(decision, Refuse):
            self._abort_result(result, decision)
            return b""
        planned = policy.plan_copy(decision, m.CopyResponse.decode_as(b"H", body))
        if isinstance(planned, Refuse):
            self._abort_result(result, planned)
            return b""  # the client hears of this COPY only through its error
        result.copy = planned
        return None

    def _copy_data(self, head: Pending, raw: memoryview, body: memoryview) -> bytes | None:
        """A CopyData or CopyDone of COPY OUT; returns what to send instead (b"" for nothing)."""
        result = self._result
        if result is None or not result.is_copy:
            # COPY data with no CopyOutResponse before it has no plan: never forward it.
            raise ProtocolViolation("the server sent COPY data without a CopyOutResponse")
        if result.aborted is not None or result.truncated:
            return b""
        if raw[0] == COPY_DONE:
            if result.copy is not None:
                tail = result.copy.finish()
                return (m.CopyData(tail).encode() if tail else b"") + bytes(raw)
            return None
        rows = result.rows + 1
        limit = result.limit
        if limit is not None and rows > limit.rows:
            if limit.truncate:
                result.truncated = True
            else:
                self._abort_result(result, limit.refusal or self._row_limit_refusal(limit))
            return b""
        result.rows = rows
        self._counters.rows += 1
        if head.record is not None:
            head.record.rows += 1
        if result.copy is None:
            return None
        out = result.copy.feed(bytes(body))
        return m.CopyData(out).encode() if out else b""

    def _simple_reply(self, head: Pending, mtype: int, body: memoryview, raw: memoryview) -> None:
        if mtype == ROW_DESC:
            desc, formats = self._row_description(body)
            decision: Decision | None = ALLOW if head.allow_all else None
            if head.index < len(head.decisions):
                decision = head.decisions[head.index]
            if decision is None:
                raise ProtocolViolation("more result sets than statements")
            self._start_result(decision, desc, formats)
        elif mtype in (CMD_COMPLETE, EMPTY_QUERY):
            if mtype == CMD_COMPLETE and bytes(body).startswith(DDL_TAGS):
                self.schema_changed = True
            head.index += 1
            replacement = self._end_result(head, mtype, body)
            if replacement is not None:
                self._to_client.append(replacement)
                return
        elif mtype in (COPY_OUT, COPY_IN, COPY_BOTH):
            replacement = self._copy_reply(head, mtype, body)
            if replacement is not None:
                self._to_client.append(replacement)
                return
        elif mtype in (COPY_DATA, COPY_DONE):
            replacement = self._copy_data(head, raw, body)
            if replacement is not None:
                self._to_client.append(replacement)
                return
        else:
            raise ProtocolViolation(f"unexpected message {chr(mtype)!r} in a simple query")
        self._to_client.append(raw)

    def _row_description(self, body: memoryview) -> tuple[m.RowDescription, tuple[int, ...]]:
        """The RowDescription of these bytes and the format of each column it names."""
        key = body.tobytes()
        found = self._descriptions.get(key)
        if found is None:
            desc = m.RowDescription.decode(key, self.client_codec)
            found = (desc, tuple(f.format for f in desc.fields))
            if len(self._descriptions) >= 64:
                self._descriptions.clear()
            self._descriptions[key] = found
        return found

    def _error(self, head: Pending, raw: memoryview, body: memoryview) -> None:
        refusal = head.refusal
        replacement = self._end_result(head, ERROR, body)
        record = head.record
        if record is not None and refusal is None and replacement is None:
            record.error = m.ErrorFields.decode(body, self.client_codec).sqlstate
        self._copy_in = False
        if head.kind in EXTENDED:
            # The server now skips everything up to Sync: so does the queue.
            if head.kind is Kind.PARSE and head.new_statement and head.statement is not None:
                self._statements.pop(head.statement.name, None)
            if head.kind is Kind.BIND and head.portal is not None:
                self._portals.pop(head.portal.name, None)
            while self._queue and self._queue[0].kind is not Kind.SYNC:
                self._pop()
            if not self._queue:
                # The client has not sent the Sync yet: what it sends until then is discarded.
                self._skipping = True
        if replacement is not None:
            # Topeng aborted this result (and cancelled it): its refusal replaces the error.
            head.silent = head.kind is Kind.SIMPLE
            self._to_client.append(replacement)
        elif refusal is not None:
            self._to_client.append(
                m.error_response(
                    refusal.sqlstate, refusal.message, detail=refusal.detail, hint=refusal.hint
                )
            )
        else:
            self._to_client.append(self._scrubbed(head, body, raw, b"E"))

    # ------------------------------------------------------------------ Topeng's own words

    def fatal(self, sqlstate: str, message: str, *, hint: str | None = None) -> bytes:
        """A FATAL ErrorResponse for the client; the caller closes the connection after it."""
        self.phase = Phase.CLOSED
        return m.error_response(sqlstate, message, severity="FATAL", hint=hint)


class SessionRefused(Exception):
    """The session must end: the client gets this refusal as a FATAL error."""

    def __init__(self, refusal: Refuse) -> None:
        super().__init__(refusal.message)
        self.refusal = refusal


class _Replaced(Exception):
    """Internal: the reply being handled was replaced by Topeng's own message."""


__all__ = [
    "InternalResult",
    "RowLimit",
    "Kind",
    "Phase",
    "Session",
    "StatementPolicy",
]
