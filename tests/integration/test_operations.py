"""Operating Topeng: timeouts, limits, hostile lengths, a dead upstream, load, cancel, TLS, signals.

Each case shows the client a clear error, and a neighbouring session that is not affected.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import struct
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import psycopg
import pytest
import rawpg
from harness import TEST_USERS, PgServer, TopengProcess, free_port

StartTopeng = Callable[..., TopengProcess]
ALICE = TEST_USERS["alice"]


@pytest.fixture
def rules(tmp_path: Path) -> Path:
    return rawpg.unrestricted_rules(tmp_path)


async def _read_until_closed(reader: asyncio.StreamReader, timeout: float) -> bytes:
    data = b""
    async with asyncio.timeout(timeout):
        while chunk := await reader.read(65536):
            data += chunk
    return data


def _errors(data: bytes) -> list[dict[str, str]]:
    out = []
    while len(data) >= 5:
        mtype, length = data[:1], struct.unpack("!I", data[1:5])[0]
        if mtype == b"E":
            out.append(rawpg.error_fields(data[5 : 1 + length]))
        data = data[1 + length :]
    return out


@contextlib.asynccontextmanager
async def _alice(proxy: TopengProcess) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(proxy.dsn("alice", ALICE))
    try:
        yield conn
    finally:
        await conn.close()


# -- startup timeout ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sent",
    [b"", rawpg.startup_message({"user": "alice", "database": "bank"})[:11]],
    ids=["nothing", "half_a_startup_message"],
)
async def test_startup_timeout(start_topeng: StartTopeng, rules: Path, sent: bytes) -> None:
    proxy = start_topeng("--startup-timeout", "1s", rules=rules)
    async with _alice(proxy) as neighbour:
        await asyncio.sleep(1.5)  # longer than the startup timeout: authenticated sessions stay
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        started = time.monotonic()
        writer.write(sent)
        data = await _read_until_closed(reader, timeout=5)
        assert time.monotonic() - started < 5
        writer.close()
        errors = _errors(data)
        assert [(e["S"], e["C"]) for e in errors] in ([], [("FATAL", "08P01")]), data
        assert all("timed out" in e["M"] for e in errors)
        assert await neighbour.fetchval("SELECT count(*) FROM customers WHERE id < 10") == 9


# -- connection limit -----------------------------------------------------------------------------


async def test_connection_limit(start_topeng: StartTopeng, rules: Path) -> None:
    proxy = start_topeng("--max-client-connections", "3", rules=rules)
    conns = [await asyncpg.connect(proxy.dsn("alice", ALICE)) for _ in range(3)]
    try:
        with pytest.raises(asyncpg.TooManyConnectionsError) as caught:
            await asyncpg.connect(proxy.dsn("alice", ALICE))
        assert caught.value.sqlstate == "53300"
        assert "sorry, too many clients already" in str(caught.value)
        assert [await c.fetchval("SELECT $1::int", i) for i, c in enumerate(conns)] == [0, 1, 2]
        await conns.pop().close()
        deadline = time.monotonic() + 5
        while True:  # the freed place is reusable once Topeng has seen the close
            try:
                conns.append(await asyncpg.connect(proxy.dsn("alice", ALICE)))
                break
            except asyncpg.TooManyConnectionsError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        assert await conns[-1].fetchval("SELECT 'new one'") == "new one"
    finally:
        for c in conns:
            await c.close()


# -- oversized messages ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", rawpg.MODES)
@pytest.mark.parametrize(
    "message",
    [b"Q" + struct.pack("!I", 2**31), b"S" + struct.pack("!I", 20000)],
    ids=["query_of_2GB", "sync_of_20kB"],
)
def test_oversized_message(pg: PgServer, tmp_path: Path, mode: str, message: bytes) -> None:
    if not pg.own_cluster:
        pytest.skip("needs the cleartext user of our own cluster")
    proxy = rawpg.start_mode(pg, mode, tmp_path)
    try:
        password = TEST_USERS["plainuser"]
        with (
            rawpg.connect(proxy.host, proxy.port, "plainuser", password, pg.database) as neighbour,
            rawpg.connect(proxy.host, proxy.port, "plainuser", password, pg.database) as hostile,
        ):
            started = time.monotonic()
            hostile.send(message + b"x" * 1000)
            replies = hostile.read_to_eof(timeout=5)
            assert time.monotonic() - started < 5
            errors = rawpg.errors_in(replies)
            assert len(errors) == 1, replies
            assert (errors[0]["S"], errors[0]["C"]) == ("FATAL", "08P01")
            assert "limit" in errors[0]["M"], errors[0]
            replies = neighbour.roundtrip(rawpg.query("SELECT 'unaffected'"))
            assert [t for t, _ in replies] == [b"T", b"D", b"C", b"Z"]
    finally:
        proxy.stop()


# -- upstream down --------------------------------------------------------------------------------


async def test_upstream_down(start_topeng: StartTopeng, rules: Path) -> None:
    proxy = start_topeng("--upstream", f"postgresql://127.0.0.1:{free_port()}", rules=rules)
    started = time.monotonic()
    with pytest.raises(asyncpg.PostgresError) as caught:
        await asyncpg.connect(proxy.dsn("alice", ALICE), timeout=10)
    assert time.monotonic() - started < 5
    assert caught.value.sqlstate == "08006"
    assert "cannot connect to the server" in str(caught.value)


class _Forwarder:
    """A TCP relay to PostgreSQL that can stop accepting while its connections go on."""

    def __init__(self, pg: PgServer) -> None:
        self.pg = pg
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.pg.host, self.pg.port)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    def stop_accepting(self) -> None:
        assert self.server is not None
        self.server.close()


async def test_existing_session_survives_when_upstream_refuses_new_ones(
    pg: PgServer, start_topeng: StartTopeng, rules: Path
) -> None:
    forwarder = _Forwarder(pg)
    await forwarder.start()
    proxy = start_topeng("--upstream", f"postgresql://127.0.0.1:{forwarder.port}", rules=rules)
    async with _alice(proxy) as existing:
        assert await existing.fetchval("SELECT 1") == 1
        forwarder.stop_accepting()
        with pytest.raises(asyncpg.PostgresError) as caught:
            await asyncpg.connect(proxy.dsn("alice", ALICE), timeout=10)
        assert caught.value.sqlstate == "08006"
        assert await existing.fetchval("SELECT count(*) FROM accounts") > 0


# -- many clients ---------------------------------------------------------------------------------


async def test_500_concurrent_connections(start_topeng: StartTopeng, rules: Path) -> None:
    proxy = start_topeng(rules=rules)

    async def client(i: int) -> tuple[int, int]:
        conn = await asyncpg.connect(proxy.dsn("alice", ALICE), timeout=60)
        try:
            one = await conn.fetchval("SELECT $1::int", i)
            name = await conn.fetchval("SELECT full_name FROM customers WHERE id = $1", i + 1)
            assert name
            rows = await conn.fetch("SELECT g FROM generate_series(1, 20) g")
            return int(one), len(rows)
        finally:
            await conn.close()

    results = await asyncio.gather(*(client(i) for i in range(500)), return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    assert failures == [], f"{len(failures)} clients failed:\n{proxy.stderr_text()[-3000:]}"
    assert results == [(i, 20) for i in range(500)]
    assert proxy.returncode is None


# -- cancel ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", rawpg.MODES)
async def test_cancel_through_asyncpg(pg: PgServer, tmp_path: Path, mode: str) -> None:
    proxy = rawpg.start_mode(pg, mode, tmp_path)
    try:
        async with _alice(proxy) as conn:
            started = time.monotonic()
            with pytest.raises((asyncpg.QueryCanceledError, TimeoutError)):
                await asyncio.wait_for(conn.fetch("select pg_sleep(30) /* topeng-cancel */"), 1)
            assert time.monotonic() - started < 10
            assert await conn.fetchval("SELECT 'usable'") == "usable"
        direct = await asyncpg.connect(pg.superuser_dsn)
        try:
            running = await direct.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'active'"
                " AND query LIKE '%topeng-cancel%' AND pid <> pg_backend_pid()"
            )
        finally:
            await direct.close()
        assert running == 0
    finally:
        proxy.stop()


# -- client-facing TLS ----------------------------------------------------------------------------


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


def test_tls_required(
    start_topeng: StartTopeng, rules: Path, certificate: tuple[Path, Path]
) -> None:
    cert, key = certificate
    proxy = start_topeng(
        "--tls-cert", str(cert), "--tls-key", str(key), "--tls-mode", "require", rules=rules
    )
    dsn = proxy.dsn("alice", ALICE)
    with psycopg.connect(dsn + "?sslmode=require") as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT count(*) > 0 FROM customers").fetchone() == (True,)
        with pytest.raises(psycopg.OperationalError) as caught:
            psycopg.connect(dsn + "?sslmode=disable")
        assert "TLS is required" in str(caught.value)
        assert conn.execute("SELECT 'still here'").fetchone() == ("still here",)
    with psycopg.connect(dsn + "?sslmode=prefer") as conn:  # libpq's default
        assert conn.pgconn.ssl_in_use


# -- signals --------------------------------------------------------------------------------------


def test_sigterm_lets_the_open_transaction_finish(start_topeng: StartTopeng, rules: Path) -> None:
    proxy = start_topeng("--shutdown-grace", "20s", rules=rules)
    dsn = proxy.dsn("alice", ALICE)
    with psycopg.connect(dsn) as conn:
        conn.execute("CREATE TEMP TABLE shutdown_t (v int)")
        conn.execute("INSERT INTO shutdown_t VALUES (1)")  # the transaction stays open
        with psycopg.connect(dsn, autocommit=True) as idle:
            signalled = time.monotonic()
            proxy.send_signal(signal.SIGTERM)
            # The idle session is closed, with the server's own shutdown error.
            with pytest.raises(psycopg.OperationalError) as caught:
                while time.monotonic() - signalled < 5:
                    idle.execute("SELECT 1")
                    time.sleep(0.1)
            assert caught.value.sqlstate in (None, "57P01"), caught.value
            with pytest.raises(psycopg.OperationalError):
                psycopg.connect(dsn, connect_timeout=3)
        conn.execute("INSERT INTO shutdown_t VALUES (2)")
        assert conn.execute("SELECT sum(v) FROM shutdown_t").fetchone() == (3,)
        conn.commit()
        assert proxy.wait(timeout=10) == 0, proxy.stderr_text()
        assert time.monotonic() - signalled < 15
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")


def test_sigterm_lets_a_gated_statement_finish(start_topeng: StartTopeng) -> None:
    """A restricted session whose prepared statement the relay thread runs (the gate) is taken
    back before Topeng asks whether it is idle: the statement in flight finishes and its rows
    arrive, then the session is closed."""
    from proxy import relay as relays
    from proxy.sampledata import DEMO_USERS

    if not relays.AVAILABLE:
        pytest.skip("the C relay is not built: nothing is gated")
    proxy = start_topeng("--shutdown-grace", "20s")
    sql = "SELECT count(*) FROM generate_series(1, %s)"
    with psycopg.connect(proxy.dsn("spv_budi", DEMO_USERS["spv_budi"]), autocommit=True) as conn:
        # (all int4: psycopg prepares another statement for another parameter type)
        for n in (40_001, 40_002, 40_003):  # the second leaves the approval, the third is gated
            assert conn.execute(sql, (n,), prepare=True).fetchone() == (n,)
        big = 30_000_000  # seconds of work for the server
        result: list[object] = []

        def long_run() -> None:  # in a thread: the test sends SIGTERM meanwhile
            try:
                result.append(conn.execute(sql, (big,), prepare=True).fetchone())
            except psycopg.Error as exc:
                result.append(exc)

        worker = threading.Thread(target=long_run)
        worker.start()
        time.sleep(0.5)  # the statement is in flight, in the relay thread
        proxy.send_signal(signal.SIGTERM)
        worker.join(30)
        assert result == [(big,)], result
        assert proxy.wait(timeout=15) == 0, proxy.stderr_text()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")


def test_a_gated_statement_whose_server_dies_ends_only_its_session(
    start_topeng: StartTopeng,
) -> None:
    """The server backend of a gated statement in flight is terminated: the thread hands the
    session back, its client gets the server's error and the session ends; another session
    of the same role goes on."""
    from proxy import relay as relays
    from proxy.sampledata import DEMO_USERS

    if not relays.AVAILABLE:
        pytest.skip("the C relay is not built: nothing is gated")
    proxy = start_topeng()
    dsn = proxy.dsn("spv_budi", DEMO_USERS["spv_budi"])
    sql = "SELECT count(*) FROM generate_series(1, %s) /* topeng-gated-kill */"
    with (
        psycopg.connect(dsn, autocommit=True) as victim,
        psycopg.connect(dsn, autocommit=True) as neighbour,
    ):
        for n in (40_001, 40_002, 40_003):  # gated from the third on (all int4)
            assert victim.execute(sql, (n,), prepare=True).fetchone() == (n,)
        result: list[object] = []

        def long_run() -> None:
            try:
                result.append(victim.execute(sql, (300_000_000,), prepare=True).fetchone())
            except psycopg.Error as exc:
                result.append(exc)

        worker = threading.Thread(target=long_run)
        worker.start()
        with psycopg.connect(proxy.pg.superuser_dsn, autocommit=True) as admin:
            deadline = time.monotonic() + 15
            killed = 0
            while not killed:
                assert time.monotonic() < deadline, "the statement never started"
                killed = admin.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE state = 'active' AND query LIKE '%topeng-gated-kill%'"
                    " AND pid <> pg_backend_pid()"
                ).fetchone()[0]  # type: ignore[index]
                time.sleep(0.1)
        worker.join(30)
        assert len(result) == 1 and isinstance(result[0], psycopg.OperationalError), result
        assert neighbour.execute(sql, (7,), prepare=True).fetchone() == (7,)
        with pytest.raises(psycopg.OperationalError):
            victim.execute("SELECT 1")
    assert proxy.returncode is None


def test_sigint_exits_promptly(start_topeng: StartTopeng, rules: Path) -> None:
    proxy = start_topeng("--shutdown-grace", "60s", rules=rules)
    with psycopg.connect(proxy.dsn("alice", ALICE)) as conn:
        conn.execute("SELECT 1")  # a transaction is open
        started = time.monotonic()
        proxy.send_signal(signal.SIGINT)
        assert proxy.wait(timeout=5) == 0, proxy.stderr_text()
        assert time.monotonic() - started < 5
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")


# -- idle timeout ---------------------------------------------------------------------------------


def _closed_after(conn: psycopg.Connection, seconds: float) -> bool:
    """Leave `conn` alone for `seconds` (any query would count as activity), then try it."""
    time.sleep(seconds)
    try:
        conn.execute("SELECT 1")
    except psycopg.OperationalError:
        return True
    return False


def test_idle_timeout(start_topeng: StartTopeng, rules: Path) -> None:
    proxy = start_topeng("--idle-timeout", "1s", rules=rules)
    with (
        psycopg.connect(proxy.dsn("alice", ALICE), autocommit=True) as idle,
        psycopg.connect(proxy.dsn("alice", ALICE), autocommit=True) as busy,
    ):
        busy.execute("SELECT pg_sleep(2.5)")  # busy longer than the timeout: not idle
        assert busy.execute("SELECT 'kept'").fetchone() == ("kept",)
        assert _closed_after(idle, 0.5)  # idle since before the 2.5 s query


def test_idle_timeout_spares_a_gated_statement_in_flight(start_topeng: StartTopeng) -> None:
    """The client of a gated session waits quietly for a long statement the relay thread is
    running: that is not idleness (the relay reports the request in flight)."""
    from proxy import relay as relays
    from proxy.sampledata import DEMO_USERS

    if not relays.AVAILABLE:
        pytest.skip("the C relay is not built: nothing is gated")
    proxy = start_topeng("--idle-timeout", "1s")
    sql = "SELECT count(*) FROM generate_series(1, %s)"
    with psycopg.connect(proxy.dsn("spv_budi", DEMO_USERS["spv_budi"]), autocommit=True) as conn:
        for n in (40_001, 40_002, 40_003):  # int4 all, so one prepared statement; gated
            assert conn.execute(sql, (n,), prepare=True).fetchone() == (n,)
        big = 30_000_000  # longer than the idle timeout
        assert conn.execute(sql, (big,), prepare=True).fetchone() == (big,)
        assert _closed_after(conn, 2.5)  # and idle for real afterwards


def test_idle_timeout_after_extended_copy_in(start_topeng: StartTopeng, rules: Path) -> None:
    """libpq's Sync before the COPY data is ignored by the server: no reply is owed for it."""
    proxy = start_topeng("--idle-timeout", "1s", rules=rules)
    with psycopg.connect(proxy.dsn("alice", ALICE), autocommit=True) as conn:
        conn.execute("CREATE TEMP TABLE idle_copy (v int)")
        pgconn = conn.pgconn
        pgconn.send_query_params(b"COPY idle_copy FROM STDIN", None)  # P/B/D/E/S
        result = pgconn.get_result()
        assert result is not None and result.status == psycopg.pq.ExecStatus.COPY_IN
        pgconn.put_copy_data(b"1\n")
        pgconn.put_copy_end()  # CopyDone, Sync
        while pgconn.get_result() is not None:
            pass
        assert conn.execute("SELECT count(*) FROM idle_copy").fetchone() == (1,)
        assert _closed_after(conn, 3)
