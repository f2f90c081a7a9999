"""`python -m bench.tracked`: CPU per `pgbench -S` transaction of a restricted (tracked) session,
in-process, without sockets or a database.

Strategy: the sans-I/O `Session` is driven with the bytes pgbench and PostgreSQL exchange for
`SELECT abalance FROM pgbench_accounts WHERE aid = N`, once per transaction, with a new `N` each
time as pgbench does. The session's policy is a `RestrictedPolicy` built as `proxy.server` builds
one: the bench's rules (`bench.services.BENCH_RULES` in front of rules/bank.yaml), the role
`bench_restricted`, an in-memory rate limiter, a shared `AnalysisCache`, and a catalog of the
pgbench tables. Two layers are measured:

- `session`: `Session.from_client` / `from_server` / `take_*` and the records taken, as a unit;
- `glue`: the same through `proxy.server.Connection`'s data callbacks (pipes without
  transports, so writes cost nothing), which adds the per-chunk work of server.py, the
  metrics and audit bookkeeping of `_take_records` (audit log off, as in `make bench`) and the
  analysis cache's metrics (`register_analysis_cache`).

Protocols: `simple` (one Query per transaction) and `prepared` (Parse once, then Bind, Describe
portal, Execute, Sync per transaction, as libpq's PQexecPrepared sends them). The figure is the
median (and the best) over rounds of this process's CPU time per transaction; a busy machine
still shows in it (caches, frequency), so compare runs made close together. `--profile` prints
a cProfile of one more round.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bench.services import write_rules
from proxy.observe.instrument import register_analysis_cache
from proxy.policy.cache import AnalysisCache
from proxy.policy.catalog import Catalog, from_json
from proxy.policy.engine import RestrictedPolicy
from proxy.policy.limits import make_limiter
from proxy.policy.rules import Rules, load_rules
from proxy.session import Session
from proxy.wire import messages as m
from proxy.wire.startup import PROTOCOL_3_0, StartupMessage

USER = "bench_agent"
ROLE = "bench_restricted"
ACCOUNTS_OID = 16390
SIMPLE_SQL = "SELECT abalance FROM pgbench_accounts WHERE aid = {};"
PREPARED_SQL = "SELECT abalance FROM pgbench_accounts WHERE aid = $1;"
SEARCH_PATH = ("pg_catalog", "public")
DISTINCT_AIDS = 997  # constants cycle: the same text never comes twice in a row


def pgbench_catalog() -> Catalog:
    """The pgbench tables of `pgbench -i`, as Topeng's catalog query would read them."""
    int4 = (23, "integer", "int4", 4)
    int8 = (20, "bigint", "int8", 8)
    tables = [
        (16384, "pgbench_branches", [("bid", int4), ("bbalance", int4)]),
        (16387, "pgbench_tellers", [("tid", int4), ("bid", int4), ("tbalance", int4)]),
        (ACCOUNTS_OID, "pgbench_accounts", [("aid", int4), ("bid", int4), ("abalance", int4)]),
        (16393, "pgbench_history", [("tid", int4), ("bid", int4), ("aid", int4), ("id", int8)]),
    ]
    relations = []
    columns = []
    for oid, name, cols in tables:
        relations.append([oid, 2200, name, "r", None, None, None])
        for attnum, (col, (type_oid, type_name, typname, typlen)) in enumerate(cols, start=1):
            columns.append([oid, attnum, col, type_oid, -1, type_name, typname, None, None, typlen])
    doc = {
        "format": 1,
        "scope": "database",
        "database": "topeng_bench",
        "server_version_num": 160002,
        "schemas": [[11, "pg_catalog"], [2200, "public"]],
        "relations": relations,
        "columns": columns,
    }
    return from_json(json.dumps(doc))


def bench_rules() -> Rules:
    with tempfile.TemporaryDirectory() as tmp:
        return load_rules(write_rules(Path(tmp)))


def restricted_policy(rules: Rules, catalog: Catalog, cache: AnalysisCache) -> RestrictedPolicy:
    """As `proxy.server.Proxy.restricted_policy` builds it."""
    return RestrictedPolicy(
        rules,
        rules.role(ROLE),
        catalog,
        SEARCH_PATH,
        cache=cache,
        hash_key=b"k" * 32,
        on_masked=None,
        limiter=make_limiter(rules),
        user=USER,
        rules_source=lambda: rules,
    )


def ready_session(policy: RestrictedPolicy) -> Session:
    """A session through trust authentication, handed over in tracked mode."""
    session = Session(StartupMessage(PROTOCOL_3_0, (("user", USER), ("database", "topeng_bench"))))
    handshake = b"".join(
        [
            m.Authentication(m.AUTH_OK).encode(),
            m.ParameterStatus("client_encoding", "UTF8").encode(),
            m.ParameterStatus("standard_conforming_strings", "on").encode(),
            m.ParameterStatus("DateStyle", "ISO, MDY").encode(),
            m.BackendKeyData(4242, b"\0\0\x04\xd2").encode(),
            m.ReadyForQuery("I").encode(),
        ]
    )
    session.from_server(handshake)
    session.begin(policy=policy)
    session.take_to_client()
    session.take_to_server()
    return session


def _reply(*, bind: bool) -> bytes:
    field = m.FieldDescription("abalance", ACCOUNTS_OID, 3, 23, 4, -1, 0)
    return b"".join(
        [
            m.frame(b"2", b"") if bind else b"",
            m.RowDescription((field,)).encode(),
            m.DataRow((b"0",)).encode(),
            m.CommandComplete("SELECT 1").encode(),
            m.ReadyForQuery("I").encode(),
        ]
    )


def simple_traffic() -> tuple[list[bytes], bytes]:
    aids = (1 + i * 7919 % 1_000_000 for i in range(DISTINCT_AIDS))
    queries = [m.Query(SIMPLE_SQL.format(aid)).encode() for aid in aids]
    return queries, _reply(bind=False)


def prepared_traffic() -> tuple[bytes, bytes, list[bytes], bytes]:
    prepare = m.Parse("P_0", PREPARED_SQL, ()).encode() + m.frame(b"S", b"")
    prepared = m.frame(b"1", b"") + m.ReadyForQuery("I").encode()
    execs = [
        b"".join(
            [
                m.Bind("", "P_0", (), (str(1 + i * 7919 % 1_000_000).encode(),), ()).encode(),
                m.Describe("P", "").encode(),
                m.Execute("", 0).encode(),
                m.frame(b"S", b""),
            ]
        )
        for i in range(DISTINCT_AIDS)
    ]
    return prepare, prepared, execs, _reply(bind=True)


Step = Callable[[bytes], None]


def session_steps(session: Session) -> tuple[Step, Step]:
    def client(data: bytes) -> None:
        session.from_client(data)
        session.take_to_client()
        session.take_to_server()

    def server(data: bytes) -> None:
        session.from_server(data)
        session.take_to_server()
        session.take_to_client()
        session.records.clear()

    return client, server


def glue_steps(session: Session) -> tuple[Step, Step, Any]:
    """server.py's data callbacks around the session (a running loop is needed to build one)."""
    from proxy.pipe import Pipe
    from proxy.server import Connection

    config = SimpleNamespace(startup_timeout=0, idle_timeout=0)
    proxy = SimpleNamespace(config=config, audit=None, catalogs=None)
    conn = Connection(proxy, Pipe())  # type: ignore[arg-type]
    conn.upstream = Pipe()
    conn.session = session
    conn.role = ROLE
    return conn._on_client_data, conn._on_server_data, conn


def run_simple(client: Step, server: Step, txs: int) -> float:
    queries, reply = simple_traffic()
    n = len(queries)
    start = time.process_time_ns()
    for i in range(txs):
        client(queries[i % n])
        server(reply)
    return (time.process_time_ns() - start) / txs / 1000


def run_prepared(client: Step, server: Step, txs: int, *, prepare: bool) -> float:
    parse, parsed, execs, reply = prepared_traffic()
    if prepare:
        client(parse)
        server(parsed)
    n = len(execs)
    start = time.process_time_ns()
    for i in range(txs):
        client(execs[i % n])
        server(reply)
    return (time.process_time_ns() - start) / txs / 1000


def check(session: Session, protocol: str) -> None:
    """One transaction straight through the session: the reply must reach the client as it
    came, and one statement must be recorded as allowed (so the bench measures the real path)."""
    if protocol == "simple":
        queries, reply = simple_traffic()
        sent = [queries[0]]
    else:
        parse, parsed, execs, reply = prepared_traffic()
        assert session.from_client(parse) == parse
        assert session.from_server(parsed) == parsed
        sent = [execs[0]]
    assert session.from_client(sent[0]) == sent[0], "the statement was not forwarded as sent"
    got = session.from_server(reply)
    assert got == reply, f"the reply was changed: {got!r}"
    records = [r for r in session.records if r.sql]
    assert records and records[-1].decision == "allowed", records
    session.records.clear()


def measure(layer: str, protocol: str, txs: int, rounds: int, profile: bool) -> list[float]:
    """us per transaction of each round (and a profile of one more, if asked)."""

    async def main() -> list[float]:
        rules = bench_rules()
        catalog = pgbench_catalog()
        cache = AnalysisCache()
        if layer == "glue":
            register_analysis_cache(cache)  # as the server does: analysis metrics
        session = ready_session(restricted_policy(rules, catalog, cache))
        if layer == "glue":
            client, server, _conn = glue_steps(session)
        else:
            client, server = session_steps(session)
        prepared = False

        def one(count: int) -> float:
            nonlocal prepared
            if protocol == "simple":
                return run_simple(client, server, count)
            first = not prepared
            prepared = True
            return run_prepared(client, server, count, prepare=first)

        check(session, protocol)
        one(2000)  # warm the analysis cache and the interpreter
        out = [one(txs) for _ in range(rounds)]
        if profile:
            prof = cProfile.Profile()
            prof.enable()
            one(txs)
            prof.disable()
            print(f"--- cProfile: {layer} {protocol}, {txs} transactions")
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        return out

    return asyncio.run(main())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tracked", description=__doc__)
    parser.add_argument("--txs", type=int, default=20000, help="transactions per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--layer", choices=("session", "glue", "both"), default="both")
    parser.add_argument("--protocol", choices=("simple", "prepared", "both"), default="both")
    parser.add_argument("--profile", action="store_true", help="cProfile one more round")
    args = parser.parse_args(argv)
    layers = ("session", "glue") if args.layer == "both" else (args.layer,)
    protocols = ("simple", "prepared") if args.protocol == "both" else (args.protocol,)
    print(f"{'layer':8} {'protocol':9} {'us/tx median':>12} {'best':>6}  rounds")
    for layer in layers:
        for protocol in protocols:
            rounds = measure(layer, protocol, args.txs, args.rounds, args.profile)
            shown = ", ".join(f"{r:.1f}" for r in rounds)
            median = statistics.median(rounds)
            print(f"{layer:8} {protocol:9} {median:12.1f} {min(rounds):6.1f}  ({shown})")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
