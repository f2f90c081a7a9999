"""Strings in the client_encoding: an unrestricted session that sets client_encoding to something
other than UTF8 (psycopg's own tests use LATIN9) must see its bytes pass unchanged, in fast and
in tracked mode (`--track-all`): SQL, statement names, column names and error text are all in
the client_encoding, not UTF-8.
"""

from __future__ import annotations

import codecs

import pytest
from wirekit import (
    AUTH_OK,
    BIND_COMPLETE,
    PARSE_COMPLETE,
    SYNC,
    Chunking,
    Playbook,
    backend_key,
    bytewise,
    complete,
    data_row,
    error,
    param_status,
    query,
    ready,
    ready_session,
    startup,
    whole,
)

from proxy.policy.engine import AllowAll
from proxy.session import PG_CODECS, Session, pg_codec
from proxy.wire import messages as m

LATIN9 = "iso8859-15"
EURO_TABLE = "foo\u20acbar"  # the euro sign is 0xA4 in LATIN9, invalid as UTF-8 on its own


@pytest.fixture(params=[whole, bytewise], ids=["whole", "bytewise"])
def chunking(request: pytest.FixtureRequest) -> Chunking:
    return request.param  # type: ignore[no-any-return]


def latin9_session(policy: AllowAll | None, chunking: Chunking) -> Playbook:
    """A session whose client has just run SET client_encoding TO latin9."""
    pb = ready_session(policy, chunking)
    sent = query("SET client_encoding TO latin9")
    assert pb.to_server(sent) == sent
    reply = b"".join((complete("SET"), param_status("client_encoding", "LATIN9"), ready("I")))
    assert pb.to_client(reply) == reply
    return pb


def latin9_error(message: str, severity: str = "ERROR", sqlstate: str = "42P01") -> bytes:
    fields = (("S", severity), ("V", severity), ("C", sqlstate), ("M", message))
    return m.ErrorFields(fields).encode_as(b"E", LATIN9)


def latin9_query(sql: str) -> bytes:
    return m.frame(b"Q", sql.encode(LATIN9) + b"\0")


@pytest.mark.parametrize("policy", [None, AllowAll()], ids=["fast", "tracked"])
def test_error_text_in_client_encoding_passes_unchanged(
    chunking: Chunking, policy: AllowAll | None
) -> None:
    pb = latin9_session(policy, chunking)
    sent = latin9_query(f'select 1 from "{EURO_TABLE}"')
    assert pb.to_server(sent) == sent
    reply = latin9_error(f'relation "{EURO_TABLE}" does not exist') + ready("I")
    assert pb.to_client(reply) == reply
    assert not pb.session.server_said_goodbye
    assert pb.session.transaction_status == "I"


@pytest.mark.parametrize("policy", [None, AllowAll()], ids=["fast", "tracked"])
def test_fatal_error_in_client_encoding_is_noticed(policy: AllowAll | None) -> None:
    pb = latin9_session(policy, whole)
    reply = latin9_error("terminating connection \u20ac", "FATAL", "57P01")
    assert pb.to_client(reply) == reply
    assert pb.session.server_said_goodbye


def test_tracked_reads_sql_and_names_in_client_encoding(chunking: Chunking) -> None:
    pb = latin9_session(AllowAll(), chunking)
    # A simple query, recorded as the text the client meant.
    sql = f"select '{EURO_TABLE}' as \"\u20ac\""
    sent = latin9_query(sql)
    assert pb.to_server(sent) == sent
    desc = m.RowDescription((m.FieldDescription("\u20ac", 0, 0, 25, -1, -1, 0),))
    reply = b"".join(
        (
            desc.encode(LATIN9),
            data_row(EURO_TABLE.encode(LATIN9)),
            complete("SELECT 1"),
            ready("I"),
        )
    )
    assert pb.to_client(reply) == reply
    assert pb.session.records[-1].sql == sql
    # The extended protocol with a statement named in LATIN9.
    name = "st\u20ac"
    batch = b"".join(
        (
            m.frame(b"P", m.cstr(name, LATIN9) + m.cstr("select 1", LATIN9) + b"\0\0"),
            m.frame(b"B", b"\0" + m.cstr(name, LATIN9) + b"\0\0\0\0\0\0"),
            m.frame(b"E", b"\0\0\0\0\0"),
            SYNC,
        )
    )
    assert pb.to_server(batch) == batch
    reply = b"".join(
        (PARSE_COMPLETE, BIND_COMPLETE, data_row("1"), complete("SELECT 1"), ready("I"))
    )
    assert pb.to_client(reply) == reply
    assert pb.session.transaction_status == "I"


def test_client_encoding_from_the_startup_packet(chunking: Chunking) -> None:
    # psycopg.connect(..., client_encoding="latin9"): the server reports it before
    # ReadyForQuery, and the session reads the first query with it.
    pb = Playbook(Session(startup("dba_ani", client_encoding="latin9")), chunking)
    handshake = b"".join((AUTH_OK, param_status("client_encoding", "LATIN9"), backend_key()))
    assert pb.to_client(handshake, ready("I")) == handshake
    assert pb.session.begin(policy=AllowAll()) == b""
    assert pb.session.take_to_client() == ready("I")
    sql = f'select 1 from "{EURO_TABLE}"'
    assert pb.to_server(latin9_query(sql)) == latin9_query(sql)
    reply = latin9_error(f'relation "{EURO_TABLE}" does not exist') + ready("I")
    assert pb.to_client(reply) == reply
    assert pb.session.records[-1].sql == sql


def test_back_to_utf8() -> None:
    pb = latin9_session(AllowAll(), whole)
    sent = query("SET client_encoding TO utf8")
    assert pb.to_server(sent) == sent
    reply = b"".join((complete("SET"), param_status("client_encoding", "UTF8"), ready("I")))
    assert pb.to_client(reply) == reply
    sent = query(f'select 1 from "{EURO_TABLE}"')  # UTF-8 again
    assert pb.to_server(sent) == sent
    reply = error("42P01", f'relation "{EURO_TABLE}" does not exist') + ready("I")
    assert pb.to_client(reply) == reply
    assert pb.session.records[-1].sql == f'select 1 from "{EURO_TABLE}"'


def test_every_codec_exists() -> None:
    for codec in PG_CODECS.values():
        codecs.lookup(codec)
    assert pg_codec("latin9") == LATIN9
    assert pg_codec("SHIFT_JIS_2004") == "shift_jis_2004"
    assert pg_codec("MULE_INTERNAL") == "latin-1"  # no Python codec: bytes round-trip
