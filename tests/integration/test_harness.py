"""The harness itself: the cluster, its authentication methods, and the sample bank."""

from __future__ import annotations

import asyncio
import os
import struct
from datetime import date

import asyncpg
import pytest
from harness import TEST_CUSTOMERS, TEST_USERS, PgServer

from proxy.embedded import Cluster, ClusterError
from proxy.sampledata import DEMO_USERS, REGIONS, load_sample, parse_nik

# AuthenticationRequest codes (PostgreSQL protocol docs, "Message Formats")
AUTH_CLEARTEXT, AUTH_MD5, AUTH_SASL = 3, 5, 10


async def _auth_request(pg: PgServer, user: str) -> tuple[int, bytes]:
    """Send a StartupMessage and return the server's first AuthenticationRequest."""
    reader, writer = await asyncio.open_connection(pg.host, pg.port)
    try:
        params = b"user\0" + user.encode() + b"\0database\0" + pg.database.encode() + b"\0\0"
        writer.write(struct.pack("!ii", 8 + len(params), 196608) + params)
        await writer.drain()
        kind, length = struct.unpack("!ci", await reader.readexactly(5))
        body = await reader.readexactly(length - 4)
        assert kind == b"R", (kind, body)
        return struct.unpack("!i", body[:4])[0], body[4:]
    finally:
        writer.close()
        await writer.wait_closed()


async def test_cluster_answers(pg: PgServer) -> None:
    conn = await asyncpg.connect(pg.dsn("alice", TEST_USERS["alice"]))
    try:
        assert await conn.fetchval("SELECT current_user") == "alice"
        assert await conn.fetchval("SELECT current_database()") == pg.database
        if pg.own_cluster:
            assert await conn.fetchval("SHOW max_connections") == "600"
            assert await conn.fetchval("SHOW listen_addresses") == "127.0.0.1"
    finally:
        await conn.close()


async def test_tcp_uses_scram(pg: PgServer) -> None:
    code, body = await _auth_request(pg, "alice")
    assert code == AUTH_SASL
    assert b"SCRAM-SHA-256\0" in body


async def test_wrong_password_is_refused(pg: PgServer) -> None:
    with pytest.raises(asyncpg.InvalidPasswordError) as caught:
        await asyncpg.connect(pg.dsn("alice", "not-the-password"))
    assert caught.value.sqlstate == "28P01"


async def test_superuser_needs_a_password_on_tcp(pg: PgServer) -> None:
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(pg.dsn("postgres", "wrong"))


@pytest.mark.parametrize(("user", "code"), [("md5user", AUTH_MD5), ("plainuser", AUTH_CLEARTEXT)])
async def test_md5_and_cleartext_users(pg: PgServer, user: str, code: int) -> None:
    if not pg.own_cluster:
        pytest.skip("needs our own pg_hba.conf (not with TOPENG_TEST_DSN)")
    assert (await _auth_request(pg, user))[0] == code
    conn = await asyncpg.connect(pg.dsn(user, TEST_USERS[user]))
    try:
        assert await conn.fetchval("SELECT count(*) FROM customers") == TEST_CUSTOMERS
    finally:
        await conn.close()
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(pg.dsn(user, "wrong"))


@pytest.mark.parametrize("user", sorted(DEMO_USERS))
async def test_demo_users_log_in(pg: PgServer, user: str) -> None:
    conn = await asyncpg.connect(pg.dsn(user, DEMO_USERS[user]))
    try:
        # search_path is bank, public: unqualified names work
        assert await conn.fetchval("SELECT count(*) FROM customers") == TEST_CUSTOMERS
        groups = {
            r["rolname"]
            for r in await conn.fetch(
                "SELECT b.rolname FROM pg_auth_members m JOIN pg_roles b ON b.oid = m.roleid "
                "JOIN pg_roles u ON u.oid = m.member WHERE u.rolname = current_user"
            )
        }
    finally:
        await conn.close()
    expected = {"spv_budi": {"supervisors"}, "agent_citra": {"agents"}}.get(user, set())
    assert groups == expected


def test_sample_counts(pg: PgServer) -> None:
    out = pg.execute(
        "SELECT count(*) FROM bank.customers;"
        "SELECT count(*) FROM bank.accounts;"
        "SELECT count(*) FROM bank.transactions;"
        "SELECT count(*) FROM bank.accounts a LEFT JOIN bank.customers c ON c.id = a.customer_id"
        " WHERE c.id IS NULL;"
        "SELECT count(DISTINCT nik) FROM bank.customers;"
    )
    customers, accounts, transactions, orphans, distinct_niks = map(int, out.split())
    assert customers == TEST_CUSTOMERS
    assert 1.2 * customers < accounts < 1.8 * customers
    assert transactions > accounts
    assert orphans == 0
    assert distinct_niks == customers


def test_schema_shape(pg: PgServer) -> None:
    out = pg.execute(
        "SELECT column_name || ':' || data_type || ':' || coalesce(character_maximum_length, 0)"
        " FROM information_schema.columns"
        " WHERE table_schema = 'bank' AND table_name = 'customers' ORDER BY ordinal_position;"
    )
    columns = dict(line.split(":", 1) for line in out.splitlines())
    assert columns["nik"] == "character:16"
    assert columns["no_kk"] == "character:16"
    assert columns["penghasilan"] == "numeric:0"
    assert columns["nama_ibu_kandung"] == "text:0"
    assert columns["created_at"] == "timestamp with time zone:0"
    indexes = pg.execute("SELECT indexname FROM pg_indexes WHERE schemaname = 'bank';").split()
    assert {"customers_nik_key", "accounts_customer_id_idx"} <= set(indexes)


async def test_niks_match_birth_dates_genders_and_cities(pg: PgServer) -> None:
    conn = await asyncpg.connect(pg.superuser_dsn)
    try:
        rows = await conn.fetch("SELECT nik, no_kk, birth_date, gender, city FROM customers")
    finally:
        await conn.close()
    cities = {r.code: r.city for r in REGIONS}
    for row in rows:
        info = parse_nik(row["nik"], max_year=2026)
        assert info.birth_date == row["birth_date"], row
        assert info.gender == row["gender"], row
        assert cities[row["nik"][:4]] == row["city"], row
        assert row["no_kk"][:6] == info.region
    assert min(r["birth_date"] for r in rows) >= date(1950, 1, 1)


async def test_same_seed_same_rows(pg: PgServer) -> None:
    for name in ("topeng_det_a", "topeng_det_b"):
        pg.execute(f"DROP DATABASE IF EXISTS {name}; CREATE DATABASE {name};", dbname="postgres")
    try:
        await load_sample(pg.dsn(pg.superuser, pg.superuser_password, "topeng_det_a"), customers=50)
        await load_sample(
            pg.dsn(pg.superuser, pg.superuser_password, "topeng_det_b"), customers=50, seed=1
        )
        query = "SELECT * FROM bank.customers ORDER BY id"
        results = []
        for db in (pg.database, "topeng_det_a", "topeng_det_b"):
            conn = await asyncpg.connect(pg.dsn(pg.superuser, pg.superuser_password, db))
            try:
                results.append([tuple(r) for r in await conn.fetch(query + " LIMIT 50")])
            finally:
                await conn.close()
        default_seed, same_seed, other_seed = results
        assert same_seed == default_seed  # the first rows do not depend on the row count
        assert other_seed != default_seed
    finally:
        pg.execute(
            "DROP DATABASE topeng_det_a WITH (FORCE); DROP DATABASE topeng_det_b WITH (FORCE);",
            dbname="postgres",
        )


def test_execute_stops_on_error(pg: PgServer) -> None:
    with pytest.raises(Exception, match="no_such_table"):
        pg.execute("SELECT 1; SELECT * FROM no_such_table; SELECT 2;")


def test_cluster_stop_cleans_up() -> None:
    cluster = Cluster(max_connections=20)
    with cluster:
        pid = int(cluster.data_dir.joinpath("postmaster.pid").read_text().split()[0])
        socket_dir = cluster.socket_dir
        assert cluster.execute("SELECT 40 + 2").strip() == "42"
        with pytest.raises(ClusterError, match="division by zero"):
            cluster.execute("SELECT 1/0")
    assert not cluster.running
    assert not socket_dir.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    cluster.stop()  # twice is fine


def test_topeng_fixture(start_topeng: object, pg: PgServer) -> None:
    """End to end through the proxy, once `python -m proxy serve` exists."""
    from harness import BANK_RULES, TopengProcess

    assert callable(start_topeng)
    proxy = start_topeng(rules=BANK_RULES if BANK_RULES.exists() else None)
    assert isinstance(proxy, TopengProcess)

    async def through_proxy() -> str:
        conn = await asyncpg.connect(proxy.dsn("dba_ani", DEMO_USERS["dba_ani"]))
        try:
            return str(await conn.fetchval("SELECT current_user"))
        except asyncpg.PostgresError as exc:
            # Authenticated through the proxy; what the rules then allow is not our business.
            assert str(exc).startswith("topeng:"), exc
            return "dba_ani"
        finally:
            await conn.close()

    assert asyncio.run(through_proxy()) == "dba_ani"
    with pytest.raises(asyncpg.InvalidPasswordError):
        asyncio.run(asyncpg.connect(proxy.dsn("dba_ani", "wrong")))
    assert proxy.stop() == 0, proxy.stderr_text()
