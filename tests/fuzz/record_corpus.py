"""Record the fuzz corpus: real client sessions, byte for byte, as PostgreSQL saw them.

    .venv/bin/python tests/fuzz/record_corpus.py     # rewrites tests/fuzz/corpus/sessions.json

Strategy: a throwaway PostgreSQL with the sample bank (tests/harness.py), a recording relay
(tests/integration/faultproxy.py) in front of it, and one short session of each client we
care about (asyncpg: prepared statements, binary formats, COPY, a transaction, an error;
psycopg: parameters, COPY FROM STDIN and TO STDOUT, a pipeline; raw simple and extended queries
with rawpg). test_fuzz_session.py replays and mutates these transcripts. Sessions run without
TLS (sslmode disable): the corpus is the plaintext protocol.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "integration")]

import asyncpg  # noqa: E402
import harness  # noqa: E402
import psycopg  # noqa: E402
import rawpg  # noqa: E402
from faultproxy import FaultProxy  # noqa: E402

CORPUS = HERE / "corpus" / "sessions.json"
ALICE = harness.TEST_USERS["alice"]


async def asyncpg_session(dsn: str) -> None:
    conn = await asyncpg.connect(dsn, ssl=False)
    try:
        await conn.fetch("SELECT id, nik, full_name, penghasilan FROM customers WHERE id < $1", 4)
        stmt = await conn.prepare("SELECT nik, no_hp FROM customers WHERE nik = $1")
        await stmt.fetch("0000000000000000")
        await conn.execute("CREATE TEMP TABLE scratch (id int, note text)")
        await conn.copy_records_to_table("scratch", records=[(1, "a"), (2, None)])
        async with conn.transaction():
            await conn.executemany("INSERT INTO scratch VALUES ($1, $2)", [(3, "c"), (4, "d")])
        try:
            await conn.fetchval("SELECT 1/0")
        except asyncpg.DivisionByZeroError:
            pass
        await conn.fetchrow("SELECT * FROM accounts ORDER BY id LIMIT 2")
    finally:
        await conn.close()


def psycopg_session(dsn: str) -> None:
    with psycopg.connect(dsn + "?sslmode=disable") as conn:
        conn.execute("SELECT nik, email FROM customers WHERE id = %s", (7,)).fetchall()
        conn.execute("CREATE TEMP TABLE scratch (id int, note text)")
        with conn.cursor() as cur:
            with cur.copy("COPY scratch FROM STDIN") as copy:
                copy.write_row((1, "x"))
                copy.write_row((2, None))
            with cur.copy("COPY (SELECT id, nik FROM customers WHERE id < 3) TO STDOUT") as copy:
                for _ in copy:
                    pass
        with conn.pipeline():
            conn.execute("SELECT %s::int", (1,))
            conn.execute("SELECT full_name FROM customers WHERE id = %s", (2,))
        conn.rollback()


def raw_session(host: str, port: int, database: str) -> None:
    with rawpg.connect(host, port, "alice", ALICE, database) as conn:
        conn.roundtrip(rawpg.query("SELECT nik, no_kk FROM customers WHERE id = 1; SELECT 2"))
        conn.roundtrip(rawpg.query("BEGIN; SELECT 1/0"))
        conn.roundtrip(rawpg.query("ROLLBACK"))
        conn.roundtrip(
            rawpg.parse("s1", "SELECT nik FROM customers WHERE id = $1", [23])
            + rawpg.bind("p1", "s1", [b"3"])
            + rawpg.describe("P", "p1")
            + rawpg.execute("p1", 1)
            + rawpg.execute("p1", 0)
            + rawpg.close("S", "s1")
            + rawpg.SYNC
        )
        conn.roundtrip(rawpg.query(""))


def main() -> None:
    pg = harness.start_pg()
    try:
        with FaultProxy(pg.host, pg.port, record=True) as relay:
            dsn = harness._url("127.0.0.1", relay.port, "alice", ALICE, pg.database)
            asyncio.run(asyncpg_session(dsn))
            psycopg_session(dsn)
            raw_session("127.0.0.1", relay.port, pg.database)
            sessions = [
                [[direction, data.hex()] for direction, data in events]
                for events in relay.transcripts
                if events
            ]
    finally:
        harness.stop_pg(pg)
    CORPUS.write_text(json.dumps(sessions, indent=0) + "\n")
    print(f"{len(sessions)} sessions, {CORPUS.stat().st_size} bytes -> {CORPUS}")


if __name__ == "__main__":
    main()
