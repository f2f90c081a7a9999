"""Session: the AUTH and SETUP phases, internal queries, begin()."""

from __future__ import annotations

import pytest
from wirekit import (
    AUTH_OK,
    HANDSHAKE,
    TERMINATE,
    Chunking,
    MarkerPolicy,
    Playbook,
    auth_request,
    authenticated,
    backend_key,
    bytewise,
    complete,
    data_row,
    error,
    join,
    notice,
    param_status,
    password,
    query,
    random_chunks,
    ready,
    row_desc,
    startup,
    whole,
)

from proxy.policy.engine import AllowAll
from proxy.session import InternalResult, Phase, Session
from proxy.wire import messages as m
from proxy.wire.framing import ProtocolViolation


@pytest.fixture(params=[whole, bytewise, random_chunks(7)], ids=["whole", "bytewise", "random"])
def chunking(request: pytest.FixtureRequest) -> Chunking:
    return request.param  # type: ignore[no-any-return]


def new(chunking: Chunking = whole) -> Playbook:
    return Playbook(Session(startup(user="agent_budi", database="bank")), chunking)


# --------------------------------------------------------------------------- AUTH


def test_new_session_knows_user_and_database() -> None:
    s = Session(startup(user="agent_budi", database="bank"))
    assert s.phase is Phase.AUTH
    assert (s.user, s.database) == ("agent_budi", "bank")
    assert not s.authenticated and not s.idle


def test_password_exchange_is_relayed(chunking: Chunking) -> None:
    pb = new(chunking)
    assert pb.to_client(auth_request(m.AUTH_MD5, b"salt")) == auth_request(m.AUTH_MD5, b"salt")
    assert pb.to_server(password("md5abc")) == password("md5abc")
    assert not pb.session.authenticated
    assert pb.to_client(AUTH_OK) == AUTH_OK
    assert pb.session.authenticated
    assert pb.session.phase is Phase.AUTH


def test_sasl_exchange_is_relayed(chunking: Chunking) -> None:
    pb = new(chunking)
    sasl = auth_request(m.AUTH_SASL, b"SCRAM-SHA-256\0\0")
    assert pb.to_client(sasl) == sasl
    first = m.frame(b"p", b"SCRAM-SHA-256\0\x00\x00\x00\x05n,,n=")
    assert pb.to_server(first) == first
    cont = auth_request(m.AUTH_SASL_CONTINUE, b"r=abc,s=xyz,i=4096")
    final = auth_request(m.AUTH_SASL_FINAL, b"v=sig")
    assert pb.to_client(cont) == cont
    assert pb.to_server(password("c=biws,r=abc,p=proof")) == password("c=biws,r=abc,p=proof")
    assert pb.to_client(final, AUTH_OK) == final + AUTH_OK
    assert pb.session.authenticated


def test_two_password_messages_in_one_chunk() -> None:
    pb = new(whole)
    assert pb.to_server(password("a"), password("b")) == password("a") + password("b")


@pytest.mark.parametrize("msg", [query("SELECT 1"), m.SYNC, m.Parse("", "SELECT 1").encode()])
def test_non_password_message_during_auth_is_a_violation(msg: bytes) -> None:
    pb = new()
    pb.to_client(auth_request())
    with pytest.raises(ProtocolViolation, match="expected a password response"):
        pb.client(msg)


def test_terminate_during_auth() -> None:
    pb = new()
    pb.to_client(auth_request())
    assert pb.to_server(TERMINATE) == TERMINATE
    assert pb.session.terminated


def test_wrong_password_error_is_recorded_and_forwarded(chunking: Chunking) -> None:
    pb = new(chunking)
    pb.to_client(auth_request())
    pb.to_server(password("wrong"))
    err = error("28P01", 'password authentication failed for user "agent_budi"')
    assert pb.to_client(err) == err
    assert pb.session.auth_error is not None
    assert pb.session.auth_error.sqlstate == "28P01"
    assert "password authentication failed" in pb.session.auth_error.message
    assert not pb.session.authenticated
    assert pb.session.phase is Phase.AUTH


def test_handshake_is_forwarded_and_ready_for_query_held(chunking: Chunking) -> None:
    pb = new(chunking)
    pb.to_client(auth_request())
    pb.to_server(password("pw"))
    out = pb.to_client(HANDSHAKE, notice("welcome"), ready("I"))
    assert out == HANDSHAKE + notice("welcome")
    s = pb.session
    assert s.phase is Phase.SETUP
    assert s.parameters == {"server_version": "15.4", "client_encoding": "UTF8"}
    assert s.backend_key == m.BackendKeyData(4242, b"\x01\x02\x03\x04")
    assert s.transaction_status == "I"
    assert s.take_to_client() == b""  # still held
    assert not s.idle


def test_negotiate_protocol_version_is_forwarded() -> None:
    pb = new()
    nego = m.NegotiateProtocolVersion(0, ("_pq_.unknown",)).encode()
    assert pb.to_client(nego, AUTH_OK) == nego + AUTH_OK


def test_ready_for_query_before_authentication_ok_is_a_violation() -> None:
    pb = new()
    with pytest.raises(ProtocolViolation, match="before AuthenticationOk"):
        pb.server(ready("I"))


@pytest.mark.parametrize("msg", [row_desc("a"), complete("SELECT 1"), m.PARSE_COMPLETE])
def test_unexpected_message_during_auth_is_a_violation(msg: bytes) -> None:
    pb = new()
    with pytest.raises(ProtocolViolation, match="during authentication"):
        pb.server(AUTH_OK, msg)


def test_bad_backend_key_is_a_violation() -> None:
    pb = new()
    with pytest.raises(ProtocolViolation, match="secret key"):
        pb.server(AUTH_OK, m.frame(b"K", b"\x00\x00\x00\x01\x02"))


# --------------------------------------------------------------------------- SETUP and begin


def test_begin_fast_releases_held_ready_for_query() -> None:
    pb = authenticated()
    s = pb.session
    assert s.begin(policy=None) == b""
    assert s.phase is Phase.READY and s.mode == "fast"
    assert s.take_to_client() == ready("I")
    assert s.idle


def test_begin_tracked() -> None:
    pb = authenticated()
    s = pb.session
    policy = AllowAll()
    assert s.begin(policy=policy) == b""
    assert s.mode == "tracked" and s.policy is policy
    assert s.take_to_client() == ready("I")
    assert s.idle


@pytest.mark.parametrize("policy", [None, AllowAll()], ids=["fast", "tracked"])
def test_client_data_during_setup_is_held_until_begin(
    chunking: Chunking, policy: AllowAll | None
) -> None:
    pb = authenticated(chunking)
    sent = join(query("SELECT 1"), query("SELECT 2"))
    assert pb.client(sent).to_server == b""
    assert pb.session.take_to_server() == b""
    assert pb.session.begin(policy=policy) == sent
    assert pb.session.take_to_client() == ready("I")
    assert not pb.session.idle  # two queries are now outstanding


def test_begin_twice_is_refused() -> None:
    pb = authenticated()
    pb.session.begin(policy=None)
    with pytest.raises(RuntimeError):
        pb.session.begin(policy=None)


def test_begin_during_auth_is_refused() -> None:
    with pytest.raises(RuntimeError):
        new().session.begin(policy=None)


def test_begin_with_internal_query_in_flight_is_refused() -> None:
    pb = authenticated()
    pb.session.start_internal("SELECT 1")
    with pytest.raises(RuntimeError):
        pb.session.begin(policy=None)


def test_fast_begin_refuses_server_data_sent_unasked() -> None:
    # The server said something after ReadyForQuery, in the same chunk, without being asked.
    s = Session(startup())
    s.from_server(AUTH_OK + ready("I") + complete("SELECT 1"))
    with pytest.raises(ProtocolViolation, match="before it was asked"):
        s.begin(policy=None)


def test_server_error_during_setup_is_forwarded() -> None:
    pb = authenticated()
    fatal = m.error_response("57P01", "terminating connection", severity="FATAL")
    assert pb.to_client(fatal) == fatal


def test_unasked_rows_during_setup_are_a_violation() -> None:
    pb = authenticated()
    with pytest.raises(ProtocolViolation):
        pb.server(data_row("leak"))


# --------------------------------------------------------------------------- internal queries


def test_internal_query_is_consumed_not_forwarded(chunking: Chunking) -> None:
    pb = authenticated(chunking)
    s = pb.session
    done: list[InternalResult] = []
    s.on_internal_done = done.append
    result = s.start_internal("SELECT rolname, note FROM pg_roles")
    assert s.take_to_server() == query("SELECT rolname, note FROM pg_roles")
    reply = join(
        row_desc("rolname", "note"),
        data_row("agents", None),
        data_row("supervisors", "x"),
        notice("ignored"),
        param_status("TimeZone", "UTC"),
        complete("SELECT 2"),
        ready("I"),
    )
    assert pb.to_client(reply) == b""
    assert result.done and result.error is None
    assert result.columns == ("rolname", "note")
    assert result.rows == [("agents", None), ("supervisors", "x")]
    assert done == [result]
    assert s.parameters["TimeZone"] == "UTC"
    # The client still gets the ReadyForQuery of the handshake, once.
    assert s.begin(policy=MarkerPolicy()) == b""
    assert s.take_to_client() == ready("I")


def test_internal_query_error_is_captured(chunking: Chunking) -> None:
    pb = authenticated(chunking)
    s = pb.session
    result = s.start_internal("SELECT nope")
    s.take_to_server()
    out = pb.to_client(error("42703", 'column "nope" does not exist'), ready("I"))
    assert out == b""
    assert result.done
    assert result.error is not None and result.error.sqlstate == "42703"
    assert result.rows == []


def test_two_internal_queries_in_a_row() -> None:
    pb = authenticated()
    s = pb.session
    first = s.start_internal("SELECT 1")
    second = s.start_internal("SELECT 2")
    assert s.take_to_server() == query("SELECT 1") + query("SELECT 2")
    pb.to_client(row_desc("a"), data_row("1"), complete("SELECT 1"), ready("I"))
    assert first.done and not second.done
    pb.to_client(row_desc("b"), data_row("2"), complete("SELECT 1"), ready("I"))
    assert second.done
    assert (first.rows, second.rows) == ([("1",)], [("2",)])
    assert s.begin(policy=None) == b""


def test_internal_query_starting_copy_is_a_violation() -> None:
    pb = authenticated()
    pb.session.start_internal("COPY t TO STDOUT")
    with pytest.raises(ProtocolViolation, match="COPY"):
        pb.server(m.CopyResponse(b"H", 0, (0,)).encode())


def test_internal_query_only_during_setup() -> None:
    with pytest.raises(RuntimeError):
        new().session.start_internal("SELECT 1")
    pb = authenticated()
    pb.session.begin(policy=AllowAll())
    with pytest.raises(RuntimeError):
        pb.session.start_internal("SELECT 1")


def test_client_data_held_while_internal_query_runs(chunking: Chunking) -> None:
    pb = authenticated(chunking)
    s = pb.session
    s.start_internal("SELECT 1")
    assert s.take_to_server() == query("SELECT 1")
    assert pb.client(query("SELECT secret")).to_server == b""
    pb.to_client(row_desc("a"), data_row("1"), complete("SELECT 1"), ready("I"))
    assert s.begin(policy=AllowAll()) == query("SELECT secret")


def test_handshake_split_mid_ready_for_query() -> None:
    s = Session(startup())
    z = ready("I")
    assert s.from_server(AUTH_OK + backend_key() + z[:3]) == AUTH_OK + backend_key()
    assert s.phase is Phase.AUTH
    assert s.from_server(z[3:]) == b""
    assert s.phase is Phase.SETUP


def test_bytes_in_counts_held_client_data_once() -> None:
    pb = authenticated()
    s = pb.session
    before = s.counters.bytes_in
    sent = query("SELECT 1")
    pb.client(sent)
    s.begin(policy=None)
    assert s.counters.bytes_in - before == len(sent)


def test_internal_query_value_not_utf8() -> None:
    pb = authenticated()
    result = pb.session.start_internal("SELECT rolname FROM pg_roles")
    pb.session.take_to_server()
    try:
        pb.server(row_desc("rolname"), data_row(b"caf\xe9"), complete("SELECT 1"), ready("I"))
    except ProtocolViolation:
        return
    assert result.done and result.rows == [("caf\xe9",)]
