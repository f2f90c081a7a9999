"""Session in tracked mode: every reply tied to its statement, refusals, masking, fail-closed.

Every test runs twice, with each side's bytes fed whole and one byte at a time, and must give
the same output bytes.
"""

from __future__ import annotations

import pytest
from wirekit import (
    BIND_COMPLETE,
    CLOSE_COMPLETE,
    COPY_DONE,
    EMPTY_QUERY,
    FLUSH,
    MARKER_REFUSAL,
    MASK_MARKER,
    MASKED,
    NO_DATA,
    PARSE_COMPLETE,
    POISON_ERROR,
    PORTAL_SUSPENDED,
    REFUSE_MARKER,
    SYNC,
    TERMINATE,
    Chunking,
    MarkerPolicy,
    Playbook,
    bind,
    bytewise,
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
    extended,
    function_result,
    join,
    notice,
    notification,
    param_desc,
    param_status,
    parse,
    query,
    ready,
    ready_session,
    refusal_bytes,
    row_desc,
    rows_reply,
    split_messages,
    types_of,
    whole,
)

from proxy.policy.decision import ALLOW, ColumnMask, Decision, Mask, Refuse
from proxy.policy.engine import AllowAll
from proxy.session import POISON_NAME, POISON_SQL, RowLimit
from proxy.wire import messages as m
from proxy.wire.framing import ProtocolViolation

NIK = "3171011708900001"
SECRET = NIK.encode()
MASK_SQL = f"SELECT nik, name FROM customer /* {MASK_MARKER} */"
PLAIN_SQL = "SELECT nik, name FROM customer"


@pytest.fixture(params=[whole, bytewise], ids=["whole", "bytewise"])
def chunking(request: pytest.FixtureRequest) -> Chunking:
    return request.param  # type: ignore[no-any-return]


def tracked(chunking: Chunking, policy: object | None = None) -> Playbook:
    pb = ready_session(policy if policy is not None else MarkerPolicy(), chunking)
    assert pb.session.mode == "tracked"
    return pb


def masked_row(*rest: str | None) -> bytes:
    return data_row(MASKED, *rest)


def assert_quiet(pb: Playbook) -> None:
    """Everything the session expected has arrived."""
    assert pb.session.idle, "replies still expected"


# --------------------------------------------------------------------------- simple protocol


def test_simple_query_two_statements(chunking: Chunking) -> None:
    pb = tracked(chunking, AllowAll())
    sent = query("SELECT 1 AS a; SELECT 'x' AS b, NULL AS c")
    assert pb.to_server(sent) == sent
    assert not pb.session.idle
    reply = join(
        rows_reply(["a"], [["1"], ["2"]]),
        rows_reply(["b", "c"], [["x", None], ["", None]]),
        ready("I"),
    )
    assert pb.to_client(reply) == reply
    assert pb.session.counters.rows == 4
    assert_quiet(pb)


def test_simple_query_masks_only_the_masked_statement(chunking: Chunking) -> None:
    policy = MarkerPolicy()
    pb = tracked(chunking, policy)
    sql = f"{MASK_SQL}; SELECT nik FROM customer"
    assert pb.to_server(query(sql)) == query(sql)
    out = pb.to_client(
        row_desc("nik", "name"),
        data_row(NIK, "Budi"),
        data_row(None, "Ani"),
        complete("SELECT 2"),
        rows_reply(["nik"], [[NIK]]),
        ready("I"),
    )
    assert split_messages(out) == [
        row_desc("nik", "name"),
        masked_row("Budi"),
        data_row(None, "Ani"),  # NULL stays NULL
        complete("SELECT 2"),
        row_desc("nik"),
        data_row(NIK),
        complete("SELECT 1"),
        ready("I"),
    ]
    assert [type(d) for d, _, _ in policy.plans] == [Mask, type(ALLOW)]
    assert policy.plans[0][2] == (0, 0)  # per-column formats from the RowDescription
    assert pb.session.counters.masked == 1
    assert_quiet(pb)


def test_binary_formats_reach_plan_rows_in_simple_protocol(chunking: Chunking) -> None:
    policy = MarkerPolicy()
    pb = tracked(chunking, policy)
    pb.to_server(query(MASK_SQL))
    pb.to_client(row_desc("nik", "name", formats=[1, 0]), complete("SELECT 0"), ready("I"))
    assert policy.plans[0][2] == (1, 0)


def test_empty_query(chunking: Chunking) -> None:
    pb = tracked(chunking)
    pb.to_server(query(""))
    assert pb.to_client(EMPTY_QUERY, ready("I")) == EMPTY_QUERY + ready("I")
    assert_quiet(pb)


def test_statement_without_rows(chunking: Chunking) -> None:
    pb = tracked(chunking)
    pb.to_server(query("INSERT INTO t VALUES (1)"))
    reply = join(complete("INSERT 0 1"), ready("I"))
    assert pb.to_client(reply) == reply
    assert not pb.session.schema_changed


def test_schema_changed_after_ddl(chunking: Chunking) -> None:
    pb = tracked(chunking)
    pb.to_server(query("CREATE TABLE t (a int)"))
    pb.to_client(complete("CREATE TABLE"), ready("I"))
    assert pb.session.schema_changed


def test_error_in_simple_query_is_forwarded(chunking: Chunking) -> None:
    pb = tracked(chunking)
    pb.to_server(query("SELECT 1; SELECT 1/0"))
    reply = join(rows_reply(["a"], [["1"]]), error("22012", "division by zero"), ready("I"))
    assert pb.to_client(reply) == reply
    assert_quiet(pb)


def test_transaction_status_follows_ready_for_query(chunking: Chunking) -> None:
    pb = tracked(chunking)
    pb.to_server(query("BEGIN"))
    pb.to_client(complete("BEGIN"), ready("T"))
    assert pb.session.transaction_status == "T"
    assert not pb.session.idle
    pb.to_server(query("SELECT 1/0"))
    pb.to_client(error("22012", "division by zero"), ready("E"))
    assert pb.session.transaction_status == "E"
    pb.to_server(query("ROLLBACK"))
    pb.to_client(complete("ROLLBACK"), ready("I"))
    assert pb.session.transaction_status == "I"
    assert_quiet(pb)


def test_pipelined_simple_queries(chunking: Chunking) -> None:
    pb = tracked(chunking)
    pb.to_server(query("SELECT 1"), query(MASK_SQL), query("SELECT 2"))
    out = pb.to_client(
        rows_reply(["a"], [[NIK]]),
        ready("I"),
        rows_reply(["nik", "name"], [[NIK, "Budi"]]),
        ready("I"),
        rows_reply(["a"], [[NIK]]),
        ready("I"),
    )
    assert split_messages(out)[5] == masked_row("Budi")
    assert out.count(SECRET) == 2
    assert_quiet(pb)


def test_async_messages_mid_result_are_forwarded(chunking: Chunking) -> None:
    pb = tracked(chunking)
    pb.to_server(query(MASK_SQL))
    out = pb.to_client(
        row_desc("nik", "name"),
        data_row(NIK, "a"),
        notice("something"),
        param_status("TimeZone", "Asia/Jakarta"),
        notification("chan", "hello"),
        data_row(NIK, "b"),
        complete("SELECT 2"),
        ready("I"),
    )
    assert split_messages(out) == [
        row_desc("nik", "name"),
        masked_row("a"),
        notice("something"),
        param_status("TimeZone", "Asia/Jakarta"),
        notification("chan", "hello"),
        masked_row("b"),
        complete("SELECT 2"),
        ready("I"),
    ]
    assert pb.session.parameters["TimeZone"] == "Asia/Jakarta"


def test_async_messages_while_idle_are_forwarded(chunking: Chunking) -> None:
    pb = tracked(chunking)
    out = pb.to_client(notification("chan", "x"), param_status("is_superuser", "off"))
    assert out == notification("chan", "x") + param_status("is_superuser", "off")
    fatal = m.error_response("57P01", "terminating connection", severity="FATAL")
    assert pb.to_client(fatal) == fatal


# --------------------------------------------------------------------------- refusals


def test_refused_query_is_replaced_by_poison(chunking: Chunking) -> None:
    policy = MarkerPolicy()
    pb = tracked(chunking, policy)
    sql = f"SELECT nama_ibu_kandung FROM customer -- {REFUSE_MARKER}"
    assert pb.to_server(query(sql)) == query(POISON_SQL)
    assert policy.judged == [sql]
    out = pb.to_client(POISON_ERROR, ready("I"))
    assert out == refusal_bytes() + ready("I")
    fields = m.ErrorFields.decode(split_messages(out)[0][5:])
    assert fields.sqlstate == MARKER_REFUSAL.sqlstate == "42501"
    assert fields.message == MARKER_REFUSAL.message
    assert fields.get("D") == MARKER_REFUSAL.detail
    assert fields.get("H") == MARKER_REFUSAL.hint
    assert fields.severity == "ERROR"
    assert pb.session.counters.refused == 1
    assert_quiet(pb)


def test_refused_query_in_transaction_keeps_server_status(chunking: Chunking) -> None:
    pb = tracked(chunking)
    pb.to_server(query("BEGIN"))
    pb.to_client(complete("BEGIN"), ready("T"))
    pb.to_server(query(REFUSE_MARKER))
    out = pb.to_client(POISON_ERROR, ready("E"))
    assert out == refusal_bytes() + ready("E")
    assert pb.session.transaction_status == "E"


def test_refused_query_between_allowed_ones(chunking: Chunking) -> None:
    pb = tracked(chunking)
    sent = pb.to_server(query("SELECT 1"), query(REFUSE_MARKER), query("SELECT 2"))
    assert sent == join(query("SELECT 1"), query(POISON_SQL), query("SELECT 2"))
    out = pb.to_client(
        rows_reply(["a"], [["1"]]),
        ready("I"),
        POISON_ERROR,
        ready("I"),
        rows_reply(["a"], [["2"]]),
        ready("I"),
    )
    assert out == join(
        rows_reply(["a"], [["1"]]),
        ready("I"),
        refusal_bytes(),
        ready("I"),
        rows_reply(["a"], [["2"]]),
        ready("I"),
    )


def test_rows_for_a_refused_query_are_a_violation(chunking: Chunking) -> None:
    pb = tracked(chunking)
    pb.to_server(query(REFUSE_MARKER))
    with pytest.raises(ProtocolViolation):
        pb.server(row_desc("nik"), data_row(NIK))


def test_refused_parse_in_pipeline_skips_to_sync(chunking: Chunking) -> None:
    pb = tracked(chunking)
    refused = f"SELECT 1 -- {REFUSE_MARKER}"
    sent = pb.to_server(
        parse(refused, "s1"), bind("", "s1"), describe_portal(), execute(), SYNC,
        extended(MASK_SQL),
    )  # fmt: skip
    assert sent == join(
        m.Parse("s1", POISON_SQL).encode(), bind("", "s1"), describe_portal(), execute(), SYNC,
        extended(MASK_SQL),
    )  # fmt: skip
    out = pb.to_client(
        POISON_ERROR,
        ready("I"),
        PARSE_COMPLETE,
        BIND_COMPLETE,
        row_desc("nik", "name"),
        data_row(NIK, "Budi"),
        complete("SELECT 1"),
        ready("I"),
    )
    assert split_messages(out) == [
        refusal_bytes(),
        ready("I"),
        PARSE_COMPLETE,
        BIND_COMPLETE,
        row_desc("nik", "name"),
        masked_row("Budi"),
        complete("SELECT 1"),
        ready("I"),
    ]
    assert pb.session.counters.refused == 1
    assert_quiet(pb)


def test_refused_parse_rest_of_pipeline_sent_later(chunking: Chunking) -> None:
    pb = tracked(chunking)
    assert pb.to_server(parse(REFUSE_MARKER, "s1")) == m.Parse("s1", POISON_SQL).encode()
    assert pb.to_client(POISON_ERROR) == refusal_bytes()
    # The client goes on without having read the error; the server skips all of it.
    pb.to_server(bind("", "s1"), execute(), SYNC)
    assert pb.to_client(ready("I")) == ready("I")
    assert_quiet(pb)
    # And the session is in step afterwards.
    pb.to_server(extended(MASK_SQL))
    out = pb.to_client(
        PARSE_COMPLETE, BIND_COMPLETE, row_desc("nik", "name"), data_row(NIK, "B"),
        complete("SELECT 1"), ready("I"),
    )  # fmt: skip
    assert masked_row("B") in split_messages(out)


def test_refused_parse_does_not_create_the_statement(chunking: Chunking) -> None:
    pb = tracked(chunking)
    pb.to_server(parse(REFUSE_MARKER, "s1"), SYNC)
    pb.to_client(POISON_ERROR, ready("I"))
    # Bind to it: Topeng knows no such statement, the server's own error reaches the client.
    pb.to_server(bind("", "s1"), execute(), SYNC)
    err = error("26000", 'prepared statement "s1" does not exist')
    assert pb.to_client(err, ready("I")) == err + ready("I")


def test_refused_function_call(chunking: Chunking) -> None:
    pb = tracked(chunking)
    call = m.FunctionCall(666, (0,), (b"x",), 0).encode()
    assert pb.to_server(call) == m.FunctionCall(0).encode()
    err = error("42883", "function with OID 0 does not exist")
    assert pb.to_client(err, ready("I")) == refusal_bytes() + ready("I")
    assert pb.session.counters.refused == 1
    assert_quiet(pb)


def test_allowed_function_call(chunking: Chunking) -> None:
    pb = tracked(chunking)
    call = m.FunctionCall(1598, (), (), 0).encode()
    assert pb.to_server(call) == call
    reply = join(function_result(b"0.5"), ready("I"))
    assert pb.to_client(reply) == reply
    assert_quiet(pb)


def test_function_call_error_is_forwarded(chunking: Chunking) -> None:
    pb = tracked(chunking)
    pb.to_server(m.FunctionCall(1598).encode())
    reply = join(error("42883", "no such function"), ready("I"))
    assert pb.to_client(reply) == reply


# --------------------------------------------------------------------------- extended protocol


def pipeline_reply(*rows: bytes, tag: str = "SELECT 1") -> bytes:
    return join(
        PARSE_COMPLETE, BIND_COMPLETE, row_desc("nik", "name"), *rows, complete(tag), ready("I")
    )


def test_extended_pipelined_twice_in_one_chunk(chunking: Chunking) -> None:
    pb = tracked(chunking)
    sent = join(extended(PLAIN_SQL), extended(MASK_SQL))
    assert pb.to_server(sent) == sent
    out = pb.to_client(
        pipeline_reply(data_row(NIK, "A"), tag="SELECT 1"),
        pipeline_reply(data_row(NIK, "B"), data_row(NIK, None), tag="SELECT 2"),
    )
    assert out == join(
        pipeline_reply(data_row(NIK, "A"), tag="SELECT 1"),
        pipeline_reply(masked_row("B"), masked_row(None), tag="SELECT 2"),
    )
    assert pb.session.counters.rows == 3
    assert_quiet(pb)


def test_extended_without_describe_uses_statement_description(chunking: Chunking) -> None:
    policy = MarkerPolicy()
    pb = tracked(chunking, policy)
    pb.to_server(parse(MASK_SQL, "s1"), describe_statement("s1"), SYNC)
    prep = join(
        PARSE_COMPLETE, param_desc(), row_desc("nik", "name"), ready("I"),
    )  # fmt: skip
    assert pb.to_client(prep) == prep
    pb.to_server(bind("", "s1", result_formats=(1,)), execute(), SYNC)
    out = pb.to_client(BIND_COMPLETE, data_row(NIK, "x"), complete("SELECT 1"), ready("I"))
    assert out == join(BIND_COMPLETE, masked_row("x"), complete("SELECT 1"), ready("I"))
    assert policy.plans[-1][1] == m.RowDescription.decode(row_desc("nik", "name")[5:])


def test_describe_statement_no_data(chunking: Chunking) -> None:
    pb = tracked(chunking)
    pb.to_server(parse("INSERT INTO t VALUES ($1)", "ins", (23,)), describe_statement("ins"), SYNC)
    reply = join(PARSE_COMPLETE, param_desc(23), NO_DATA, ready("I"))
    assert pb.to_client(reply) == reply
    assert_quiet(pb)


def test_masked_execute_without_describe_gets_a_hidden_describe(chunking: Chunking) -> None:
    # Rows to mask need their description: Topeng asks for it and keeps the answer to itself.
    pb = tracked(chunking)
    sent = pb.to_server(parse(MASK_SQL), bind(), execute(), SYNC)
    assert sent == join(parse(MASK_SQL), bind(), describe_portal(), execute(), SYNC)
    out = pb.to_client(
        PARSE_COMPLETE, BIND_COMPLETE, row_desc("nik", "name"), data_row(NIK, "x"),
        complete("SELECT 1"), ready("I"),
    )  # fmt: skip
    assert out == join(
        PARSE_COMPLETE, BIND_COMPLETE, masked_row("x"), complete("SELECT 1"), ready("I")
    )
    assert_quiet(pb)


def test_describe_is_not_added_when_the_policy_does_not_need_it(chunking: Chunking) -> None:
    pb = tracked(chunking)
    sent = join(parse(PLAIN_SQL), bind(), execute(), SYNC)
    assert pb.to_server(sent) == sent


def test_describe_is_added_for_every_execute_when_the_policy_needs_it(chunking: Chunking) -> None:
    pb = tracked(chunking, MarkerPolicy(needs_descriptions=True))
    sent = pb.to_server(parse(PLAIN_SQL), bind(), execute(), SYNC)
    assert sent == join(parse(PLAIN_SQL), bind(), describe_portal(), execute(), SYNC)


def test_error_mid_pipeline_drops_skipped_entries(chunking: Chunking) -> None:
    pb = tracked(chunking)
    first = join(
        parse("SELECT 1/0", "div"),
        bind("p1", "div"),
        execute("p1"),
        describe_statement("div"),
        parse(MASK_SQL, "never"),
        bind("", "never"),
        execute(),
        SYNC,
    )
    second = extended(MASK_SQL, name="s2")
    # The masked statement is executed without a Describe: Topeng adds one.
    with_describe = first.replace(execute() + SYNC, describe_portal() + execute() + SYNC)
    assert pb.to_server(first, second) == with_describe + second
    err = error("22012", "division by zero")
    reply = join(
        PARSE_COMPLETE,
        BIND_COMPLETE,
        err,
        ready("I"),
        pipeline_reply(data_row(NIK, "after")),
    )
    out = pb.to_client(reply)
    assert out == join(
        PARSE_COMPLETE,
        BIND_COMPLETE,
        err,
        ready("I"),
        pipeline_reply(masked_row("after")),
    )
    assert_quiet(pb)


def test_error_in_parse_forgets_the_new_statement(chunking: Chunking) -> None:
    pb = tracked(chunking)
    pb.to_server(parse("SELEC nik", "s1"), SYNC)
    err = error("42601", 'syntax error at or near "SELEC"')
    assert pb.to_client(err, ready("I")) == err + ready("I")
    # s1 does not exist, so a later Parse of the same name creates it with its own decision.
    pb.to_server(parse(MASK_SQL, "s1"), bind("", "s1"), describe_portal(), execute(), SYNC)
    out = pb.to_client(pipeline_reply(data_row(NIK, "x")))
    assert out == pipeline_reply(masked_row("x"))


def test_parse_of_existing_name_keeps_the_old_statement(chunking: Chunking) -> None:
    pb = tracked(chunking)
    pb.to_server(parse(MASK_SQL, "s1"), SYNC)
    pb.to_client(PARSE_COMPLETE, ready("I"))
    # The server refuses to redefine s1 and keeps the old one: so must Topeng.
    pb.to_server(parse(PLAIN_SQL, "s1"), SYNC)
    err = error("42P05", 'prepared statement "s1" already exists')
    assert pb.to_client(err, ready("I")) == err + ready("I")
    pb.to_server(bind("", "s1"), describe_portal(), execute(), SYNC)
    out = pb.to_client(
        BIND_COMPLETE, row_desc("nik", "name"), data_row(NIK, "x"), complete("SELECT 1"),
        ready("I"),
    )  # fmt: skip
    assert masked_row("x") in split_messages(out)
    assert SECRET not in out


def test_unnamed_statement_is_replaced(chunking: Chunking) -> None:
    pb = tracked(chunking)
    pb.to_server(extended(MASK_SQL), extended(PLAIN_SQL))
    out = pb.to_client(pipeline_reply(data_row(NIK, "1")), pipeline_reply(data_row(NIK, "2")))
    assert out == pipeline_reply(masked_row("1")) + pipeline_reply(data_row(NIK, "2"))


def test_close_statement_then_parse_again(chunking: Chunking) -> None:
    pb = tracked(chunking)
    pb.to_server(parse(PLAIN_SQL, "s1"), SYNC)
    pb.to_client(PARSE_COMPLETE, ready("I"))
    assert pb.to_server(close_statement("s1"), SYNC) == close_statement("s1") + SYNC
    assert pb.to_client(CLOSE_COMPLETE, ready("I")) == CLOSE_COMPLETE + ready("I")
    pb.to_server(parse(MASK_SQL, "s1"), bind("", "s1"), describe_portal(), execute(), SYNC)
    out = pb.to_client(pipeline_reply(data_row(NIK, "x")))
    assert out == pipeline_reply(masked_row("x"))


def test_close_of_unknown_names(chunking: Chunking) -> None:
    pb = tracked(chunking)
    pb.to_server(close_statement("nope"), close_portal("nope"), SYNC)
    reply = join(CLOSE_COMPLETE, CLOSE_COMPLETE, ready("I"))
    assert pb.to_client(reply) == reply
    assert_quiet(pb)


def begin_transaction(pb: Playbook) -> None:
    pb.to_server(query("BEGIN"))
    pb.to_client(complete("BEGIN"), ready("T"))


def test_portal_lives_across_syncs_in_a_transaction(chunking: Chunking) -> None:
    pb = tracked(chunking)
    begin_transaction(pb)
    pb.to_server(parse(MASK_SQL, "s1"), bind("c1", "s1"), describe_portal("c1"), SYNC)
    pb.to_client(PARSE_COMPLETE, BIND_COMPLETE, row_desc("nik", "name"), ready("T"))
    pb.to_server(execute("c1", 1), SYNC)
    out = pb.to_client(data_row(NIK, "1"), PORTAL_SUSPENDED, ready("T"))
    assert out == join(masked_row("1"), PORTAL_SUSPENDED, ready("T"))
    pb.to_server(execute("c1", 1), SYNC)
    out = pb.to_client(data_row(NIK, "2"), complete("SELECT 1"), ready("T"))
    assert out == join(masked_row("2"), complete("SELECT 1"), ready("T"))


def test_portals_cleared_after_idle_ready_for_query(chunking: Chunking) -> None:
    pb = tracked(chunking)
    begin_transaction(pb)
    pb.to_server(parse(PLAIN_SQL, "s1"), bind("c1", "s1"), SYNC)
    pb.to_client(PARSE_COMPLETE, BIND_COMPLETE, ready("T"))
    assert set(pb.session._portals) == {"c1"}
    pb.to_server(query("COMMIT"))
    pb.to_client(complete("COMMIT"), ready("I"))
    assert pb.session._portals == {}
    assert set(pb.session._statements) == {"s1"}  # statements outlive the transaction


def test_close_portal(chunking: Chunking) -> None:
    pb = tracked(chunking)
    begin_transaction(pb)
    pb.to_server(parse(PLAIN_SQL, "s1"), bind("c1", "s1"), SYNC)
    pb.to_client(PARSE_COMPLETE, BIND_COMPLETE, ready("T"))
    pb.to_server(close_portal("c1"), SYNC)
    assert pb.to_client(CLOSE_COMPLETE, ready("T")) == CLOSE_COMPLETE + ready("T")
    assert "c1" not in pb.session._portals


def test_execute_max_rows_suspended_then_again(chunking: Chunking) -> None:
    pb = tracked(chunking)
    pb.to_server(parse(MASK_SQL), bind(), describe_portal(), execute("", 2), execute("", 2), SYNC)
    out = pb.to_client(
        PARSE_COMPLETE,
        BIND_COMPLETE,
        row_desc("nik", "name"),
        data_row(NIK, "1"),
        data_row(NIK, "2"),
        PORTAL_SUSPENDED,
        data_row(NIK, "3"),
        complete("SELECT 3"),
        ready("I"),
    )
    assert out == join(
        PARSE_COMPLETE,
        BIND_COMPLETE,
        row_desc("nik", "name"),
        masked_row("1"),
        masked_row("2"),
        PORTAL_SUSPENDED,
        masked_row("3"),
        complete("SELECT 3"),
        ready("I"),
    )
    assert_quiet(pb)


def test_flush_is_forwarded_and_replies_tie_up(chunking: Chunking) -> None:
    pb = tracked(chunking)
    sent = join(parse(MASK_SQL), bind(), describe_portal(), execute(), FLUSH)
    assert pb.to_server(sent) == sent
    out = pb.to_client(
        PARSE_COMPLETE, BIND_COMPLETE, row_desc("nik", "name"), data_row(NIK, "x"),
        complete("SELECT 1"),
    )  # fmt: skip
    assert masked_row("x") in split_messages(out)
    pb.to_server(SYNC)
    assert pb.to_client(ready("I")) == ready("I")
    assert_quiet(pb)


def test_schema_changed_after_extended_ddl(chunking: Chunking) -> None:
    pb = tracked(chunking)
    pb.to_server(parse("ALTER TABLE t ADD b int"), bind(), execute(), SYNC)
    pb.to_client(PARSE_COMPLETE, BIND_COMPLETE, complete("ALTER TABLE"), ready("I"))
    assert pb.session.schema_changed


def test_empty_query_in_extended(chunking: Chunking) -> None:
    pb = tracked(chunking)
    pb.to_server(parse(""), bind(), execute(), SYNC)
    reply = join(PARSE_COMPLETE, BIND_COMPLETE, EMPTY_QUERY, ready("I"))
    assert pb.to_client(reply) == reply
    assert_quiet(pb)


def test_sync_error_from_deferred_constraint(chunking: Chunking) -> None:
    pb = tracked(chunking)
    pb.to_server(parse("INSERT INTO t VALUES (1)"), bind(), execute(), SYNC)
    err = error("23503", "violates foreign key constraint")
    reply = join(PARSE_COMPLETE, BIND_COMPLETE, complete("INSERT 0 1"), err, ready("I"))
    assert pb.to_client(reply) == reply
    assert_quiet(pb)


def test_unnamed_bind_error_then_next_pipeline(chunking: Chunking) -> None:
    pb = tracked(chunking)
    pb.to_server(
        parse("SELECT $1::int", "s", (23,)), bind("", "s", (b"x",)), execute(), SYNC,
        extended(MASK_SQL),
    )  # fmt: skip
    err = error("22P02", 'invalid input syntax for type integer: "x"')
    out = pb.to_client(PARSE_COMPLETE, err, ready("I"), pipeline_reply(data_row(NIK, "y")))
    assert out == join(PARSE_COMPLETE, err, ready("I"), pipeline_reply(masked_row("y")))


# --------------------------------------------------------------------------- COPY


def test_copy_in_simple(chunking: Chunking) -> None:
    pb = tracked(chunking)
    pb.to_server(query("COPY t FROM STDIN"))
    assert pb.to_client(copy_in_response(2)) == copy_in_response(2)
    rows = join(copy_data(b"1\ta\n"), copy_data(b"2\tb\n"), COPY_DONE)
    assert pb.to_server(rows) == rows
    reply = join(complete("COPY 2"), ready("I"))
    assert pb.to_client(reply) == reply
    assert_quiet(pb)


def test_copy_in_fail(chunking: Chunking) -> None:
    pb = tracked(chunking)
    pb.to_server(query("COPY t FROM STDIN"))
    pb.to_client(copy_in_response())
    fail = m.CopyFail("client gave up").encode()
    assert pb.to_server(copy_data(b"1\n"), fail) == copy_data(b"1\n") + fail
    reply = join(error("57014", "COPY from stdin failed: client gave up"), ready("I"))
    assert pb.to_client(reply) == reply
    assert_quiet(pb)


def test_not_idle_during_copy_in(chunking: Chunking) -> None:
    pb = tracked(chunking)
    pb.to_server(query("COPY t FROM STDIN"))
    pb.to_client(copy_in_response())
    assert not pb.session.idle


def test_copy_in_extended(chunking: Chunking) -> None:
    pb = tracked(chunking)
    pb.to_server(parse("COPY t FROM STDIN"), bind(), execute())
    pb.to_client(PARSE_COMPLETE, BIND_COMPLETE, copy_in_response())
    rows = join(copy_data(b"1\n"), COPY_DONE, SYNC)
    assert pb.to_server(rows) == rows
    reply = join(complete("COPY 1"), ready("I"))
    assert pb.to_client(reply) == reply
    assert_quiet(pb)


def test_copy_out_simple(chunking: Chunking) -> None:
    pb = tracked(chunking)
    pb.to_server(query("COPY t TO STDOUT"))
    reply = join(
        copy_out_response(2),
        copy_data(b"1\ta\n"),
        copy_data(b"2\tb\n"),
        COPY_DONE,
        complete("COPY 2"),
        ready("I"),
    )
    assert pb.to_client(reply) == reply
    assert_quiet(pb)


def test_copy_out_extended(chunking: Chunking) -> None:
    pb = tracked(chunking)
    pb.to_server(parse("COPY t TO STDOUT"), bind(), execute(), SYNC)
    reply = join(
        PARSE_COMPLETE,
        BIND_COMPLETE,
        copy_out_response(),
        copy_data(b"1\n"),
        COPY_DONE,
        complete("COPY 1"),
        ready("I"),
    )
    assert pb.to_client(reply) == reply
    assert_quiet(pb)


def test_copy_both_is_refused(chunking: Chunking) -> None:
    pb = tracked(chunking)
    pb.to_server(query("START_REPLICATION"))
    with pytest.raises(ProtocolViolation, match="COPY BOTH"):
        pb.server(copy_both_response())


def test_stray_copy_messages_outside_copy_are_forwarded(chunking: Chunking) -> None:
    pb = tracked(chunking)
    stray = join(copy_data(b"late"), COPY_DONE)
    assert pb.to_server(stray) == stray
    assert_quiet(pb)


# --------------------------------------------------------------------------- fail closed


def test_data_row_with_nothing_pending_is_a_violation(chunking: Chunking) -> None:
    pb = tracked(chunking)
    with pytest.raises(ProtocolViolation, match="cannot tie"):
        pb.server(data_row(NIK))


def test_data_row_before_row_description_is_a_violation(chunking: Chunking) -> None:
    pb = tracked(chunking)
    pb.to_server(query("SELECT nik FROM customer"))
    with pytest.raises(ProtocolViolation, match="cannot tie"):
        pb.server(data_row(NIK))


def test_data_row_after_command_complete_is_a_violation(chunking: Chunking) -> None:
    pb = tracked(chunking)
    pb.to_server(query(MASK_SQL))
    with pytest.raises(ProtocolViolation, match="cannot tie"):
        pb.server(row_desc("nik", "name"), data_row(NIK, "a"), complete("SELECT 1"), data_row(NIK))


def test_data_row_while_waiting_for_parse_is_a_violation(chunking: Chunking) -> None:
    pb = tracked(chunking)
    pb.to_server(parse(PLAIN_SQL), bind(), execute(), SYNC)
    with pytest.raises(ProtocolViolation, match="cannot tie"):
        pb.server(data_row(NIK))


def test_more_result_sets_than_statements_is_a_violation(chunking: Chunking) -> None:
    pb = tracked(chunking)
    pb.to_server(query(MASK_SQL))  # one statement, one decision
    with pytest.raises(ProtocolViolation, match="more result sets"):
        pb.server(rows_reply(["nik", "name"], [[NIK, "a"]]), row_desc("nik"))


@pytest.mark.parametrize(
    ("client", "server"),
    [
        (query("SELECT 1"), PARSE_COMPLETE),
        (query("SELECT 1"), function_result(b"x")),
        (parse("SELECT 1") + SYNC, BIND_COMPLETE),
        (parse("SELECT 1") + SYNC, row_desc("a")),
        (parse("SELECT 1") + bind() + SYNC, PARSE_COMPLETE + NO_DATA),
        (parse("SELECT 1") + bind() + execute() + SYNC, PARSE_COMPLETE + BIND_COMPLETE + NO_DATA),
        (SYNC, complete("SELECT 1")),
        (SYNC, BIND_COMPLETE),
        (b"", complete("SELECT 1")),
        (b"", ready("I")),
        (b"", PARSE_COMPLETE),
        (m.FunctionCall(1598).encode(), row_desc("a")),
        (query("SELECT 1"), m.BackendKeyData(1, b"abcd").encode()),
    ],
)
def test_unexpected_reply_is_a_violation(chunking: Chunking, client: bytes, server: bytes) -> None:
    pb = tracked(chunking)
    pb.to_server(client)
    with pytest.raises(ProtocolViolation):
        pb.server(server)


def test_ready_for_query_with_only_extended_pending_is_a_violation(chunking: Chunking) -> None:
    pb = tracked(chunking)
    pb.to_server(parse("SELECT 1"), bind())
    with pytest.raises(ProtocolViolation, match="ReadyForQuery when none was expected"):
        pb.server(ready("I"))


@pytest.mark.parametrize("msg", [m.frame(b"p", b"pw\0"), b"Q\x00\x00\x00\x07abc"])
def test_bad_client_message_is_a_violation(chunking: Chunking, msg: bytes) -> None:
    pb = tracked(chunking)
    with pytest.raises(ProtocolViolation):
        pb.client(msg)


def test_terminate(chunking: Chunking) -> None:
    pb = tracked(chunking)
    assert pb.to_server(TERMINATE) == TERMINATE
    assert pb.session.terminated


def test_poison_name_cannot_collide() -> None:
    assert "\x01" in POISON_NAME


# --------------------------------------------------------------------------- known bugs


class TupleWithRefusal(MarkerPolicy):
    """Judges a two-statement query as (Allow, Refuse)."""

    def judge_query(self, sql: str) -> Refuse | m.Query | tuple[Decision, ...]:  # type: ignore[override]
        return (ALLOW, MARKER_REFUSAL)


def test_refuse_among_per_statement_decisions_refuses_the_query(chunking: Chunking) -> None:
    pb = tracked(chunking, TupleWithRefusal())
    sent = pb.to_server(query("SELECT 1; SELECT nama_ibu_kandung FROM customer"))
    assert sent == query(POISON_SQL)


def test_close_and_parse_same_name_in_one_pipeline(chunking: Chunking) -> None:
    pb = tracked(chunking)
    pb.to_server(parse(PLAIN_SQL, "s1"), SYNC)
    pb.to_client(PARSE_COMPLETE, ready("I"))
    pb.to_server(
        close_statement("s1"), parse(MASK_SQL, "s1"), bind("", "s1"), describe_portal(),
        execute(), SYNC,
    )  # fmt: skip
    out = pb.to_client(
        CLOSE_COMPLETE, PARSE_COMPLETE, BIND_COMPLETE, row_desc("nik", "name"),
        data_row(NIK, "x"), complete("SELECT 1"), ready("I"),
    )  # fmt: skip
    assert SECRET not in out
    assert masked_row("x") in split_messages(out)


def test_close_and_bind_same_portal_in_one_pipeline(chunking: Chunking) -> None:
    pb = tracked(chunking)
    begin_transaction(pb)
    pb.to_server(parse(PLAIN_SQL, "plain"), parse(MASK_SQL, "masked"), bind("c1", "plain"), SYNC)
    pb.to_client(PARSE_COMPLETE, PARSE_COMPLETE, BIND_COMPLETE, ready("T"))
    pb.to_server(close_portal("c1"), bind("c1", "masked"), describe_portal("c1"), SYNC)
    pb.to_client(CLOSE_COMPLETE, BIND_COMPLETE, row_desc("nik", "name"), ready("T"))
    pb.to_server(execute("c1"), SYNC)
    try:
        out = pb.to_client(data_row(NIK, "x"), complete("SELECT 1"), ready("T"))
    except ProtocolViolation:
        return  # failing closed is acceptable too
    assert SECRET not in out


def test_rows_of_an_unknown_portal_are_not_forwarded(chunking: Chunking) -> None:
    pb = tracked(chunking)
    # "sqlprep" was created by a SQL-level PREPARE: the server knows it, Topeng does not.
    pb.to_server(bind("", "sqlprep"), execute(), SYNC)
    try:
        out = pb.to_client(BIND_COMPLETE, data_row(NIK), complete("SELECT 1"), ready("I"))
    except ProtocolViolation:
        return
    assert SECRET not in out


def test_sync_during_copy_in_is_ignored_like_postgres(chunking: Chunking) -> None:
    pb = tracked(chunking)
    # libpq's PQexecParams("COPY t FROM STDIN"): Parse/Bind/Describe/Execute/Sync at once.
    pb.to_server(parse("COPY t FROM STDIN"), bind(), describe_portal(), execute(), SYNC)
    pb.to_client(PARSE_COMPLETE, BIND_COMPLETE, NO_DATA, copy_in_response())
    # PQputCopyEnd then sends CopyDone and another Sync; the server ignored the first Sync.
    pb.to_server(copy_data(b"1\n"), COPY_DONE, SYNC)
    pb.to_client(complete("COPY 1"), ready("I"))
    assert_quiet(pb)
    pb.to_server(query("SELECT 1"))
    reply = join(rows_reply(["a"], [["1"]]), ready("I"))
    assert pb.to_client(reply) == reply


def test_query_discarded_while_skipping_to_sync(chunking: Chunking) -> None:
    pb = tracked(chunking)
    pb.to_server(parse("SELEC 1"))
    err = error("42601", 'syntax error at or near "SELEC"')
    assert pb.to_client(err) == err
    pb.to_server(query("SELECT 2"), SYNC)  # PostgreSQL discards the Query, answers the Sync
    assert pb.to_client(ready("I")) == ready("I")
    pb.to_server(query("SELECT 3"))
    reply = join(rows_reply(["a"], [["3"]]), ready("I"))
    assert pb.to_client(reply) == reply


def test_not_idle_before_sync(chunking: Chunking) -> None:
    pb = tracked(chunking)
    pb.to_server(parse("INSERT INTO t VALUES (1)"), bind(), execute(), FLUSH)
    pb.to_client(PARSE_COMPLETE, BIND_COMPLETE, complete("INSERT 0 1"))
    assert not pb.session.idle


def test_mask_decision_column_map_is_used() -> None:
    # The MarkerPolicy masks column 0 only: a sanity check of the test policy itself.
    policy = MarkerPolicy()
    decision = policy.judge_parse(MASK_SQL, ())
    assert decision == Mask({0: ColumnMask("nik", "redact")})
    rewrite = policy.plan_rows(decision, m.RowDescription(()), ())
    assert rewrite is not None
    assert rewrite(memoryview(data_row(NIK, "x")[5:])) == masked_row("x")
    assert types_of(masked_row("x")) == "D"


# --------------------------------------------------------------------------- aborted results


def limited(chunking: Chunking, limit: RowLimit) -> tuple[Playbook, MarkerPolicy]:
    policy = MarkerPolicy(limit=limit)
    return tracked(chunking, policy), policy


def is_row_limit_error(raw: bytes) -> bool:
    fields = m.ErrorFields.decode(raw[5:])
    return raw[:1] == b"E" and fields.sqlstate == "54000" and "max_rows_per_query" in fields.message


@pytest.mark.parametrize(
    "end", [complete("SELECT 4"), error("57014", "canceling statement due to user request")]
)
def test_row_limit_aborts_simple_result(chunking: Chunking, end: bytes) -> None:
    pb, _ = limited(chunking, RowLimit(2))
    pb.to_server(query("SELECT a FROM t"))
    rows = [data_row(str(i)) for i in range(4)]
    out = split_messages(pb.to_client(row_desc("a"), *rows, end, ready("I")))
    assert out[:3] == [row_desc("a"), rows[0], rows[1]]
    assert is_row_limit_error(out[3])
    assert out[4:] == [ready("I")]
    assert pb.session.cancel_requested
    assert pb.session.counters.refused == 1
    assert_quiet(pb)


def test_row_limit_silences_rest_of_simple_query(chunking: Chunking) -> None:
    pb, _ = limited(chunking, RowLimit(1))
    pb.to_server(query("SELECT a FROM t; SELECT b FROM u"))
    out = split_messages(
        pb.to_client(
            rows_reply(["a"], [["1"], ["2"]]),
            rows_reply(["b"], [["3"]]),
            ready("I"),
        )
    )
    assert out[:2] == [row_desc("a"), data_row("1")]
    assert is_row_limit_error(out[2])
    assert out[3:] == [ready("I")]


def test_row_limit_truncates(chunking: Chunking) -> None:
    pb, _ = limited(chunking, RowLimit(2, truncate=True))
    pb.to_server(query("SELECT a FROM t"))
    out = split_messages(pb.to_client(rows_reply(["a"], [["1"], ["2"], ["3"]]), ready("I")))
    assert out[:3] == [row_desc("a"), data_row("1"), data_row("2")]
    assert out[3][:1] == b"N" and "truncated at 2 rows" in m.ErrorFields.decode(out[3][5:]).message
    assert out[4:] == [complete("SELECT 2"), ready("I")]
    assert not pb.session.cancel_requested


def test_refused_result_never_shows_a_row(chunking: Chunking) -> None:
    policy = MarkerPolicy(refuse_rows=MARKER_REFUSAL)
    pb = tracked(chunking, policy)
    pb.to_server(query(PLAIN_SQL))
    out = pb.to_client(rows_reply(["nik", "name"], [[NIK, "a"]]), ready("I"))
    assert SECRET not in out
    assert refusal_bytes() in split_messages(out)
    assert pb.session.cancel_requested


def test_aborted_result_in_transaction_fails_the_transaction(chunking: Chunking) -> None:
    pb, _ = limited(chunking, RowLimit(1))
    begin_transaction(pb)
    pb.to_server(query("SELECT a FROM t"))
    flow = pb.server(rows_reply(["a"], [["1"], ["2"]]), ready("T"))
    # As PostgreSQL would after an error, the transaction must fail: Topeng poisons it.
    assert flow.to_server == query(POISON_SQL)
    out = split_messages(flow.to_client)
    assert out[:2] == [row_desc("a"), data_row("1")] and is_row_limit_error(out[2])
    assert len(out) == 3  # ReadyForQuery waits for the poison's
    assert pb.to_client(POISON_ERROR, ready("E")) == ready("E")
    assert pb.session.transaction_status == "E"
    pb.to_server(query("ROLLBACK"))
    assert pb.to_client(complete("ROLLBACK"), ready("I")) == complete("ROLLBACK") + ready("I")
    assert_quiet(pb)


def test_aborted_execute_silences_rest_of_batch(chunking: Chunking) -> None:
    pb, _ = limited(chunking, RowLimit(2))
    pb.to_server(
        parse(PLAIN_SQL), bind(), describe_portal(), execute(),
        parse(PLAIN_SQL, "s2"), bind("", "s2"), execute(), SYNC,
    )  # fmt: skip
    rows = [data_row(NIK, str(i)) for i in range(3)]
    out = split_messages(
        pb.to_client(
            PARSE_COMPLETE,
            BIND_COMPLETE,
            row_desc("nik", "name"),
            *rows,
            complete("SELECT 3"),
            PARSE_COMPLETE,
            BIND_COMPLETE,
            data_row(NIK, "later"),
            complete("SELECT 1"),
            ready("I"),
        )  # fmt: skip
    )
    assert out[:5] == [PARSE_COMPLETE, BIND_COMPLETE, row_desc("nik", "name"), rows[0], rows[1]]
    assert is_row_limit_error(out[5])
    assert out[6:] == [ready("I")]
    assert_quiet(pb)
