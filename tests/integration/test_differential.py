"""The same raw message sequences, straight to PostgreSQL and through Topeng: the same replies.

Strategy: each scenario is a function of a connected `rawpg.RawConn` that sends hand-built
messages and returns every reply. It runs once against PostgreSQL and once through Topeng, in
both relay modes (fast: bytes forwarded as they came; tracked: every message parsed and a reply
queue kept), and the two reply lists must be equal message for message, byte for byte. The only
values normalised are those that name the backend process: BackendKeyData's process id and
secret, and the sender pid of a NotificationResponse (which must equal the BackendKeyData pid on
either path). Some scenarios are also sent through Topeng one byte per write, so every framing
boundary is crossed.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import rawpg
from harness import TEST_USERS, PgServer, TopengProcess
from rawpg import (
    COPY_DONE,
    FLUSH,
    MODES,
    SYNC,
    Message,
    RawConn,
    bind,
    close,
    copy_data,
    copy_fail,
    describe,
    execute,
    function_call,
    parse,
    query,
)

USER = "plainuser"  # cleartext password: the raw client stays simple; SCRAM is tested too
INT4, TEXT = 23, 25

Scenario = Callable[[RawConn], list[Message]]


@pytest.fixture(scope="module", params=MODES)
def proxy(
    request: pytest.FixtureRequest, pg: PgServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TopengProcess]:
    if not pg.own_cluster:
        pytest.skip("needs the cleartext user of our own cluster")
    process = rawpg.start_mode(pg, request.param, tmp_path_factory.mktemp(f"diff-{request.param}"))
    yield process
    process.stop()


def _connect(host: str, port: int, pg: PgServer, user: str = USER) -> RawConn:
    return rawpg.connect(host, port, user, TEST_USERS[user], pg.database)


def normalise(messages: list[Message], key: tuple[int, int] | None) -> list[Message]:
    out = []
    for mtype, body in messages:
        if mtype == b"K":
            body = b"<backend key>"
        elif mtype == b"A":
            pid = struct.unpack("!I", body[:4])[0]
            assert key is not None and pid == key[0], "notification from another backend"
            body = b"<own pid>" + body[4:]
        out.append((mtype, body))
    return out


def differential(
    pg: PgServer, proxy: TopengProcess, scenario: Scenario, *, chunk_size: int = 0
) -> list[Message]:
    """Run `scenario` directly and through Topeng; assert equal replies; return them."""
    results = []
    for host, port, chunk in ((pg.host, pg.port, 0), (proxy.host, proxy.port, chunk_size)):
        with _connect(host, port, pg) as conn:
            conn.chunk_size = chunk
            replies = conn.startup + scenario(conn)
            # The session is still in step afterwards.
            tail = conn.roundtrip(query("SELECT 'still in step'"))
            assert tail[-1] == (b"Z", b"I"), tail
            results.append(normalise(replies + tail, conn.backend_key))
    direct, through = results
    assert through == direct
    return direct


def types(messages: list[Message]) -> str:
    return "".join(t.decode() for t, _ in messages)


# -- scenarios ------------------------------------------------------------------------------------


def simple_queries(conn: RawConn) -> list[Message]:
    out = conn.roundtrip(
        query(
            "SELECT 1 AS one, 'x'::text AS t, NULL::int AS n;"
            "SELECT id, full_name, nik FROM bank.customers ORDER BY id LIMIT 3"
        )
    )
    out += conn.roundtrip(query("SELECT 1/0; SELECT 2"))  # the 2nd is never run
    out += conn.roundtrip(query("BEGIN; SELECT 1"))  # in a transaction: Z 'T'
    out += conn.roundtrip(query("SELECT nope"))  # failed transaction: Z 'E'
    out += conn.roundtrip(query("SELECT 1"))  # refused while failed
    out += conn.roundtrip(query("ROLLBACK"))
    out += conn.roundtrip(query("SET application_name = 'differential'"))  # ParameterStatus
    out += conn.roundtrip(query("DO $$BEGIN RAISE NOTICE 'hello %', 42; END$$"))
    out += conn.roundtrip(query("LISTEN topeng_diff; NOTIFY topeng_diff, 'payload'"))
    out += conn.roundtrip(query("UNLISTEN *"))
    return out


def extended_protocol(conn: RawConn) -> list[Message]:
    conn.send(
        parse("s1", "SELECT $1::int + 1 AS n, $2::text AS t", [INT4, 0])
        + describe("S", "s1")
        + bind("p1", "s1", [b"41", b"hello"])
        + describe("P", "p1")
        + execute("p1")
        + bind("", "s1", [struct.pack("!i", 7), b"bin"], param_formats=[1, 0], result_formats=[1])
        + execute("")
        + close("S", "s1")
        + close("P", "p1")
        + close("S", "never_existed")  # not an error
        + SYNC
        + bind("", "s1", [b"1", b"x"])  # s1 is closed now: an error
        + execute("")
        + SYNC
    )
    return conn.read_until_ready(2)


def pipeline_with_error(conn: RawConn) -> list[Message]:
    batch = b""
    for value in (b"1", b"0", b"2"):  # the 2nd divides by zero
        batch += parse("", "SELECT 10 / $1::int AS q", [INT4]) + bind("", "", [value])
        batch += execute("")
    batch += SYNC
    second = parse("later", "SELECT $1::text || '!' AS shout") + bind("", "later", [b"after"])
    second += describe("P") + execute("") + SYNC
    conn.send(batch + second)
    out = conn.read_until_ready(2)
    assert types(out).count("E") == 1, types(out)
    return out


def pipeline_in_transaction(conn: RawConn) -> list[Message]:
    # An explicit transaction across several syncs, with an error that fails it.
    conn.send(
        query("BEGIN")
        + parse("", "SELECT 1")
        + bind("", "")
        + execute("")
        + SYNC
        + parse("", "SELECT 1/0")
        + bind("", "")
        + execute("")
        + parse("", "SELECT 3")  # skipped until Sync
        + bind("", "")
        + execute("")
        + SYNC
        + parse("", "SELECT 4")  # refused: the transaction is failed
        + SYNC
        + query("ROLLBACK")
    )
    return conn.read_until_ready(5)


def copy_in_and_out(conn: RawConn) -> list[Message]:
    out = conn.roundtrip(query("CREATE TEMP TABLE diff_copy (a int, b text)"))
    conn.send(query("COPY diff_copy FROM STDIN"))
    out += conn.read_until(b"G")
    rows = b"".join(f"{i}\trow {i}\n".encode() for i in range(500))
    conn.send(copy_data(rows[:1000]) + copy_data(rows[1000:]) + COPY_DONE)
    out += conn.read_until_ready()
    out += conn.roundtrip(query("COPY diff_copy TO STDOUT"))
    binary = "COPY (SELECT a, b FROM diff_copy WHERE a < 5) TO STDOUT (FORMAT binary)"
    out += conn.roundtrip(query(binary))
    # A client that gives up: CopyFail.
    conn.send(query("COPY diff_copy FROM STDIN"))
    out += conn.read_until(b"G")
    conn.send(copy_data(b"1\tlost\n") + copy_fail("client gave up"))
    out += conn.read_until_ready()
    # Bad data: the server's error ends the COPY.
    conn.send(query("COPY diff_copy FROM STDIN"))
    out += conn.read_until(b"G")
    conn.send(copy_data(b"not a number\tx\n") + COPY_DONE)
    out += conn.read_until_ready()
    out += conn.roundtrip(query("SELECT count(*) FROM diff_copy"))
    return out


def copy_extended(conn: RawConn) -> list[Message]:
    # COPY FROM STDIN through the extended protocol, Sync sent before the data as pgjdbc-like
    # clients may: the server ignores a Sync during COPY IN and answers the one after CopyDone.
    out = conn.roundtrip(query("CREATE TEMP TABLE diff_copy_x (a int)"))
    conn.send(parse("", "COPY diff_copy_x FROM STDIN") + bind("", "") + execute("") + FLUSH)
    out += conn.read_until(b"G")
    conn.send(SYNC + copy_data(b"1\n2\n3\n") + COPY_DONE + SYNC)
    out += conn.read_until_ready()
    conn.send(parse("", "COPY diff_copy_x TO STDOUT") + bind("", "") + execute("") + SYNC)
    out += conn.read_until_ready()
    out += conn.roundtrip(query("SELECT sum(a) FROM diff_copy_x"))
    return out


def function_calls(conn: RawConn) -> list[Message]:
    two, three = struct.pack("!i", 2), struct.pack("!i", 3)
    out = conn.roundtrip(function_call(177, [two, three]))  # int4pl, binary in and out
    value = [body for t, body in out if t == b"V"]
    assert value == [struct.pack("!i", 4) + struct.pack("!i", 5)], out
    out += conn.roundtrip(function_call(177, [b"40", b"2"], arg_formats=[0], result_format=0))
    out += conn.roundtrip(function_call(177, [struct.pack("!i", 2**31 - 1), two]))  # overflow
    out += conn.roundtrip(function_call(177, [None, two]))  # strict: NULL result
    return out


def empty_queries(conn: RawConn) -> list[Message]:
    out = conn.roundtrip(query(""))
    out += conn.roundtrip(query(";"))
    conn.send(parse("", "") + bind("", "") + describe("P") + execute("") + SYNC)
    out += conn.read_until_ready()
    assert types(out).count("I") == 3, types(out)
    return out


def describe_close_and_suspend(conn: RawConn) -> list[Message]:
    sql = "SELECT id, full_name FROM bank.customers WHERE id <= $1 ORDER BY id"
    conn.send(
        parse("st", sql, [INT4])
        + describe("S", "st")
        + bind("", "st", [b"5"])
        + describe("P", "")
        + execute("", 2)
        + execute("", 2)
        + execute("", 2)  # the last row, then CommandComplete
        + describe("P", "no_such_portal")  # an error: skip to Sync
        + execute("", 2)
        + SYNC
        + close("S", "st")
        + describe("S", "st")  # closed: an error
        + SYNC
    )
    out = conn.read_until_ready(2)
    assert types(out).count("s") == 2, types(out)
    # A named portal lives across Syncs inside a transaction.
    conn.send(
        query("BEGIN")
        + parse("", "SELECT g FROM generate_series(1, 5) g")
        + bind("cur", "")
        + execute("cur", 3)
        + SYNC
        + execute("cur", 3)
        + close("P", "cur")
        + SYNC
        + execute("cur", 1)  # closed
        + SYNC
        + query("COMMIT")
    )
    out += conn.read_until_ready(5)
    return out


SCENARIOS: dict[str, Scenario] = {
    "simple": simple_queries,
    "extended": extended_protocol,
    "pipeline_error": pipeline_with_error,
    "pipeline_transaction": pipeline_in_transaction,
    "copy": copy_in_and_out,
    "copy_extended": copy_extended,
    "function_call": function_calls,
    "empty_query": empty_queries,
    "describe_close_suspend": describe_close_and_suspend,
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_same_replies(pg: PgServer, proxy: TopengProcess, name: str) -> None:
    differential(pg, proxy, SCENARIOS[name])


@pytest.mark.parametrize("name", ["simple", "pipeline_error", "copy", "describe_close_suspend"])
def test_same_replies_sent_bytewise(pg: PgServer, proxy: TopengProcess, name: str) -> None:
    differential(pg, proxy, SCENARIOS[name], chunk_size=1)


def test_scram_user_same_startup(pg: PgServer, proxy: TopengProcess) -> None:
    results = []
    for host, port in ((pg.host, pg.port), (proxy.host, proxy.port)):
        with _connect(host, port, pg, user="alice") as conn:
            startup = conn.startup
            results.append(normalise(startup, conn.backend_key))
            codes = [struct.unpack("!I", b[:4])[0] for t, b in startup if t == b"R"]
            assert codes == [10, 11, 12, 0]
    # SASL messages carry per-connection nonces and proofs: compare the rest.
    direct, through = ([m for m in r if m[0] != b"R"] for r in results)
    assert through == direct


def _wrong_password(host: str, port: int, database: str) -> tuple[list[Message], list[Message]]:
    """(the startup exchange up to the error, what came after it until the connection closed)"""
    with RawConn(rawpg.open_socket(host, port)) as conn:
        conn.send(rawpg.startup_message({"user": USER, "database": database}))
        with pytest.raises(rawpg.RawError):
            rawpg._authenticate(conn, USER, "wrong", 10)
        return conn.startup, conn.read_to_eof()


def test_wrong_password_same_error(pg: PgServer, proxy: TopengProcess) -> None:
    direct, _ = _wrong_password(pg.host, pg.port, pg.database)
    through, _ = _wrong_password(proxy.host, proxy.port, pg.database)
    assert through == direct
    assert rawpg.error_fields(direct[-1][1])["C"] == "28P01"


def test_wrong_password_nothing_after_the_error(pg: PgServer, proxy: TopengProcess) -> None:
    assert _wrong_password(pg.host, pg.port, pg.database)[1] == []
    assert _wrong_password(proxy.host, proxy.port, pg.database)[1] == []


def cancelled(pg: PgServer, host: str, port: int) -> list[Message]:
    with _connect(host, port, pg) as conn:
        assert conn.backend_key is not None
        conn.send(query("SELECT pg_sleep(10)"))
        time.sleep(0.5)
        started = time.monotonic()
        canceller = threading.Thread(target=rawpg.send_cancel, args=(host, port, conn.backend_key))
        canceller.start()
        out = conn.read_until_ready(timeout=8)
        canceller.join(5)
        assert time.monotonic() - started < 8
        errors = rawpg.errors_in(out)
        assert [e["C"] for e in errors] == ["57014"], out
        assert errors[0]["M"] == "canceling statement due to user request"
        out += conn.roundtrip(query("SELECT 'usable'"))
        return normalise(out, conn.backend_key)


def test_cancelled_query(pg: PgServer, proxy: TopengProcess) -> None:
    direct = cancelled(pg, pg.host, pg.port)
    through = cancelled(pg, proxy.host, proxy.port)
    assert through == direct


def test_cancel_with_a_wrong_key_cancels_nothing(pg: PgServer, proxy: TopengProcess) -> None:
    with _connect(proxy.host, proxy.port, pg) as conn:
        assert conn.backend_key is not None
        pid, secret = conn.backend_key
        conn.send(query("SELECT pg_sleep(1.5), 'finished'"))
        rawpg.send_cancel(proxy.host, proxy.port, (pid, secret ^ 1))
        out = conn.read_until_ready(timeout=8)
        assert rawpg.errors_in(out) == []
        assert types(out) == "TDCZ"
