"""The relay thread's gate (proxy/_relay.c, Session.gate_approvals and replay_request).

A restricted session between requests may be handed to the relay thread with approvals: the
thread forwards the approved prepared-statement round trips itself and hands back everything
else before forwarding it. Whatever the thread does, the client and the server must see
exactly the bytes they would have seen had the Python session handled every chunk, and the
session must count the same rows. So each conversation here runs twice between socketpairs,
once with the gate and once without, against a scripted server, and the two are compared.

The scripted server answers Parse, Bind, Describe, Execute, Sync and Query the way
PostgreSQL does; a Bind's first parameter says what its Execute returns: a number of rows,
`err` for an error, `alt` for another row description, `notice` for a notice before the rows.
"""

from __future__ import annotations

import os
import select
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from harness import needs_tool
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wirekit import send_all

from bench.tracked import ACCOUNTS_OID, pgbench_catalog, ready_session
from proxy import relay as relays
from proxy.policy.cache import AnalysisCache
from proxy.policy.engine import RestrictedPolicy
from proxy.policy.limits import MINUTE, Limiter, MemoryStore, make_limiter
from proxy.policy.rules import Rules, load_rules
from proxy.session import POISON_SQL, Approval, GateBudget, Session
from proxy.wire import messages as m
from proxy.wire.framing import FRONTEND_LIMITS, MessageReader

if relays.AVAILABLE:
    from proxy import _relay

REPO = Path(__file__).resolve().parents[2]
MAX_ROWS = 5
SQL = "SELECT abalance FROM pgbench_accounts WHERE aid = $1"
MASKED_SQL = "SELECT bid FROM pgbench_accounts WHERE aid = $1"  # bid: labelled here
BOUNDS = (0.001, 0.01, 0.1, 1.0)
# Random conversations per hypothesis test (GATE_EXAMPLES=400 for a longer search).
EXAMPLES = int(os.environ.get("GATE_EXAMPLES", "40"))


@pytest.fixture(autouse=True)
def _built() -> None:
    if not relays.AVAILABLE:
        needs_tool("the C module proxy._relay is not built (pip install -e . builds it)")


def rules(tmp: Path, extra: str = "", *, lookups: bool = False) -> Rules:
    """The gated role (`extra`: more of its keys); `lookups`: a lookup-limited label on aid."""
    (tmp / "00-gate.yaml").write_text(
        "version: 1\n"
        "roles:\n"
        "  gated:\n"
        "    users: [bench_agent]\n"
        "    statements: [select]\n"
        f"    max_rows_per_query: {MAX_ROWS}\n{extra}"
        "labels:\n"
        "  branch: [public.pgbench_accounts.bid]\n"
        + ("  account: [public.pgbench_accounts.aid]\n" if lookups else "")
        + "policies:\n"
        "  gated:\n"
        "    branch: {mask: redact}\n"
        + ("    account: {mask: redact, max_lookups_per_minute: 1000}\n" if lookups else "")
    )
    (tmp / "10-bank.yaml").write_text((REPO / "rules" / "bank.yaml").read_text())
    return load_rules(tmp)


def policy(
    r: Rules, limiter: Limiter | None = None, source: Callable[[], Rules] | None = None
) -> RestrictedPolicy:
    return RestrictedPolicy(
        r,
        r.role("gated"),
        pgbench_catalog(),
        ("pg_catalog", "public"),
        cache=AnalysisCache(),
        hash_key=b"k" * 32,
        on_masked=None,
        limiter=make_limiter(r) if limiter is None else limiter,
        user="bench_agent",
        rules_source=(lambda: r) if source is None else source,
    )


# ------------------------------------------------------------------ the scripted server

FIELD = m.FieldDescription("abalance", ACCOUNTS_OID, 3, 23, 4, -1, 0)
ALT_FIELD = m.FieldDescription("bid", ACCOUNTS_OID, 2, 23, 4, -1, 0)
# The same length and name as FIELD, but the rows come from the labelled column bid.
SAME_SHAPE_FIELD = m.FieldDescription("abalance", ACCOUNTS_OID, 2, 23, 4, -1, 0)


def description(param: bytes, sql: str) -> bytes:
    if param == b"alt" or "bid" in sql:
        return m.RowDescription((ALT_FIELD,)).encode()
    if param == b"same":
        return m.RowDescription((SAME_SHAPE_FIELD,)).encode()
    return m.RowDescription((FIELD,)).encode()


@dataclass
class ScriptedServer:
    """PostgreSQL's answers to the extended and simple protocol, for this test's statements."""

    reader: MessageReader = field(default_factory=lambda: MessageReader(FRONTEND_LIMITS))
    statements: dict[str, str] = field(default_factory=dict)
    portal_param: bytes = b"1"
    portal_sql: str = SQL
    portal_open: bool = False  # the unnamed portal exists (dropped at Sync outside a block)
    portal_left: int | None = None  # rows a suspended portal has left (None: not run yet)
    failed: bool = False  # an error in this batch: skip to Sync
    status: str = "I"  # "T" between BEGIN and COMMIT
    # Called once, before the next reply goes out (the request has reached the server).
    hook: Callable[[], None] | None = None

    def feed(self, data: bytes) -> bytes:
        self.reader.feed(data)
        out: list[bytes] = []
        while (msg := self.reader.next_raw()) is not None:
            mtype, body, _ = msg
            kind = chr(mtype)
            if kind == "S":
                self.failed = False
                if self.status == "I":
                    self.portal_open = False
                out.append(m.ReadyForQuery(self.status).encode())
            elif self.failed:
                continue
            elif kind == "P":
                p = m.Parse.decode(bytes(body))
                self.statements[p.name] = p.sql
                out.append(m.frame(b"1", b""))
            elif kind == "B":
                bind = m.Bind.decode(bytes(body))
                if bind.statement not in self.statements:
                    self.failed = True
                    out.append(m.error_response("26000", "prepared statement does not exist"))
                    continue
                self.portal_sql = self.statements[bind.statement]
                self.portal_param = (bind.params[0] or b"") if bind.params else b"1"
                self.portal_open, self.portal_left = True, None
                out.append(m.frame(b"2", b""))
            elif kind == "D" and bytes(body[:1]) == b"S":
                sql = self.statements.get(m.Describe.decode(bytes(body)).name)
                if sql is None:
                    self.failed = True
                    out.append(m.error_response("26000", "prepared statement does not exist"))
                    continue
                out.append(m.frame(b"t", b"\x00\x01\x00\x00\x00\x17"))  # one int4
                out.append(description(b"", sql))
            elif kind == "D":
                out.append(description(self.portal_param, self.portal_sql))
            elif kind == "E":
                execute = m.Execute.decode(bytes(body))
                if execute.portal or not self.portal_open:  # (only "" is ever bound here)
                    self.failed = True
                    out.append(m.error_response("34000", "portal does not exist"))
                    continue
                out.append(self._execute(execute.max_rows))
            elif kind == "Q":
                out.append(self._query(m.query_sql(body, "utf-8")))
            elif kind == "C":
                self.statements.pop(m.Close.decode(bytes(body)).name, None)
                out.append(m.frame(b"3", b""))
            else:
                raise AssertionError(f"the scripted server got {kind!r}")
        if out and self.hook is not None:
            hook, self.hook = self.hook, None
            hook()
        return b"".join(out)

    def _query(self, sql: str) -> bytes:
        """A query's reply; `aid = N` gives N % 10 rows, `1/0` an error (as does the poison
        Topeng sends in place of a refused query); BEGIN and COMMIT open and close a
        transaction block."""
        self.portal_open = False  # a Query drops the unnamed portal
        if sql in ("BEGIN", "COMMIT", "ROLLBACK"):
            notice = b""
            if (sql == "BEGIN") == (self.status == "T"):
                notice = m.frame(b"N", b"SWARNING\0C25001\0Mno transaction change\0\0")
            self.status = "T" if sql == "BEGIN" else "I"
            tag = m.CommandComplete(sql).encode()
            return notice + tag + m.ReadyForQuery(self.status).encode()
        if "1/0" in sql or sql == POISON_SQL:
            return m.error_response("22012", "division by zero") + m.ReadyForQuery("I").encode()
        digits = sql.split("aid = ", 1)[1].split()[0].rstrip(";") if "aid = " in sql else "1"
        rows = int(digits) % 10 if digits.isdigit() else 1
        parts = [description(b"", sql)]
        parts += [m.DataRow((str(i).encode(),)).encode() for i in range(rows)]
        parts += [m.CommandComplete(f"SELECT {rows}").encode()]
        parts.append(m.ReadyForQuery(self.status).encode())
        return b"".join(parts)

    def _execute(self, max_rows: int) -> bytes:
        """The portal's rows: all of them, or `max_rows` and PortalSuspended if there are
        more (the portal is dropped at Sync, as in autocommit)."""
        param = self.portal_param
        if param == b"err":
            self.failed = True
            return m.error_response("22012", "division by zero")
        parts = []
        if param == b"notice":
            parts.append(m.frame(b"N", b"SNOTICE\0C00000\0Mhello\0\0"))
            param = b"1"
        rows = 1 if param in (b"alt", b"same") else int(param)
        if self.portal_left is not None:
            rows = self.portal_left  # what a suspended portal has left
        suspended = 0 < max_rows < rows
        self.portal_left = rows - max_rows if suspended else 0
        if suspended:
            rows = max_rows
        parts += [m.DataRow((str(i).encode(),)).encode() for i in range(rows)]
        parts.append(
            m.frame(b"s", b"") if suspended else m.CommandComplete(f"SELECT {rows}").encode()
        )
        return b"".join(parts)


# ------------------------------------------------------------------ the driver

# The relay thread of these tests, one as in a Topeng process (a thread lives as long as the
# process), and which driver each session it holds belongs to.
_SHARED: list[object] = []
_OWNERS: dict[int, Driver] = {}


def shared_relay() -> object:
    if not _SHARED:
        _SHARED.append(_relay.Relay())
    return _SHARED[0]



@dataclass
class Driver:
    """A restricted Session between socketpairs, with (or without) the relay's gate, in the
    part Connection plays: hand over when approvals exist, take hand-backs, replay."""

    session: Session
    gated: bool
    relay: object = None
    rid: int | None = None
    approvals: list[Approval] = field(default_factory=list)
    server: ScriptedServer = field(default_factory=ScriptedServer)
    runs: int = 0
    rows_gated: int = 0
    handovers: int = 0
    handbacks: int = 0
    server_got: bytearray = field(default_factory=bytearray)  # all the server was sent
    last_back: relays.Handback | None = None
    buckets: list[int] = field(default_factory=lambda: [0] * (len(BOUNDS) + 1))
    budgets: list[GateBudget] = field(default_factory=list)  # held at each hand-over
    command_runs: int = 0  # of which transaction-control commands
    reclaimed: int = 0  # taken back for another session of the user

    def __post_init__(self) -> None:
        self.client_app, self.client_end = socket.socketpair()
        self.server_end, self.server_app = socket.socketpair()
        for s in (self.client_app, self.client_end, self.server_end, self.server_app):
            s.setblocking(False)
        self.relay = shared_relay()

    def close(self) -> None:
        if self.rid is not None:
            self._back(self._recall())
        for s in (self.client_app, self.client_end, self.server_end, self.server_app):
            s.close()

    def _try_gate(self) -> None:
        if not self.gated or self.rid is not None:
            return
        approvals = self.session.gate_approvals()
        if not approvals:
            return
        budget = self.session.gate_budget(self.reclaim)
        if budget is None:
            return
        self.budgets.append(budget)
        cscan, sscan = self.session.gate_scanners()
        self.approvals = approvals
        spec = (
            tuple(a.spec() for a in approvals),
            BOUNDS,
            budget.spec(),
            self.session.transaction_status,
        )
        self.rid = self.relay.add(  # type: ignore[attr-defined]
            self.client_end.fileno(),
            self.server_end.fileno(),
            cscan.relay_config(),
            sscan.relay_config(),
            cscan.relay_state(),
            sscan.relay_state(),
            spec,
        )
        _OWNERS[self.rid] = self
        self.handovers += 1

    def reclaim(self) -> None:
        """Another session of the user needs the budget held (Connection.ungate)."""
        if self.rid is not None:
            self.reclaimed += 1
            self._back(self._recall())

    def _recall(self) -> _relay.BackTuple:
        assert self.rid is not None
        _OWNERS.pop(self.rid, None)
        back: _relay.BackTuple = self.relay.recall(self.rid)  # type: ignore[attr-defined]
        return back

    def _back(self, item: _relay.BackTuple) -> None:
        back = relays._handback(item)[1]
        self.last_back = back
        self.rid = None
        self.handbacks += 1
        self._absorb(back)
        self.session.gate_ended(self.approvals, back.gate.inflight if back.gate else -1)
        send_all(self.client_end, back.to_client)
        send_all(self.server_end, back.to_server)
        assert back.gate is not None
        if back.gate.request:
            self.session.replay_request(back.gate.request)
        if back.chunk:
            if back.side == relays.CLIENT:
                self._from_client(back.chunk)
            else:
                self._from_server(back.chunk)

    def _absorb(self, back: relays.Handback) -> None:
        assert back.gate is not None
        self.session.relayed(back.client.nbytes, back.server.nbytes)
        for approval, runs, rows in zip(
            self.approvals, back.gate.runs, back.gate.rows, strict=True
        ):
            self.runs += runs
            self.rows_gated += rows
            if approval.command:
                self.command_runs += runs
            if runs:
                self.session.gated(approval, runs, rows)
        for i, n in enumerate(back.gate.buckets):
            self.buckets[i] += n
        self.session.gate_moved(
            self.approvals,
            back.gate.status,
            bool(back.gate.cleared),
            back.gate.bound,
            bool(back.gate.bound_described),
        )

    def _from_client(self, data: bytes) -> None:
        send_all(self.server_end, self.session.from_client(data))
        send_all(self.client_end, self.session.take_to_client())

    def _from_server(self, data: bytes) -> None:
        send_all(self.client_end, self.session.from_server(data))
        send_all(self.server_end, self.session.take_to_server())
        self.session.records.clear()
        self._try_gate()

    def service(self) -> None:
        for item in self.relay.take():  # type: ignore[attr-defined]
            owner = _OWNERS.pop(item[0], None)  # (another driver's, when two share the thread)
            if owner is not None:
                owner._back(item)
        if self.rid is not None:
            return
        for src, handle in (
            (self.client_end, self._from_client),
            (self.server_end, self._from_server),
        ):
            try:
                chunk = src.recv(1 << 18)
            except BlockingIOError:
                continue
            if chunk:
                handle(chunk)
            if self.rid is not None:
                return

    def exchange(self, request: bytes) -> bytes:
        """The client sends `request`; the scripted server answers each chunk it receives;
        returns what reached the client once it has a ReadyForQuery for each Sync/Query."""
        expected = sum(1 for t, _ in _types(request) if t in "SQ")
        send_all(self.client_app, request)
        got = bytearray()
        deadline = time.monotonic() + 20
        while sum(1 for t, _ in _types(bytes(got)) if t == "Z") < expected:
            assert time.monotonic() < deadline, f"stuck with {bytes(got)!r}"
            self.service()
            watch = [self.client_app, self.server_app, self.relay.fileno()]  # type: ignore[attr-defined]
            watch += [self.client_end, self.server_end]
            readable, _, _ = select.select(watch, [], [], 0.05)
            if self.server_app in readable:
                try:
                    received = self.server_app.recv(1 << 18)
                    self.server_got += received
                    send_all(self.server_app, self.server.feed(received))
                except BlockingIOError:
                    pass
            if self.client_app in readable:
                try:
                    got += self.client_app.recv(1 << 18)
                except BlockingIOError:
                    pass
        return bytes(got)


def _types(data: bytes) -> list[tuple[str, int]]:
    out, pos = [], 0
    while pos + 5 <= len(data):
        length = int.from_bytes(data[pos + 1 : pos + 5], "big")
        if pos + 1 + length > len(data):
            break
        out.append((chr(data[pos]), length))
        pos += 1 + length
    return out


# ------------------------------------------------------------------ requests


def parse(name: str, sql: str = SQL) -> bytes:
    return m.Parse(name, sql, ()).encode() + m.frame(b"S", b"")


def run(
    name: str,
    param: bytes,
    *,
    describe: bool = True,
    formats: tuple[int, ...] = (),
    max_rows: int = 0,
) -> bytes:
    parts = [m.Bind("", name, (), (param,), formats).encode()]
    if describe:
        parts.append(m.Describe("P", "").encode())
    parts += [m.Execute("", max_rows).encode(), m.frame(b"S", b"")]
    return b"".join(parts)


def describe(name: str) -> bytes:
    """Describe of a statement, as asyncpg sends it after Parse."""
    return m.Describe("S", name).encode() + m.frame(b"S", b"")


def query(aid: int | str = 1, extra: str = "") -> bytes:
    """The pgbench query; its reply holds aid % 10 rows."""
    return m.Query(f"SELECT abalance FROM pgbench_accounts WHERE aid = {aid}{extra}").encode()


def converse(
    tmp: Path,
    steps: list[bytes],
    *,
    gated: bool,
    extra: str = "",
    limiter: Limiter | None = None,
) -> tuple[list[bytes], Driver]:
    """The client's replies to each step; the last item is everything the server was sent (so
    comparing two conversations' lists compares both directions). `extra`: more keys of the
    role."""
    d = Driver(ready_session(policy(rules(tmp, extra), limiter)), gated=gated)
    try:
        replies = [d.exchange(step) for step in steps]
    finally:
        d.close()
    return [*replies, bytes(d.server_got)], d


@pytest.fixture
def tmp_rules(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path


# ------------------------------------------------------------------ tests


def test_the_steady_state_runs_in_the_thread_and_counts_as_python_would(tmp_rules: Path) -> None:
    steps = [parse("s1")] + [run("s1", b"1") for _ in range(20)]
    gated, g = converse(tmp_rules, steps, gated=True)
    plain, p = converse(tmp_rules, steps, gated=False)
    assert gated == plain
    # The first round trip plans the rows, the second finds them passing in one step and
    # leaves the approval; the thread runs the other 18.
    assert g.handovers == 1
    assert g.runs == 18 and g.rows_gated == 18
    assert sum(g.buckets) == 18, "each round trip the thread ran is in the duration histogram"
    assert g.session.counters.rows == p.session.counters.rows == 20
    assert g.session.counters.bytes_in == p.session.counters.bytes_in
    assert g.session.counters.bytes_out == p.session.counters.bytes_out


def test_runs_without_describe_of_a_described_statement_run_in_the_thread(
    tmp_rules: Path,
) -> None:
    """asyncpg's way: Parse and Describe the statement once, then Bind, Execute, Sync."""
    steps = [parse("s1"), describe("s1")] + [run("s1", b"1", describe=False) for _ in range(12)]
    steps += [run("s1", b"2"), run("s1", b"3", describe=False), run("s1", b"err", describe=False)]
    gated, g = converse(tmp_rules, steps, gated=True)
    plain, p = converse(tmp_rules, steps, gated=False)
    assert gated == plain
    assert g.runs >= 10, "after two in Python, the thread ran them"
    assert g.session.counters.rows == p.session.counters.rows == 17


def test_runs_with_a_row_count_run_in_the_thread(tmp_rules: Path) -> None:
    """asyncpg's fetchrow: Execute with a row count of 1; the reply ends in PortalSuspended
    when there were more rows, in CommandComplete when there were not."""
    one = run("s1", b"3", describe=False, max_rows=1)
    steps = [parse("s1"), describe("s1")] + [one] * 10
    steps += [
        run("s1", b"1", describe=False, max_rows=1),
        run("s1", b"0", describe=False, max_rows=1),
    ]
    steps += [run("s1", b"4", describe=False, max_rows=4), run("s1", b"2", max_rows=1)]
    gated, g = converse(tmp_rules, steps, gated=True)
    plain, p = converse(tmp_rules, steps, gated=False)
    assert gated == plain
    assert b"s\x00\x00\x00\x04" in gated[2], "the portal was suspended"
    assert g.runs >= 10
    assert g.session.counters.rows == p.session.counters.rows == 10 + 1 + 0 + 4 + 1


BEGIN, COMMIT, ROLLBACK = (m.Query(sql).encode() for sql in ("BEGIN", "COMMIT", "ROLLBACK"))
GO_ON = m.Execute("", 1).encode() + m.frame(b"S", b"")  # the open unnamed portal, one more row


def test_a_transaction_block_runs_in_the_thread_with_its_begin_and_commit(
    tmp_rules: Path,
) -> None:
    """psycopg's default (autocommit off): BEGIN, statements, COMMIT. Once BEGIN and COMMIT
    have been seen in Python, the thread runs them too, and the statements in between. The
    unnamed portal outlives a round trip inside a block: a portal the thread left suspended is
    run on (Execute without Bind) in Python, which knows it from the thread's report."""
    first = [BEGIN, run("s1", b"1"), run("s1", b"1"), COMMIT]
    inside = [run("s1", b"1")] * 4 + [query(1)] * 3 + [run("s1", b"3", max_rows=1), GO_ON, GO_ON]
    blocks = [parse("s1"), *first, *([BEGIN, *inside, COMMIT] * 3)]
    # After COMMIT the portal is gone: running it on fails on the server.
    steps = [*blocks, GO_ON, ROLLBACK, BEGIN, BEGIN]
    gated, g = converse(tmp_rules, steps, gated=True)
    plain, p = converse(tmp_rules, steps, gated=False)
    assert gated == plain
    assert g.session.counters.rows == p.session.counters.rows
    assert g.session.transaction_status == p.session.transaction_status == "T"
    assert b"0A000" not in b"".join(gated), "no portal went unknown to Topeng"
    assert b"34000" in gated[len(blocks)]
    # The transaction status is the one of the last reply the thread forwarded (COMMIT's).
    _, last = converse(tmp_rules, blocks, gated=True)
    assert last.last_back is not None and last.last_back.why == relays.RECALLED
    assert last.session.transaction_status == "I"
    assert g.command_runs >= 5, "BEGIN and COMMIT ran in the thread"
    assert g.runs - g.command_runs >= 15, "and the statements between them"


def test_runs_without_describe_of_an_undescribed_statement_stay_in_python(
    tmp_rules: Path,
) -> None:
    """Topeng describes such a portal itself: the request does not go as it came."""
    steps = [parse("s1")] + [run("s1", b"1", describe=False) for _ in range(6)]
    gated, g = converse(tmp_rules, steps, gated=True)
    plain, _ = converse(tmp_rules, steps, gated=False)
    assert gated == plain
    assert g.handovers == 0 and g.runs == 0


@pytest.mark.parametrize(
    ("label", "request_"),
    [
        ("more rows than the role may see: refused by the policy", run("s1", b"6")),
        ("an error", run("s1", b"err")),
        ("another row description", run("s1", b"alt")),
        ("a row description of the same size from a labelled column", run("s1", b"same")),
        ("a notice among the replies", run("s1", b"notice")),
        ("no Describe", run("s1", b"1", describe=False)),
        ("binary results", run("s1", b"1", formats=(1,))),
        ("two round trips in one chunk", run("s1", b"1") + run("s1", b"2")),
        ("a simple query", query(1)),
        ("a new statement", parse("s2")),
        ("a statement the thread was not given", run("nope", b"1")),
    ],
)
def test_anything_else_comes_back_to_python_first(
    tmp_rules: Path, label: str, request_: bytes
) -> None:
    steps = [parse("s1"), run("s1", b"1"), run("s1", b"2"), request_, run("s1", b"3")]
    gated, g = converse(tmp_rules, steps, gated=True)
    plain, p = converse(tmp_rules, steps, gated=False)
    assert gated == plain, label
    assert g.handbacks >= 2, "handed back for the odd one out (and at the end)"
    assert g.session.counters.rows == p.session.counters.rows
    assert g.session.transaction_status == p.session.transaction_status == "I"


def test_the_row_limit_still_refuses(tmp_rules: Path) -> None:
    steps = [parse("s1"), run("s1", b"1"), run("s1", b"1"), run("s1", b"6")]
    replies, g = converse(tmp_rules, steps, gated=True)
    last = replies[-2]
    assert b"54000" in last, "max_rows_per_query refused the six rows"
    assert m.DataRow((b"4",)).encode() in last, "rows up to the limit went on"
    assert m.DataRow((b"5",)).encode() not in last, "the sixth row never reached it"
    assert g.handovers >= 1 and g.runs == 0, "the thread handed the six rows back"


def test_a_message_past_the_limits_comes_back_unforwarded_and_is_refused(
    tmp_rules: Path,
) -> None:
    """A gated client that lies about a length: the thread forwards nothing of it, and the
    session refuses it as it would have (the connection then ends, with FATAL 08P01)."""
    from proxy.wire.framing import ProtocolViolation

    d = Driver(ready_session(policy(rules(tmp_rules))), gated=True)
    try:
        for step in (parse("s1"), run("s1", b"1"), run("s1", b"1")):
            d.exchange(step)
        assert d.rid is not None, "gated"
        sent_before = len(d.server_got)
        send_all(d.client_app, b"B" + (1 << 30).to_bytes(4, "big") + b"\0" * 16)
        with pytest.raises(ProtocolViolation):
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                d.service()
                select.select([d.relay.fileno()], [], [], 0.05)  # type: ignore[attr-defined]
        assert d.handbacks == 1
        time.sleep(0.1)
        assert not _readable(d.server_app) and len(d.server_got) == sent_before
    finally:
        d.close()


def test_a_server_gone_mid_statement_comes_back_with_the_request(tmp_rules: Path) -> None:
    """The server closes while a gated request is in flight: the session comes back with that
    request, and after the replay it knows a statement was running (so Topeng tells the client
    the connection to the server was lost, and does not call the session idle)."""
    d = Driver(ready_session(policy(rules(tmp_rules))), gated=True)
    try:
        for step in (parse("s1"), run("s1", b"1"), run("s1", b"1")):
            d.exchange(step)
        assert d.rid is not None
        send_all(d.client_app, run("s1", b"1"))
        deadline = time.monotonic() + 10
        while not _readable(d.server_app):
            assert time.monotonic() < deadline
        d.server_app.recv(1 << 16)  # the request reached the server, which now goes away
        d.server_app.close()
        while d.rid is not None:
            assert time.monotonic() < deadline
            d.service()
            select.select([d.relay.fileno()], [], [], 0.05)  # type: ignore[attr-defined]
        assert d.handbacks == 1
        assert d.last_back is not None and d.last_back.why == relays.CLOSED
        assert d.last_back.gate is not None and d.last_back.gate.request == run("s1", b"1")
        assert not d.session.idle, "the replayed statement is still owed its reply"
    finally:
        d.server_app = socket.socket()  # (closed above; close() closes it again)
        d.close()


def _readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0.05)[0])


def test_a_masked_statement_is_never_approved(tmp_rules: Path) -> None:
    d = Driver(ready_session(policy(rules(tmp_rules))), gated=True)
    try:
        d.exchange(parse("s1", MASKED_SQL))
        d.exchange(run("s1", b"1"))
        assert d.session.gate_approvals() == []
        assert d.handovers == 0
    finally:
        d.close()


@pytest.mark.parametrize(
    ("extra", "lookups"), [("    statement_timeout: 30s\n", False), ("", True)]
)
def test_a_role_with_a_timeout_or_lookup_limits_is_never_gated(
    tmp_rules: Path, extra: str, lookups: bool
) -> None:
    r = rules(tmp_rules, extra, lookups=lookups)
    d = Driver(ready_session(policy(r)), gated=True)
    try:
        d.exchange(parse("s1"))
        for _ in range(3):
            d.exchange(run("s1", b"1"))
        assert d.session.gate_approvals() is None
        assert d.handovers == 0
    finally:
        d.close()


def test_a_replayed_request_that_would_not_go_as_it_came_is_refused(tmp_rules: Path) -> None:
    from proxy.session import GateMismatch

    session = ready_session(policy(rules(tmp_rules)))
    session.from_client(parse("s1", MASKED_SQL))
    session.from_server(m.frame(b"1", b"") + m.ReadyForQuery("I").encode())
    session.take_to_client()
    # Without Describe, rows to mask need their description: Topeng would add its own.
    with pytest.raises(GateMismatch):
        session.replay_request(run("s1", b"1", describe=False))


def test_simple_queries_of_one_shape_run_in_the_thread(tmp_rules: Path) -> None:
    steps = [query(10 * i + 1) for i in range(20)]
    gated, g = converse(tmp_rules, steps, gated=True)
    plain, p = converse(tmp_rules, steps, gated=False)
    assert gated == plain
    assert g.handovers == 1 and g.runs == 18, "after two in Python, the thread runs the rest"
    assert g.session.counters.queries == p.session.counters.queries == 20
    assert g.session.counters.rows == p.session.counters.rows == 20


@pytest.mark.parametrize(
    ("label", "request_"),
    [
        ("more rows than the role may see", query(16)),
        ("an error", m.Query("SELECT abalance FROM pgbench_accounts WHERE aid = 1/0").encode()),
        ("another shape", query(1, " AND bid = 2")),
        ("a string where the integer was", query("'1'")),
        ("a negative number", query(-1)),
        ("two statements", m.Query("SELECT 1; SELECT 2").encode()),
        ("a labelled column", m.Query("SELECT bid FROM pgbench_accounts WHERE aid = 1").encode()),
    ],
)
def test_other_queries_come_back_to_python_first(
    tmp_rules: Path, label: str, request_: bytes
) -> None:
    steps = [query(1), query(11), query(21), request_, query(31)]
    gated, g = converse(tmp_rules, steps, gated=True)
    plain, p = converse(tmp_rules, steps, gated=False)
    assert gated == plain, label
    assert g.handovers >= 1
    assert g.session.counters.queries == p.session.counters.queries
    assert g.session.counters.rows == p.session.counters.rows


BASE = "SELECT abalance FROM pgbench_accounts WHERE aid = {} AND 'k' <> {}"


def thread_ran(tmp: Path, text: str) -> bool:
    """Whether the thread ran `text` itself, after two queries of the template BASE."""
    steps = [BASE.format(1, "'v'"), BASE.format(11, "'w'"), text]
    _, g = converse(tmp, [m.Query(t).encode() for t in steps], gated=True)
    assert g.handovers >= 1
    return g.runs == 1


@pytest.mark.parametrize(
    "text",
    [
        BASE.format(21, "'x'"),
        BASE.format("000021", "''"),
        BASE.format(31, "'it''s -- /* $$ ; é'"),
        BASE.format("1" * 32, "'x'"),
    ],
)
def test_texts_that_fill_the_template_run_in_the_thread(tmp_rules: Path, text: str) -> None:
    assert thread_ran(tmp_rules, text)


@pytest.mark.parametrize(
    "text",
    [
        BASE.format(21, "'x'") + " OR true",
        BASE.format(21, "'x'") + ";",
        BASE.format(" 21", "'x'"),
        BASE.format("'21'", "'x'"),
        BASE.format("21e1", "'x'"),
        BASE.format("0x15", "'x'"),
        BASE.format("2.1", "'x'"),
        BASE.format("-21", "'x'"),
        BASE.format("1" * 33, "'x'"),
        BASE.format(21, "'x\\'"),
        BASE.format(21, "E'x'"),
        BASE.format(21, "'x' || 'y'"),
        BASE.format(21, "'x'' <> 'y'"),
        BASE.format(21, "$$x$$"),
        BASE.format(21, "'x'\n'y'"),
        BASE.format(21, "'x'") + " -- 'v'",
    ],
)
def test_texts_that_do_not_fill_it_come_back(tmp_rules: Path, text: str) -> None:
    assert not thread_ran(tmp_rules, text)


STEP = st.sampled_from(
    [
        run("s1", b"1"),
        run("s1", b"0"),
        run("s1", b"5"),
        run("s1", b"6"),
        run("s1", b"err"),
        run("s1", b"alt"),
        run("s1", b"same"),
        run("s1", b"notice"),
        run("s1", b"1", describe=False),
        run("s2", b"2", describe=False),
        run("s1", b"3", describe=False, max_rows=1),
        run("s1", b"3", max_rows=2),
        run("s1", b"2", describe=False, max_rows=2),
        run("s1", b"6", max_rows=6),
        describe("s2"),
        run("s2", b"2"),
        run("s1", b"1") + run("s2", b"1"),
        query(1),
        query(3),
        query(16),
        query(1, " AND bid = 2"),
        query("'7'"),
        m.Query("SELECT abalance FROM pgbench_accounts WHERE aid = 1/0").encode(),
        m.Close("S", "s2").encode() + m.frame(b"S", b""),
        BEGIN,
        COMMIT,
        ROLLBACK,
        GO_ON,
        parse("s2"),
    ]
)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.lists(STEP, min_size=1, max_size=12))
def test_any_conversation_is_the_same_with_the_gate(tmp_rules: Path, steps: list[bytes]) -> None:
    steps = [parse("s1"), parse("s2"), run("s1", b"1"), run("s2", b"1"), query(1), *steps]
    gated, g = converse(tmp_rules, steps, gated=True)
    plain, p = converse(tmp_rules, steps, gated=False)
    assert gated == plain
    assert g.session.counters.rows == p.session.counters.rows
    assert g.session.counters.bytes_in == p.session.counters.bytes_in


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.lists(STEP, min_size=1, max_size=16))
def test_any_conversation_of_a_rated_role_is_the_same_with_the_gate(
    tmp_rules: Path, steps: list[bytes]
) -> None:
    """As above, for a role with statement and row rates (40 rows a minute: most of these
    conversations run out), whose gated sessions spend budgets held ahead."""
    steps = [parse("s1"), parse("s2"), run("s1", b"1"), run("s2", b"1"), query(1), *steps]
    gl, pl = frozen_limiter(), frozen_limiter()
    gated, g = converse(tmp_rules, steps, gated=True, extra=RATES, limiter=gl)
    plain, p = converse(tmp_rules, steps, gated=False, extra=RATES, limiter=pl)
    assert gated == plain
    for what in ("rows", "queries"):
        assert used(gl, what) == used(pl, what)
    assert g.session.counters.rows == p.session.counters.rows
    assert g.session.counters.bytes_in == p.session.counters.bytes_in


# ------------------------------------------------------------------ rate limits

RATES = "    max_rows_per_minute: 40\n    max_queries_per_minute: 64\n"
# 20 s into a minute: every charge of these tests falls in one window, whatever the real time.
FROZEN = 60.0 * 29_000_000 + 20.0


def frozen_limiter(at: float = FROZEN) -> Limiter:
    return Limiter(MemoryStore(), clock=lambda: at)


def used(limiter: Limiter, what: str) -> int:
    return limiter.used(f"{what}:bench_agent", MINUTE)


def test_a_rated_role_spends_a_budget_held_ahead_and_is_refused_as_python_would(
    tmp_rules: Path,
) -> None:
    # 40 rows a minute: one row per run, so the 41st run is refused (53400), as is the rest.
    steps = [parse("s1")] + [run("s1", b"1") for _ in range(44)]
    gl, pl = frozen_limiter(), frozen_limiter()
    gated, g = converse(tmp_rules, steps, gated=True, extra=RATES, limiter=gl)
    plain, p = converse(tmp_rules, steps, gated=False, extra=RATES, limiter=pl)
    assert gated == plain
    assert [b"53400" in reply for reply in plain[:-1]] == [False] * 41 + [True] * 4
    # A share is 1/8 of what is left of each rate, held while it is at least 4: after two
    # runs in Python, 38 rows and 62 statements are left.
    assert g.budgets[:2] == [GateBudget(7, 4, 40.0), GateBudget(7, 4, 40.0)]
    # Two holds of 4 runs each (the 7th run comes back: no row left of the hold); then a
    # share of what is left (29 rows) is under 4, and the rest is judged in Python.
    assert g.handovers == 2 and g.runs == 8
    # What stays charged is what was used: every hold was given back but for its use.
    assert used(gl, "rows") == used(pl, "rows") == 40
    assert used(gl, "queries") == used(pl, "queries") == 40, "a refused run costs nothing"
    assert g.session.counters.rows == p.session.counters.rows == 40


def test_a_budget_ends_with_its_rate_window(tmp_rules: Path) -> None:
    # 1.5 s before the minute ends: the budget lasts 1.5 s, then the next request comes back.
    limiter = frozen_limiter(FROZEN + 38.5)
    d = Driver(ready_session(policy(rules(tmp_rules, RATES), limiter)), gated=True)
    try:
        replies = [d.exchange(step) for step in [parse("s1")] + [run("s1", b"1")] * 4]
        assert d.handovers == 1 and d.handbacks == 0 and d.budgets[0].seconds == 1.5
        time.sleep(1.6)
        replies.append(d.exchange(run("s1", b"1")))
        assert d.handbacks == 1 and d.last_back is not None
        assert d.last_back.why == relays.CHUNK and d.last_back.side == relays.CLIENT
        assert d.handovers == 2, "handed over again, with a new budget"
    finally:
        d.close()
    assert all(b"53400" not in reply for reply in replies)
    assert used(limiter, "rows") == 5 and used(limiter, "queries") == 5


def test_no_budget_is_held_near_the_end_of_a_window_or_of_the_limit(tmp_rules: Path) -> None:
    steps = [parse("s1")] + [run("s1", b"1") for _ in range(4)]
    _, late = converse(
        tmp_rules, steps, gated=True, extra=RATES, limiter=frozen_limiter(FROZEN + 39.5)
    )
    assert late.handovers == 0, "the window ends within a second"
    spent = frozen_limiter()
    spent.add("rows:bench_agent", MINUTE, 10)  # after 10 rows, 30 left: a share of 3 rows
    _, low = converse(tmp_rules, steps, gated=True, extra=RATES, limiter=spent)
    assert low.handovers == 0
    assert used(spent, "rows") == 14


def test_another_session_of_the_user_takes_the_held_budget_back_when_it_needs_it(
    tmp_rules: Path,
) -> None:
    """Session A holds a share of the user's rows in the thread; session B, judged in Python,
    runs out of rows: A gives its hold back first, so B is refused exactly where it would be
    had A held nothing."""

    def scenario(a_gated: bool) -> tuple[list[bytes], Driver, Limiter]:
        limiter = frozen_limiter()
        r = rules(tmp_rules, RATES)
        a = Driver(ready_session(policy(r, limiter)), gated=a_gated)
        b = Driver(ready_session(policy(r, limiter)), gated=False)
        try:
            for step in [parse("s1")] + [run("s1", b"1")] * 4:  # 2 gated: 2 of 4 held left
                a.exchange(step)
            replies = [b.exchange(step) for step in [parse("s1")] + [run("s1", b"2")] * 20]
            replies.append(a.exchange(run("s1", b"1")))  # A: no rows are left for it
        finally:
            a.close()
            b.close()
        return replies, a, limiter

    held, a, limiter = scenario(True)
    unheld, _, unheld_limiter = scenario(False)
    assert held == unheld
    # 4 rows of A, then 18 runs of 2 rows of B: 40; the 19th is refused, as is A's next.
    assert [b"53400" in reply for reply in held] == [False] * 19 + [True] * 3
    assert a.handovers == 1 and a.reclaimed == 1, "A was gated, and taken back for B"
    assert a.last_back is not None and a.last_back.why == relays.RECALLED
    assert used(limiter, "rows") == used(unheld_limiter, "rows") == 40


def test_a_budget_spent_sends_the_next_request_to_python_first(tmp_rules: Path) -> None:
    """A's hold is spent when B, judged in Python, takes the user's last rows without
    needing it back: A's next request, even one that returns no rows, is refused as Python
    refuses it (no row is left for a statement that reads rows)."""

    def scenario(a_gated: bool) -> tuple[list[bytes], Driver]:
        limiter = frozen_limiter()
        r = rules(tmp_rules, RATES)
        a = Driver(ready_session(policy(r, limiter)), gated=a_gated)
        b = Driver(ready_session(policy(r, limiter)), gated=False)
        try:
            # A: 2 rows in Python, then a hold of 4 rows, all spent (6 charged).
            replies = [a.exchange(step) for step in [parse("s1")] + [run("s1", b"1")] * 6]
            # B: 6 runs of 4 rows and two of 5, 34: the user's 40, with never fewer rows
            # left than a run may return (5), so A's hold is not needed back.
            b_steps = [parse("s1")] + [run("s1", b"4")] * 6 + [run("s1", b"5")] * 2
            replies += [b.exchange(step) for step in b_steps]
            replies.append(a.exchange(run("s1", b"0")))
            assert used(limiter, "rows") == 40
        finally:
            a.close()
            b.close()
        return replies, a

    held, a = scenario(True)
    assert held == scenario(False)[0]
    assert a.budgets == [GateBudget(7, 4, 40.0)] and a.runs == 4 and a.reclaimed == 0
    assert b"53400" in held[-1] and all(b"53400" not in reply for reply in held[:-1])


def test_a_request_in_flight_when_its_window_ends_is_judged_as_it_was_forwarded(
    tmp_rules: Path,
) -> None:
    """The thread forwards a run 1.5 s before the rate window ends, and its reply comes after:
    the reply comes back to Python with the request, whose replay is not judged again (the
    new window has no rows left: judged again, it would be refused, and the session could
    not go on); its rows are, as Python judges them when they come: refused (53400)."""
    end = FROZEN + 40.0

    def scenario(gated: bool) -> tuple[list[bytes], Driver, Limiter]:
        now = [end - 1.5]
        limiter = Limiter(MemoryStore(), clock=lambda: now[0])

        def window_ends() -> None:
            time.sleep(1.6 if gated else 0.0)
            now[0] = end + 0.001
            limiter.add("rows:bench_agent", MINUTE, 40)  # another session's, in the new one

        d = Driver(ready_session(policy(rules(tmp_rules, RATES), limiter)), gated=gated)
        try:
            replies = [d.exchange(step) for step in [parse("s1")] + [run("s1", b"1")] * 2]
            d.server.hook = window_ends
            replies.append(d.exchange(run("s1", b"1")))
        finally:
            d.close()
        return replies, d, limiter

    held, d, limiter = scenario(True)
    plain, _, plain_limiter = scenario(False)
    assert held == plain
    assert b"53400" in held[-1] and b"more rows than are left" in held[-1]
    assert d.handovers == 1 and d.last_back is not None
    assert d.last_back.side == relays.SERVER and d.last_back.gate is not None
    assert d.last_back.gate.request, "it came back with the request in flight"
    for lim in (limiter, plain_limiter):  # 3 statements, 2 rows in the first window
        assert lim.store.get(("queries:bench_agent", MINUTE, int(end // MINUTE) - 1)) == 3
        assert lim.store.get(("rows:bench_agent", MINUTE, int(end // MINUTE) - 1)) == 2


def test_a_request_in_flight_when_the_rules_change_is_judged_by_the_rules_it_went_under(
    tmp_rules: Path,
) -> None:
    """A reload takes a gated session back (Connection.ungate) while its request is in
    flight: the replay is judged by the rules it was forwarded under, as Python judged it
    before the reload, and the next run by the new ones (abalance denied: refused)."""
    before = rules(tmp_rules)
    deny = tmp_rules / "deny"
    deny.mkdir()
    rules(deny)
    gate_yaml = (deny / "00-gate.yaml").read_text()
    (deny / "00-gate.yaml").write_text(
        gate_yaml.replace("bid]", "bid, public.pgbench_accounts.abalance]").replace(
            "{mask: redact}", "deny"
        )
    )
    after = load_rules(deny)

    def scenario(gated: bool) -> list[bytes]:
        current = [before]
        d = Driver(ready_session(policy(before, source=lambda: current[0])), gated=gated)

        def reload() -> None:
            current[0] = after
            d.reclaim()

        try:
            replies = [d.exchange(step) for step in [parse("s1")] + [run("s1", b"1")] * 3]
            d.server.hook = reload
            replies.append(d.exchange(run("s1", b"1")))
            if gated:
                assert d.reclaimed == 1 and d.last_back is not None
                assert d.last_back.gate is not None and d.last_back.gate.request
            replies.append(d.exchange(run("s1", b"1")))
        finally:
            d.close()
        return replies

    held = scenario(True)
    assert held == scenario(False)
    assert b"\x00\x01\x00\x00\x00\x010" in held[-2], "the run in flight sends its row"
    assert b"42501" in held[-1], "the next run is refused by the new rules"


@pytest.mark.parametrize("gone", ["client", "server"])
def test_a_session_that_ends_while_gated_gives_its_budget_back(tmp_rules: Path, gone: str) -> None:
    """The client vanishes, or the server closes with a request in flight, while the thread
    holds a rated session's budget: the session comes back, nothing more is held, and what
    stays charged is what was used (and the statement in flight, which was sent)."""
    limiter = frozen_limiter()
    d = Driver(ready_session(policy(rules(tmp_rules, RATES), limiter)), gated=True)
    try:
        for step in [parse("s1")] + [run("s1", b"1")] * 3:  # 2 in Python, 1 in the thread
            d.exchange(step)
        assert d.rid is not None and d.budgets == [GateBudget(7, 4, 40.0)]
        assert limiter.held("rows:bench_agent")
        if gone == "client":
            d.client_app.close()
        else:
            send_all(d.client_app, run("s1", b"1"))
            deadline = time.monotonic() + 10
            while not _readable(d.server_app):
                assert time.monotonic() < deadline
            d.server_app.recv(1 << 16)
            d.server_app.close()
        deadline = time.monotonic() + 10
        while d.rid is not None:
            assert time.monotonic() < deadline
            d.service()
            select.select([d.relay.fileno()], [], [], 0.05)  # type: ignore[attr-defined]
        assert d.last_back is not None and d.last_back.why == relays.CLOSED
    finally:
        d.client_app, d.server_app = socket.socket(), socket.socket()  # (closed above)
        d.close()
    assert not limiter.held("rows:bench_agent") and not limiter.held("queries:bench_agent")
    assert used(limiter, "rows") == 3
    assert used(limiter, "queries") == (3 if gone == "client" else 4)
