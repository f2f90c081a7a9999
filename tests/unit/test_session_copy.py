"""COPY ... TO STDOUT in a tracked session: judged, rewritten and limited like any result."""

from __future__ import annotations

import pytest
from wirekit import (
    BIND_COMPLETE,
    COPY_DONE,
    MASK_MARKER,
    PARSE_COMPLETE,
    SYNC,
    Chunking,
    MarkerPolicy,
    bind,
    bytewise,
    complete,
    copy_data,
    copy_out_response,
    describe_portal,
    execute,
    join,
    parse,
    query,
    ready,
    ready_session,
    whole,
)

from proxy.policy.decision import Refuse
from proxy.session import RowLimit
from proxy.wire import messages as m

MASK_COPY = f"COPY (SELECT nik FROM customer /* {MASK_MARKER} */) TO STDOUT"
PLAIN_COPY = "COPY (SELECT nik FROM customer) TO STDOUT"


@pytest.fixture(params=[whole, bytewise], ids=["whole", "bytewise"])
def chunking(request: pytest.FixtureRequest) -> Chunking:
    return request.param  # type: ignore[no-any-return]


def _server_copy(*rows: bytes) -> bytes:
    return join(copy_out_response(), *(copy_data(r) for r in rows), COPY_DONE)


def test_allowed_copy_passes_unchanged(chunking: Chunking) -> None:
    pb = ready_session(MarkerPolicy(), chunking)
    pb.to_server(query(PLAIN_COPY))
    reply = join(_server_copy(b"a\n", b"b\n"), complete("COPY 2"), ready("I"))
    assert pb.to_client(reply) == reply
    assert pb.session.counters.rows == 2


def test_masked_copy_is_rewritten(chunking: Chunking) -> None:
    pb = ready_session(MarkerPolicy(), chunking)
    pb.to_server(query(MASK_COPY))
    out = pb.to_client(_server_copy(b"a\n", b"b\n"), complete("COPY 2"), ready("I"))
    assert out == join(
        copy_out_response(), copy_data(b"A\n"), copy_data(b"B\n"), copy_data(b"END\n"),
        COPY_DONE, complete("COPY 2"), ready("I"),
    )  # fmt: skip


def test_masked_copy_through_execute_is_rewritten(chunking: Chunking) -> None:
    pb = ready_session(MarkerPolicy(), chunking)
    sent = pb.to_server(parse(MASK_COPY), bind(), execute(), SYNC)
    # A masked statement without a Describe gets one from Topeng; COPY answers it NoData.
    assert sent == join(parse(MASK_COPY), bind(), describe_portal(), execute(), SYNC)
    out = pb.to_client(
        PARSE_COMPLETE, BIND_COMPLETE, m.NO_DATA, _server_copy(b"x\n"), complete("COPY 1"),
        ready("I"),
    )  # fmt: skip
    assert out == join(
        PARSE_COMPLETE, BIND_COMPLETE, copy_out_response(), copy_data(b"X\n"),
        copy_data(b"END\n"), COPY_DONE, complete("COPY 1"), ready("I"),
    )  # fmt: skip


def test_copy_over_the_row_limit_is_cut_and_cancelled(chunking: Chunking) -> None:
    policy = MarkerPolicy(limit=RowLimit(1))
    pb = ready_session(policy, chunking)
    pb.to_server(query(PLAIN_COPY))
    out = pb.to_client(_server_copy(b"a\n", b"b\n", b"c\n"), complete("COPY 3"), ready("I"))
    messages = [bytes([b[0]]) for b in _split(out)]
    assert messages == [b"H", b"d", b"E", b"Z"]
    assert b"54000" in out
    assert pb.session.cancel_requested
    assert policy.sent == [1]


def test_copy_refused_by_the_plan_never_starts(chunking: Chunking) -> None:
    refusal = Refuse("0A000", "topeng: no COPY here", reason="copy")

    class NoCopy(MarkerPolicy):
        def plan_copy(self, decision: object, response: object) -> object:
            return refusal

    pb = ready_session(NoCopy(), chunking)
    pb.to_server(query(MASK_COPY))
    out = pb.to_client(_server_copy(b"a\n"), complete("COPY 1"), ready("I"))
    assert out == join(m.error_response("0A000", "topeng: no COPY here"), ready("I"))
    (record,) = pb.session.records
    assert record.decision == "refused" and record.reason == "copy"


def _split(data: bytes) -> list[bytes]:
    out = []
    pos = 0
    while pos < len(data):
        length = int.from_bytes(data[pos + 1 : pos + 5], "big")
        out.append(data[pos : pos + 1 + length])
        pos += 1 + length
    return out
