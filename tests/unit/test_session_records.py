"""What a tracked session records of each statement, for the audit log and metrics."""

from __future__ import annotations

from itertools import count

from wirekit import (
    BIND_COMPLETE,
    MARKER_REFUSAL,
    MASK_MARKER,
    PARSE_COMPLETE,
    POISON_ERROR,
    REFUSE_MARKER,
    SYNC,
    MarkerPolicy,
    Playbook,
    bind,
    complete,
    data_row,
    error,
    execute,
    parse,
    query,
    ready,
    ready_session,
    row_desc,
)

from proxy.session import RowLimit

NIK = "3171011708900001"


def _clocked(policy: MarkerPolicy) -> tuple[Playbook, None]:
    pb = ready_session(policy)
    ticks = count(100)
    pb.session.clock = lambda: float(next(ticks))
    return pb, None


def test_simple_query_is_recorded_once_with_its_rows() -> None:
    pb, _ = _clocked(MarkerPolicy())
    pb.to_server(query("SELECT nik FROM customer; SELECT 1"))
    pb.to_client(
        row_desc("nik"), data_row(NIK), data_row(NIK), complete("SELECT 2"),
        row_desc("one"), data_row("1"), complete("SELECT 1"), ready("I"),
    )  # fmt: skip
    (record,) = pb.session.records
    assert record.sql == "SELECT nik FROM customer; SELECT 1"
    assert record.decision == "allowed"
    assert record.rows == 3
    assert record.error is None
    assert record.finished > record.started


def test_nothing_is_recorded_before_the_statement_ends() -> None:
    pb, _ = _clocked(MarkerPolicy())
    pb.to_server(query("SELECT 1"))
    pb.to_client(row_desc("one"), data_row("1"))
    assert pb.session.records == []


def test_refused_query_is_recorded_with_its_reason() -> None:
    pb, _ = _clocked(MarkerPolicy())
    pb.to_server(query(f"SELECT {REFUSE_MARKER}"))
    pb.to_client(POISON_ERROR, ready("I"))
    (record,) = pb.session.records
    assert record.decision == "refused"
    assert record.reason == MARKER_REFUSAL.reason
    assert record.message == MARKER_REFUSAL.message
    assert record.error == MARKER_REFUSAL.sqlstate
    assert record.rows == 0


def test_masked_execute_is_recorded_with_its_labels() -> None:
    pb, _ = _clocked(MarkerPolicy())
    sql = f"SELECT nik FROM customer /* {MASK_MARKER} */"
    pb.to_server(parse(sql), bind(), execute(), SYNC)
    pb.to_client(
        PARSE_COMPLETE, BIND_COMPLETE, row_desc("nik"), data_row(NIK), complete("SELECT 1"),
        ready("I"),
    )  # fmt: skip
    (record,) = pb.session.records
    assert record.sql == sql
    assert record.decision == "masked"
    assert record.labels == ("nik",)
    assert record.rows == 1


def test_server_error_is_recorded_with_its_sqlstate() -> None:
    pb, _ = _clocked(MarkerPolicy())
    pb.to_server(query("SELECT 1/0"))
    pb.to_client(error("22012", "division by zero"), ready("I"))
    (record,) = pb.session.records
    assert record.decision == "allowed"
    assert record.error == "22012"


def test_row_limit_turns_the_record_into_a_refusal() -> None:
    pb, _ = _clocked(MarkerPolicy(limit=RowLimit(1)))
    pb.to_server(query("SELECT nik FROM customer"))
    pb.to_client(
        row_desc("nik"), data_row(NIK), data_row(NIK), complete("SELECT 2"), ready("I"),
    )  # fmt: skip
    (record,) = pb.session.records
    assert record.decision == "refused"
    assert record.reason == "row_limit"
    assert record.error == "54000"
    assert record.rows == 1


def test_expired_statement_ends_in_the_timeout_refusal() -> None:
    from proxy.policy.decision import Refuse
    from proxy.wire import messages as m

    pb, _ = _clocked(MarkerPolicy())
    pb.to_server(query("SELECT pg_sleep(60)"))
    assert pb.session.running_since() is not None
    timeout = Refuse("57014", "topeng: statement_timeout (1s) exceeded", reason="timeout")
    assert pb.session.expire_running(timeout)
    assert pb.session.cancel_requested
    assert not pb.session.expire_running(timeout)  # once is enough
    out = pb.to_client(error("57014", "canceling statement due to user request"), ready("I"))
    assert out == m.error_response("57014", timeout.message) + ready("I")
    (record,) = pb.session.records
    assert record.decision == "refused" and record.reason == "timeout"
    assert pb.session.running_since() is None


def test_nothing_to_expire_when_idle() -> None:
    from proxy.policy.decision import Refuse

    pb, _ = _clocked(MarkerPolicy())
    assert not pb.session.expire_running(Refuse("57014", "x"))
    assert not pb.session.cancel_requested


def test_execute_refused_by_the_policy_never_runs() -> None:
    from wirekit import EXECUTE_REFUSE_MARKER, refusal_bytes

    from proxy.session import POISON_NAME
    from proxy.wire import messages as m

    pb, _ = _clocked(MarkerPolicy())
    sql = f"SELECT 1 /* {EXECUTE_REFUSE_MARKER} */"
    sent = pb.to_server(parse(sql), bind(), execute(), SYNC)
    assert m.Execute(POISON_NAME).encode() in sent
    assert execute() not in sent
    out = pb.to_client(
        PARSE_COMPLETE, BIND_COMPLETE, error("34000", "portal does not exist"), ready("I")
    )
    assert out == PARSE_COMPLETE + BIND_COMPLETE + refusal_bytes() + ready("I")
    (record,) = pb.session.records
    assert record.decision == "refused"
