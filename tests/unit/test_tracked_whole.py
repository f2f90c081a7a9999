"""A restricted session's whole-chunk paths: a client chunk that is one Query or a Bind,
[Describe,] Execute, Sync, and a server chunk that is a whole reply group of the common shape,
are handled in one step (proxy/session.py, `_whole_request` and `_whole_groups`).

Each conversation here runs twice, with every side's bytes in one chunk (the whole paths) and
one byte at a time (never the whole paths: a byte is no whole message), and both runs must give
the same bytes in both directions, the same records, counts and state. The other tests check
that what the whole paths take for granted (a description already judged, the row limit, the
rules in force) is looked at every time. The real RestrictedPolicy over the bank catalog of the
policy fixtures judges everything.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from test_policy_fixtures import TEST_RULES
from test_tracked_memos import (
    INT8,
    RATED_RULES,
    VARCHAR,
    Source,
    _desc,
    _is_error,
    _load,
    _policy,
)
from wirekit import (
    SYNC,
    Chunking,
    Playbook,
    bind,
    bytewise,
    complete,
    data_row,
    describe_portal,
    error,
    execute,
    join,
    notice,
    parse,
    query,
    ready,
    ready_session,
    whole,
)

from proxy.policy.limits import Limiter, MemoryStore
from proxy.session import Session
from proxy.wire import messages as m

BIND_COMPLETE = m.frame(b"2", b"")
PARSE_COMPLETE = m.frame(b"1", b"")
ID = ("id", 1, INT8)
NAME = ("full_name", 2, VARCHAR)
NIK = ("nik", 3, VARCHAR)
LOOKUP = "SELECT id, full_name FROM bank.customers WHERE id = {}"
PREPARED = "SELECT id, full_name FROM bank.customers WHERE id = $1"
SECRET_NIK = "3273014501900001"


def _rows(n: int) -> bytes:
    return b"".join(data_row(str(i), f"Nama {i}") for i in range(n))


def _round(pb: Playbook, n: int, rows: int = 1, status: str = "I") -> tuple[bytes, bytes]:
    """One simple-protocol lookup: (what reached the server, what reached the client)."""
    sent = pb.to_server(query(LOOKUP.format(n)))
    got = pb.to_client(_desc(ID, NAME), _rows(rows), complete(f"SELECT {rows}"), ready(status))
    return sent, got


def _exchange(
    pb: Playbook, *, describe: bool = True, rows: int = 1, status: str = "I"
) -> tuple[bytes, bytes]:
    """One execution of prepared statement s1 (Bind, [Describe,] Execute, Sync)."""
    sent = pb.to_server(
        bind("", "s1", (b"7",)), describe_portal("") if describe else b"", execute(""), SYNC
    )
    # The server describes the portal if anyone asked (Topeng does when the client did not).
    reply = [BIND_COMPLETE, _desc(ID, NAME) if describe_portal("") in sent else b""]
    got = pb.to_client(*reply, _rows(rows), complete(f"SELECT {rows}"), ready(status))
    return sent, got


def _prepare(pb: Playbook) -> None:
    pb.to_server(parse(PREPARED, "s1"), SYNC)
    pb.to_client(PARSE_COMPLETE, ready())


Step = Callable[[Playbook], object]


def _conversation() -> list[Step]:
    """Steps of a restricted session: the common shapes, and everything next to them that the
    whole paths must leave to the general loop."""
    return [
        lambda pb: _round(pb, 1),
        lambda pb: _round(pb, 2),  # the description and the plan are known now
        lambda pb: _round(pb, 3, rows=0),
        lambda pb: _round(pb, 4, rows=3),
        # Two queries in one chunk each way (a pipelining client).
        lambda pb: (
            pb.client(query(LOOKUP.format(5)), query(LOOKUP.format(6))),
            pb.server(*[join(_desc(ID, NAME), _rows(1), complete("SELECT 1"), ready())] * 2),
        ),
        # A masked column: the rows are rewritten, by the general loop.
        lambda pb: (
            pb.client(query("SELECT id, nik FROM bank.customers WHERE id = 8")),
            pb.server(_desc(ID, NIK), data_row("8", SECRET_NIK), complete("SELECT 1"), ready()),
        ),
        # An error where the rows would be, and a notice among them.
        lambda pb: (
            pb.client(query(LOOKUP.format(9))),
            pb.server(error("57014", "canceling statement"), ready()),
        ),
        lambda pb: (
            pb.client(query(LOOKUP.format(10))),
            pb.server(_desc(ID, NAME), notice("hi"), _rows(1), complete("SELECT 1"), ready()),
        ),
        # More rows than max_rows_per_query (50 for the agent).
        lambda pb: _round(pb, 11, rows=51),
        lambda pb: _round(pb, 12, rows=50),
        # A tag after which the catalog may be stale.
        lambda pb: (
            pb.client(query(LOOKUP.format(14))),
            pb.server(_desc(ID, NAME), _rows(1), complete("CREATE TABLE"), ready()),
        ),
        # A transaction: portals end only with it.
        lambda pb: (pb.client(query("BEGIN")), pb.server(complete("BEGIN"), ready("T"))),
        lambda pb: _round(pb, 13, status="T"),
        _prepare,
        lambda pb: _exchange(pb, status="T"),
        lambda pb: _exchange(pb, status="T"),
        lambda pb: _exchange(pb, rows=3, status="T"),
        # Topeng describes the portal itself.
        lambda pb: _exchange(pb, describe=False, status="T"),
        lambda pb: _exchange(pb, describe=False, status="T"),
        lambda pb: _exchange(pb, rows=51, status="E"),
        lambda pb: (pb.client(query("ROLLBACK")), pb.server(complete("ROLLBACK"), ready("I"))),
        lambda pb: _exchange(pb),
        # Bind of a statement that does not exist: the server's error.
        lambda pb: (
            pb.client(bind("", "nope", ()), describe_portal(""), execute(""), SYNC),
            pb.server(error("26000", "prepared statement does not exist"), ready()),
        ),
        lambda pb: _exchange(pb),
    ]


def _state(session: Session) -> object:
    records = [
        (r.sql, r.decision, r.reason, r.message, r.labels, r.rows, r.error) for r in session.records
    ]
    c = session.counters
    changed, session.schema_changed = session.schema_changed, False
    return (
        changed,
        records,
        (c.queries, c.refused, c.masked, c.rows, c.bytes_in, c.bytes_out),
        session.transaction_status,
        session.idle,
        sorted(session._portals),
        sorted(session._statements),
    )


def _run(tmp_path: Path, chunking: Chunking) -> tuple[list[object], object]:
    pb = ready_session(_policy(Source(_load(tmp_path, "r.yaml", TEST_RULES))), chunking)
    flows = []
    for step in _conversation():
        flows.append(step(pb))
        flows.append(_state(pb.session))
    return flows, _state(pb.session)


def test_whole_chunks_and_single_bytes_give_the_same_conversation(tmp_path: Path) -> None:
    assert _run(tmp_path, whole) == _run(tmp_path, bytewise)


def test_the_whole_paths_are_taken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The equivalence above means something only if the whole paths ran."""
    taken = {"requests": 0, "groups": 0}
    request, groups = Session._whole_request, Session._whole_groups

    def counted_request(self: Session, data: bytes) -> bool:
        done = request(self, data)
        taken["requests"] += done
        return done

    def counted_groups(self: Session, data: bytes) -> int:
        done = groups(self, data)
        taken["groups"] += done == len(data)
        return done

    monkeypatch.setattr(Session, "_whole_request", counted_request)
    monkeypatch.setattr(Session, "_whole_groups", counted_groups)
    pb = ready_session(_policy(Source(_load(tmp_path, "r.yaml", TEST_RULES))))
    _round(pb, 1)
    _round(pb, 2)
    _prepare(pb)
    _exchange(pb)
    _exchange(pb)
    # Not the first reply (its description is new), nor the Parse's; the first execution
    # already, as its statement has the shape (and so the decision) of the simple lookup.
    assert taken == {"requests": 4, "groups": 3}


def test_a_known_statement_with_a_new_description_is_judged_again(tmp_path: Path) -> None:
    """The whole path must not pass a reply because its statement passed before: a Describe
    that now says the second column is the NIK gets the result refused."""
    pb = ready_session(_policy(Source(_load(tmp_path, "r.yaml", TEST_RULES))))
    _prepare(pb)
    for _ in range(2):
        assert b"Nama 0" in _exchange(pb)[1]
    pb.to_server(bind("", "s1", (b"7",)), describe_portal(""), execute(""), SYNC)
    out = pb.to_client(
        BIND_COMPLETE, _desc(ID, NIK), data_row("7", SECRET_NIK), complete("SELECT 1"), ready()
    )
    assert SECRET_NIK.encode() not in out
    assert _is_error(out, "0A000")


def test_a_known_statement_over_the_row_limit_is_refused(tmp_path: Path) -> None:
    pb = ready_session(_policy(Source(_load(tmp_path, "r.yaml", TEST_RULES))))
    for n in (1, 2):
        assert b"Nama 0" in _round(pb, n)[1]
    _, out = _round(pb, 3, rows=51)
    assert _is_error(out, "54000")
    assert b"Nama 50" not in out  # the 51st row
    _prepare(pb)
    for _ in range(2):
        assert b"Nama 0" in _exchange(pb)[1]
    _, out = _exchange(pb, rows=51)
    assert _is_error(out, "54000")
    assert b"Nama 50" not in out


def test_a_rules_reload_is_seen_by_the_whole_path(tmp_path: Path) -> None:
    """The same statement, the same description bytes: after a reload that labels full_name,
    the name must not pass as it came (the policy forgot every remembered pass)."""
    named = TEST_RULES.replace(
        '  email: ["*.*.email"]\n', '  email: ["*.*.email"]\n  name: ["*.*.full_name"]\n'
    ).replace(
        "    email: {mask: email}\n  supervisor:",
        "    email: {mask: email}\n    name: {mask: redact}\n  supervisor:",
    )
    source = Source(_load(tmp_path, "r.yaml", TEST_RULES))
    pb = ready_session(_policy(source))
    _prepare(pb)
    for n in (1, 2):
        assert b"Nama 0" in _round(pb, n)[1]
        assert b"Nama 0" in _exchange(pb)[1]
    source.rules = _load(tmp_path, "named.yaml", named)
    assert b"Nama 0" not in _round(pb, 3)[1]
    assert b"Nama 0" not in _exchange(pb)[1]
    assert [r.decision for r in pb.session.records[-2:]] == ["masked", "masked"]


def test_rows_of_a_whole_group_are_counted_and_recorded(tmp_path: Path) -> None:
    pb = ready_session(_policy(Source(_load(tmp_path, "r.yaml", TEST_RULES))))
    _round(pb, 1, rows=2)
    _round(pb, 2, rows=3)
    _prepare(pb)
    _exchange(pb, rows=4)
    _exchange(pb, rows=5)
    records = [r for r in pb.session.records if r.sql]
    assert [r.rows for r in records] == [2, 3, 4, 5]
    assert [r.decision for r in records] == ["allowed"] * 4
    assert all(r.finished >= r.started for r in records)
    assert pb.session.counters.rows == 14
    assert pb.session.counters.queries == 3  # two Queries and a Parse
    assert pb.session.idle


def test_a_whole_group_in_a_transaction_keeps_its_portals_until_the_end(tmp_path: Path) -> None:
    pb = ready_session(_policy(Source(_load(tmp_path, "r.yaml", TEST_RULES))))
    _prepare(pb)
    pb.to_server(query("BEGIN"))
    pb.to_client(complete("BEGIN"), ready("T"))
    _exchange(pb, status="T")
    _exchange(pb, status="T")
    assert pb.session.transaction_status == "T" and "" in pb.session._portals
    pb.to_server(bind("", "s1", (b"7",)), describe_portal(""), execute(""), SYNC)
    pb.to_client(BIND_COMPLETE, _desc(ID, NAME), _rows(1), complete("SELECT 1"), ready("I"))
    assert pb.session.transaction_status == "I" and not pb.session._portals


def test_rows_of_a_whole_group_are_charged_to_the_row_rate(tmp_path: Path) -> None:
    rules = TEST_RULES.replace(
        "    max_rows_per_query: 50\n", "    max_rows_per_query: 50\n    max_rows_per_minute: 10\n"
    )
    policy = _policy(Source(_load(tmp_path, "r.yaml", rules)), Limiter(MemoryStore()))
    pb = ready_session(policy)
    for n in (1, 2):
        assert b"Nama 3" in _round(pb, n, rows=4)[1]
    _, out = _round(pb, 3, rows=4)  # 8 of 10 used: the third and fourth row are too many
    assert _is_error(out, "53400")
    assert b"Nama 2" not in out


def test_rows_for_a_refused_execution_never_pass(tmp_path: Path) -> None:
    """The third execution is over max_queries_per_minute: Topeng sends an Execute bound to
    fail. A server that answers it with rows anyway must not get them to the client."""
    policy = _policy(Source(_load(tmp_path, "r.yaml", RATED_RULES)), Limiter(MemoryStore()))
    pb = ready_session(policy)
    _prepare(pb)
    for _ in range(2):
        assert b"Nama 0" in _exchange(pb)[1]
    sent, out = _exchange(pb)
    assert execute("") not in sent
    assert b"Nama 0" not in out
    assert _is_error(out, "0A000")  # rows Topeng never saw bound
    assert pb.session.records[-1].decision == "refused"
