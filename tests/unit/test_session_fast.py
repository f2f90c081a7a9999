"""Session in fast mode (no policy): bytes pass unchanged, headers are watched."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wirekit import (
    SYNC,
    TERMINATE,
    Chunking,
    Playbook,
    bind,
    bytewise,
    complete,
    cut,
    data_row,
    error,
    execute,
    join,
    parse,
    query,
    random_chunks,
    ready,
    ready_session,
    row_desc,
    rows_reply,
    whole,
)

from proxy.session import Phase
from proxy.wire import messages as m
from proxy.wire.framing import ProtocolViolation


@pytest.fixture(params=[whole, bytewise, random_chunks(3)], ids=["whole", "bytewise", "random"])
def chunking(request: pytest.FixtureRequest) -> Chunking:
    return request.param  # type: ignore[no-any-return]


def fast(chunking: Chunking = whole) -> Playbook:
    pb = ready_session(None, chunking)
    assert pb.session.mode == "fast"
    return pb


def test_bytes_pass_unchanged(chunking: Chunking) -> None:
    pb = fast(chunking)
    sent = join(query("SELECT nik FROM customer"), query("SELECT 1"))
    assert pb.to_server(sent) == sent
    reply = join(
        rows_reply(["nik"], [["3171011708900001"], [None]]),
        ready("I"),
        rows_reply(["?column?"], [["1"]]),
        ready("I"),
    )
    assert pb.to_client(reply) == reply


def test_returns_each_chunk_as_it_came() -> None:
    pb = fast()
    chunk = join(query("SELECT 1"))[:7]
    out = pb.session.from_client(chunk)
    assert out == chunk  # forwarded at once, even half a message


def test_transaction_status_follows_ready_for_query(chunking: Chunking) -> None:
    pb = fast(chunking)
    s = pb.session
    pb.to_server(query("BEGIN"))
    pb.to_client(complete("BEGIN"), ready("T"))
    assert s.transaction_status == "T"
    pb.to_server(query("SELECT 1/0"))
    pb.to_client(error("22012", "division by zero"), ready("E"))
    assert s.transaction_status == "E"
    pb.to_server(query("ROLLBACK"))
    pb.to_client(complete("ROLLBACK"), ready("I"))
    assert s.transaction_status == "I"


@pytest.mark.parametrize("split", range(1, 6))
def test_transaction_status_when_ready_for_query_is_split(split: int) -> None:
    pb = fast()
    s = pb.session
    s.from_client(query("BEGIN"))
    z = ready("T")
    data = complete("BEGIN") + z
    at = len(data) - len(z) + split
    assert s.from_server(data[:at]) == data[:at]
    assert s.transaction_status == "I"
    assert not s.idle
    assert s.from_server(data[at:]) == data[at:]
    assert s.transaction_status == "T"


def test_idle_only_between_queries() -> None:
    pb = fast()
    s = pb.session
    assert s.idle
    pb.to_server(query("SELECT 1"))
    assert not s.idle
    pb.to_client(row_desc("a"), data_row("1"), complete("SELECT 1"))
    assert not s.idle
    pb.to_client(ready("I"))
    assert s.idle


def test_not_idle_in_a_transaction() -> None:
    pb = fast()
    pb.to_server(query("BEGIN"))
    pb.to_client(complete("BEGIN"), ready("T"))
    assert not pb.session.idle


def test_not_idle_mid_message() -> None:
    pb = fast()
    s = pb.session
    q = query("SELECT 1")
    s.from_client(q[:3])
    assert not s.idle
    s.from_client(q[3:])
    s.from_server(ready("I")[:2])
    assert not s.idle
    s.from_server(ready("I")[2:])
    assert s.idle


def test_extended_protocol_outstanding_until_sync_answered() -> None:
    pb = fast()
    s = pb.session
    pb.to_server(parse("SELECT 1"), bind(), execute(), SYNC)
    assert not s.idle
    pb.to_client(m.PARSE_COMPLETE, m.BIND_COMPLETE, data_row("1"), complete("SELECT 1"))
    assert not s.idle
    pb.to_client(ready("I"))
    assert s.idle


def test_not_idle_with_execute_before_its_sync() -> None:
    pb = fast()
    pb.to_server(parse("SELECT pg_sleep(10)"), bind(), execute())
    assert not pb.session.idle


def test_pipelined_queries_each_need_their_ready_for_query() -> None:
    pb = fast()
    s = pb.session
    pb.to_server(query("SELECT 1"), query("SELECT 2"))
    pb.to_client(rows_reply(["a"], [["1"]]), ready("I"))
    assert not s.idle
    pb.to_client(rows_reply(["a"], [["2"]]), ready("I"))
    assert s.idle


@pytest.mark.parametrize(
    ("tag", "changed"),
    [
        ("CREATE TABLE", True),
        ("ALTER TABLE", True),
        ("DROP VIEW", True),
        ("GRANT", True),
        ("COMMENT", True),
        ("SELECT 3", False),
        ("INSERT 0 1", False),
    ],
)
def test_schema_changed_after_ddl(tag: str, changed: bool) -> None:
    pb = fast(bytewise)
    pb.to_server(query("whatever"))
    pb.to_client(complete(tag), ready("I"))
    assert pb.session.schema_changed is changed


def test_terminate(chunking: Chunking) -> None:
    pb = fast(chunking)
    assert pb.to_server(TERMINATE) == TERMINATE
    assert pb.session.terminated


def test_counts_queries() -> None:
    pb = fast()
    s = pb.session
    base = s.counters.queries
    pb.to_server(query("SELECT 1"), parse("SELECT 2"), bind(), execute(), SYNC)
    assert s.counters.queries - base == 2


def test_violation_in_client_stream() -> None:
    pb = fast()
    with pytest.raises(ProtocolViolation):
        pb.client(b"S\x00\x00\x4e\x24")  # Sync of 20000 bytes


def test_violation_in_server_stream() -> None:
    pb = fast()
    pb.to_server(query("SELECT 1"))
    with pytest.raises(ProtocolViolation):
        pb.server(b"Q\x00\x00\x00\x04")


def test_fatal_closes() -> None:
    pb = fast()
    raw = pb.session.fatal("08P01", "topeng: protocol violation")
    assert pb.session.phase is Phase.CLOSED
    fields = m.ErrorFields.decode(raw[5:])
    assert fields.severity == "FATAL" and fields.sqlstate == "08P01"
    assert pb.session.from_client(query("SELECT 1")) == b""


@given(data=st.data())
@settings(deadline=None, max_examples=200)
def test_any_chunking_passes_bytes_and_tracks_state(data: st.DataObject) -> None:
    pb = fast()
    s = pb.session
    sent = join(query("BEGIN"), query("CREATE TABLE t (a int)"), query("SELECT 1"))
    reply = join(
        complete("BEGIN"),
        ready("T"),
        complete("CREATE TABLE"),
        ready("T"),
        rows_reply(["a"], [["1"], [None]]),
        ready("T"),
    )
    out = b""
    for chunk in cut(sent, data.draw(st.lists(st.integers(0, len(sent)), max_size=8))):
        out += s.from_client(chunk)
    assert out == sent
    out = b""
    for chunk in cut(reply, data.draw(st.lists(st.integers(0, len(reply)), max_size=8))):
        out += s.from_server(chunk)
    assert out == reply
    assert s.transaction_status == "T"
    assert s.schema_changed
    assert not s.idle  # in a transaction


def test_quiet_while_the_client_is_half_way_through_a_query() -> None:
    # The server owes nothing for a Query it has not all received: the session is quiet (an
    # idle timeout may close it), though not idle enough for a clean shutdown.
    from wirekit import query, ready_session

    pb = ready_session(None)
    pb.to_server(query("SELECT 1")[:7])
    assert pb.session.quiet
    assert not pb.session.idle
    pb.to_server(query("SELECT 1")[7:])
    assert not pb.session.quiet
