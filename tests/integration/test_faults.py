"""Faults between Topeng and PostgreSQL, and between clients and Topeng.

Strategy: a FaultProxy relay (faultproxy.py) sits between Topeng and PostgreSQL (Topeng's
--upstream points at it), so a test can kill, stall, cut or refuse the server side of one
session or of all of them. Each fault gives the affected client a clear error (or ends its
connection) within a bounded time, a neighbour session (whose upstream link is untouched) keeps
working, Topeng serves new sessions afterwards, and Topeng's open file descriptors return to
their baseline once the sessions are gone. What PostgreSQL is running is read straight from
pg_stat_activity as superuser, not through Topeng.

Operational cases already covered by test_operations.py (upstream down at connect, upstream
refusing new connections, silent clients once, cancel, oversized messages) are not repeated.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest
import pytest_asyncio
import rawpg
from faultproxy import FaultProxy
from harness import TEST_USERS, PgServer, TopengProcess

StartTopeng = Callable[..., TopengProcess]
ALICE = TEST_USERS["alice"]
SLACK = 8.0  # bounded waits for a condition, never a timing assertion


@pytest.fixture
def rules(tmp_path: Path) -> Path:
    return rawpg.unrestricted_rules(tmp_path)


@pytest.fixture
def relay(pg: PgServer) -> Iterator[FaultProxy]:
    with FaultProxy(pg.host, pg.port) as proxy:
        yield proxy


@pytest.fixture(params=rawpg.MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def proxy(start_topeng: StartTopeng, relay: FaultProxy, rules: Path, mode: str) -> TopengProcess:
    return start_topeng(
        "--upstream", relay.address, "--startup-timeout", "2s", *rawpg.MODE_ARGS[mode], rules=rules
    )


@pytest_asyncio.fixture
async def neighbour(proxy: TopengProcess) -> AsyncIterator[asyncpg.Connection]:
    """A session opened before the fault (its upstream link is the relay's oldest)."""
    conn = await asyncpg.connect(proxy.dsn("alice", ALICE), ssl=False)
    assert await conn.fetchval("SELECT 1") == 1
    try:
        yield conn
    finally:
        await conn.close()


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def fds_back_to(pid: int, baseline: int, timeout: float = SLACK) -> int:
    deadline = time.monotonic() + timeout
    while (now := open_fds(pid)) > baseline and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return now


async def still_works(proxy: TopengProcess, neighbour: asyncpg.Connection) -> None:
    assert proxy.returncode is None, proxy.stderr_text()[-3000:]
    assert await neighbour.fetchval("SELECT count(*) FROM customers WHERE id <= 5") == 5
    fresh = await asyncpg.connect(proxy.dsn("alice", ALICE), ssl=False, timeout=10)
    try:
        assert await fresh.fetchval("SELECT 'fresh'") == "fresh"
    finally:
        await fresh.close()


async def active_queries(pg: PgServer, tag: str) -> int:
    conn = await asyncpg.connect(pg.superuser_dsn)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'active'"
                " AND query LIKE '%' || $1 || '%' AND pid <> pg_backend_pid()",
                tag,
            )
        )
    finally:
        await conn.close()


async def wait_no_active(pg: PgServer, tag: str, timeout: float = SLACK) -> int:
    deadline = time.monotonic() + timeout
    while (n := await active_queries(pg, tag)) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    return n


def raw_alice(proxy: TopengProcess) -> rawpg.RawConn:
    return rawpg.connect(proxy.host, proxy.port, "alice", ALICE, proxy.pg.database)


# -- upstream killed mid-query -------------------------------------------------------------------


async def test_upstream_killed_mid_query(
    proxy: TopengProcess, relay: FaultProxy, neighbour: asyncpg.Connection, mode: str
) -> None:
    baseline = open_fds(proxy.pid)
    victim = await asyncio.to_thread(raw_alice, proxy)
    victim.send(rawpg.query("SELECT pg_sleep(30) /* topeng-fault-kill */"))
    deadline = time.monotonic() + SLACK
    while not await active_queries(proxy.pg, "topeng-fault-kill"):
        assert time.monotonic() < deadline, "the query never started"
        await asyncio.sleep(0.1)
    relay.kill_newest()
    messages = await asyncio.to_thread(victim.read_to_eof, SLACK)
    victim.sock.close()
    errors = rawpg.errors_in(messages)
    if mode == "tracked":
        # Topeng knows where every message ends: it tells the client why.
        assert [(e["S"], e["C"]) for e in errors] == [("FATAL", "08006")], messages
        assert "lost the connection to the server" in errors[0]["M"]
    else:
        # The fast path forwards bytes as they come and cannot know it is at a message boundary
        # mid-result, so the connection just ends (libpq: "server closed the connection").
        assert [(e["S"], e["C"]) for e in errors] in ([], [("FATAL", "08006")]), messages
    await still_works(proxy, neighbour)
    assert await fds_back_to(proxy.pid, baseline) <= baseline


# -- upstream restarted ----------------------------------------------------------------------------


async def test_upstream_restarted(
    proxy: TopengProcess, relay: FaultProxy, neighbour: asyncpg.Connection
) -> None:
    baseline = open_fds(proxy.pid)
    relay.stop_accepting()
    relay.kill_all()  # the server went away: every session's link is gone
    with pytest.raises((asyncpg.ConnectionDoesNotExistError, asyncpg.PostgresConnectionError,
                        ConnectionError)):  # fmt: skip
        await neighbour.fetchval("SELECT 1")
    with pytest.raises(asyncpg.PostgresError) as caught:
        await asyncpg.connect(proxy.dsn("alice", ALICE), ssl=False, timeout=10)
    assert caught.value.sqlstate == "08006"
    relay.start_accepting()  # the server is back on the same address
    fresh = await asyncpg.connect(proxy.dsn("alice", ALICE), ssl=False, timeout=10)
    try:
        assert await fresh.fetchval("SELECT count(*) FROM accounts") > 0
    finally:
        await fresh.close()
    assert proxy.returncode is None
    # The neighbour's dead session is freed too (its client end is still open).
    await neighbour.close()
    assert await fds_back_to(proxy.pid, baseline - 2) <= baseline - 2


# -- upstream stalled ------------------------------------------------------------------------------


async def test_upstream_stalled_mid_query(
    pg: PgServer, start_topeng: StartTopeng, rules: Path, mode: str
) -> None:
    """A stall (no bytes, nothing closed) mid-query. Topeng has no upstream read timeout: the
    client's own timeout is the way out. asyncpg's timeout sends a CancelRequest, which Topeng
    forwards to the upstream address (the stalled relay), so it does not arrive while the stall
    lasts; the client then closes, and Topeng frees the session at once. Neighbours whose
    links are not stalled are not affected."""
    with FaultProxy(pg.host, pg.port) as stalled, FaultProxy(pg.host, pg.port) as healthy:
        victim_proxy = start_topeng("--upstream", stalled.address, *rawpg.MODE_ARGS[mode],
                                    rules=rules)  # fmt: skip
        other_proxy = start_topeng("--upstream", healthy.address, rules=rules)
        other = await asyncpg.connect(other_proxy.dsn("alice", ALICE), ssl=False)
        baseline = open_fds(victim_proxy.pid)
        victim = await asyncpg.connect(victim_proxy.dsn("alice", ALICE), ssl=False)
        try:
            stalled.stall()
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await victim.fetch("SELECT pg_sleep(0.2) /* topeng-fault-stall */", timeout=1)
            assert time.monotonic() - started < SLACK
            assert await other.fetchval("SELECT 'unaffected'") == "unaffected"
            victim.terminate()  # the client gives up: its socket closes
            assert await fds_back_to(victim_proxy.pid, baseline) <= baseline
        finally:
            victim.terminate()
            stalled.resume()
            await other.close()
        assert await wait_no_active(pg, "topeng-fault-stall") == 0
        fresh = await asyncpg.connect(victim_proxy.dsn("alice", ALICE), ssl=False, timeout=10)
        assert await fresh.fetchval("SELECT 'after the stall'") == "after the stall"
        await fresh.close()


# -- network cut mid-COPY --------------------------------------------------------------------------


def test_network_cut_mid_copy(
    pg: PgServer, proxy: TopengProcess, relay: FaultProxy, mode: str
) -> None:
    table = f"public.fault_copy_{mode}"
    pg.execute(f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (id int, note text);"
               f"GRANT ALL ON {table} TO alice;")  # fmt: skip
    baseline = open_fds(proxy.pid)
    with psycopg.connect(proxy.dsn("alice", ALICE) + "?sslmode=disable") as neighbour:
        conn = psycopg.connect(proxy.dsn("alice", ALICE) + "?sslmode=disable")
        relay.cut_after(64 * 1024, "up")  # both links: the neighbour sends far less than that
        with pytest.raises(psycopg.OperationalError):
            with conn.cursor() as cur, cur.copy(f"COPY {table} FROM STDIN") as copy:
                for i in range(20_000):
                    copy.write_row((i, "x" * 40))
        conn.close()
        relay.clear_cut()
        assert neighbour.execute("SELECT 'unaffected'").fetchone() == ("unaffected",)
    # Nothing half-written: the COPY's transaction was rolled back on the server.
    assert pg.execute(f"SELECT count(*) FROM {table}").strip() == "0"
    pg.execute(f"DROP TABLE {table}")
    with psycopg.connect(proxy.dsn("alice", ALICE) + "?sslmode=disable") as fresh:
        assert fresh.execute("SELECT 1").fetchone() == (1,)
    deadline = time.monotonic() + SLACK
    while open_fds(proxy.pid) > baseline and time.monotonic() < deadline:
        time.sleep(0.1)
    assert open_fds(proxy.pid) <= baseline


# -- the client vanishes mid-result ----------------------------------------------------------------


def _vanish(conn: rawpg.RawConn) -> None:
    """Close abruptly: a reset, no Terminate."""
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.sock.close()


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT pg_sleep(60) /* topeng-fault-vanish */",
        # Streams at once (a nested loop over two small sets), far more than a socket holds.
        "SELECT a, b, repeat('x', 2000) /* topeng-fault-vanish */"
        " FROM generate_series(1, 10000) a, generate_series(1, 10000) b",
    ],
    ids=["sleeping", "large_result"],
)
async def test_client_vanishes_mid_result(
    pg: PgServer, proxy: TopengProcess, neighbour: asyncpg.Connection, sql: str
) -> None:
    baseline = open_fds(proxy.pid)
    victim = await asyncio.to_thread(raw_alice, proxy)
    victim.send(rawpg.query(sql))
    deadline = time.monotonic() + SLACK
    while not await active_queries(pg, "topeng-fault-vanish"):
        assert time.monotonic() < deadline, "the query never started"
        await asyncio.sleep(0.1)
    if "generate_series" in sql:
        await asyncio.to_thread(victim.read_message)  # rows are streaming
    _vanish(victim)
    # The server-side query is cancelled, long before it would have ended by itself.
    assert await wait_no_active(pg, "topeng-fault-vanish") == 0
    await still_works(proxy, neighbour)
    assert await fds_back_to(proxy.pid, baseline) <= baseline


# -- clients that never finish starting ------------------------------------------------------------


async def test_silent_clients_leave_nothing_behind(
    proxy: TopengProcess, neighbour: asyncpg.Connection
) -> None:
    """Two dozen clients connect and never speak (or stop half-way through a startup packet): each
    is closed by --startup-timeout (2s), and every descriptor is released."""
    baseline = open_fds(proxy.pid)
    half = rawpg.startup_message({"user": "alice", "database": "bank"})[:9]

    def silent(i: int) -> bool:
        with rawpg.open_socket(proxy.host, proxy.port) as sock:
            if i % 2:
                sock.sendall(half)
            sock.settimeout(2 + SLACK)
            try:
                while sock.recv(1024):
                    pass
            except TimeoutError:
                return False
            except OSError:
                pass
            return True

    closed = await asyncio.gather(*(asyncio.to_thread(silent, i) for i in range(24)))
    assert all(closed), f"{closed.count(False)} silent clients were never closed"
    await still_works(proxy, neighbour)
    assert await fds_back_to(proxy.pid, baseline) <= baseline


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


@pytest.mark.parametrize("stop_at", ["after_S", "mid_handshake"])
async def test_tls_handshake_never_finishes(
    start_topeng: StartTopeng, rules: Path, certificate: tuple[Path, Path], stop_at: str
) -> None:
    cert, key = certificate
    proxy = start_topeng("--tls-cert", str(cert), "--tls-key", str(key),
                         "--startup-timeout", "2s", rules=rules)  # fmt: skip
    neighbour = await asyncpg.connect(proxy.dsn("alice", ALICE), ssl="require")
    baseline = open_fds(proxy.pid)

    def stuck_client() -> bool:
        with rawpg.open_socket(proxy.host, proxy.port) as sock:
            sock.sendall(struct.pack("!II", 8, rawpg.SSL_CODE))
            assert sock.recv(1) == b"S"
            if stop_at == "mid_handshake":
                # The first bytes of a ClientHello, then nothing.
                ctx = ssl.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
                incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
                tls = ctx.wrap_bio(incoming, outgoing)
                try:
                    tls.do_handshake()
                except ssl.SSLWantReadError:
                    pass
                hello = outgoing.read()
                sock.sendall(hello[: len(hello) // 2])
            sock.settimeout(2 + SLACK)
            try:
                while sock.recv(4096):
                    pass
            except TimeoutError:
                return False
            except OSError:
                pass
            return True

    try:
        closed = await asyncio.gather(*(asyncio.to_thread(stuck_client) for _ in range(10)))
        assert all(closed), "a TLS handshake that never finished was never closed"
        assert await neighbour.fetchval("SELECT 'unaffected'") == "unaffected"
    finally:
        await neighbour.close()
    assert proxy.returncode is None
    assert await fds_back_to(proxy.pid, baseline - 1) <= baseline - 1
