"""End-to-end fuzzing: hostile byte streams over TCP to a running Topeng process.

Strategy: one Topeng (bank rules, --startup-timeout 2s, --idle-timeout 5s) in front of the test
PostgreSQL. Many short-lived raw clients, a few dozen at a time, each send one hostile stream:
garbage before or instead of the startup packet, startup packets with lying lengths or flipped
bytes, SSLRequest followed by garbage, random CancelRequests, and, after a real SCRAM login as a
restricted (agent_citra, tracked) or an unrestricted (dba_ani, fast path) user, mutated real
client sessions from the fuzz corpus and random messages. Throughout, a neighbour session runs
masked lookups. Checks:
- a client that never completes its startup is closed within the startup timeout (plus slack);
- after every stream Topeng is alive, its neighbour never saw an error, a fresh asyncpg session
  works, and Topeng's file descriptors are back to their baseline.

The clients' random choices come from a seeded random.Random: a failure names its seed.
Quick form: 80 clients. Long form: until its share of TOPENG_FUZZ_SECONDS is spent (see fuzzkit.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import socket
import struct
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncpg
import pytest
import rawpg
from fuzzkit import LONG, share_deadline
from harness import TopengProcess

from proxy.sampledata import DEMO_USERS

pytestmark = pytest.mark.fuzz

StartTopeng = Callable[..., TopengProcess]
AGENT = ("agent_citra", "citra-agent-secret")
# The well-behaved neighbour: another user of the agent role, so the hostile agent_citra
# clients do not spend its rate limits (max_rows_per_minute is per user).
NEIGHBOUR = ("ai_helper", DEMO_USERS["ai_helper"])
DBA = ("dba_ani", "ani-dba-secret")
STARTUP_TIMEOUT = 2.0
IDLE_TIMEOUT = 5.0
SLACK = 6.0  # a bounded wait past a timeout for the close to arrive on a loaded machine
QUICK_CLIENTS = 80
CONCURRENCY = 20
CORPUS = Path(__file__).resolve().parent / "corpus" / "sessions.json"


def corpus_client_streams() -> list[bytes]:
    """The client half of every recorded session, without its StartupMessage and password
    exchange (those belong to the recorded server's nonce)."""
    out = []
    for events in json.loads(CORPUS.read_text()):
        ups = [bytes.fromhex(h) for d, h in events if d == "up"]
        out.append(b"".join(ups[3:]))  # startup, SASL initial, SASL final
    return out


STREAMS = corpus_client_streams()


def mutate(data: bytes, rng: random.Random) -> bytes:
    for _ in range(rng.randint(1, 4)):
        if not data:
            break
        pos = rng.randrange(len(data))
        op = rng.randrange(4)
        if op == 0:
            data = data[:pos] + bytes([data[pos] ^ (1 << rng.randrange(8))]) + data[pos + 1 :]
        elif op == 1:
            data = data[:pos] + rng.randbytes(rng.randint(1, 8)) + data[pos:]
        elif op == 2:
            data = data[:pos] + data[pos + rng.randint(1, 16) :]
        else:
            data = data[:pos]
    return data


def random_messages(rng: random.Random) -> bytes:
    out = b""
    for _ in range(rng.randint(1, 6)):
        mtype = rng.choice(b"QPBDECSHFXdcfp" + bytes([rng.randrange(256)]))
        body = rng.randbytes(rng.randint(0, 30))
        length = len(body) + 4 if rng.random() < 0.8 else rng.choice([0, 3, 2**31, 10**6])
        out += bytes([mtype]) + struct.pack("!I", length % 2**32) + body
    return out


def pre_auth_stream(rng: random.Random) -> bytes:
    """Bytes a client sends instead of a proper startup."""
    kind = rng.randrange(5)
    startup = rawpg.startup_message({"user": AGENT[0], "database": "bank"})
    if kind == 0:
        return rng.randbytes(rng.randint(1, 64))
    if kind == 1:
        return mutate(startup, rng)
    if kind == 2:
        return struct.pack("!I", rng.choice([0, 7, 8, 9, 10_001, 2**31])) + startup[4:]
    if kind == 3:
        return struct.pack("!II", 8, rawpg.SSL_CODE) + rng.randbytes(rng.randint(0, 40))
    return struct.pack("!IIII", 16, rawpg.CANCEL_CODE, rng.randrange(2**31), rng.randrange(2**32))


def read_until_closed(sock: socket.socket, timeout: float) -> bool:
    """True if the peer closed the connection within `timeout`."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            return False
        except OSError:
            return True
    return False


def hostile_client(port: int, seed: int) -> str:
    """One hostile client; returns what it did, raises AssertionError on a broken promise."""
    rng = random.Random(seed)
    if rng.random() < 0.5:
        data = pre_auth_stream(rng)
        with rawpg.open_socket("127.0.0.1", port) as sock:
            with contextlib.suppress(OSError):
                sock.sendall(data)
            closed = read_until_closed(sock, STARTUP_TIMEOUT + SLACK)
        assert closed, f"seed {seed}: unauthenticated client not closed: {data!r}"
        return "pre_auth"
    user, password = rng.choice([AGENT, DBA])
    conn = rawpg.connect("127.0.0.1", port, user, password, "bank")
    try:
        if rng.random() < 0.6:
            data = mutate(rng.choice(STREAMS), rng)
        else:
            data = random_messages(rng)
        with contextlib.suppress(OSError):
            conn.sock.sendall(data)
        # A complete hostile message ends the session at once; an incomplete one waits (that
        # case is test_faults' and the partial-message test's); do not wait for either here.
        read_until_closed(conn.sock, rng.choice([0.05, 0.5]))
    finally:
        conn.sock.close()
    return f"authenticated_{user}"


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def wait_fds(pid: int, baseline: int, timeout: float = 15.0) -> int:
    deadline = time.monotonic() + timeout
    while (now := open_fds(pid)) > baseline and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    return now


async def neighbour(proxy: TopengProcess, stop: asyncio.Event, counts: dict[str, int]) -> None:
    """A restricted session running masked lookups until told to stop: about 8 a second,
    under the agent role's 600 rows a minute however long the run (long form: minutes)."""
    conn = await asyncpg.connect(proxy.dsn(*NEIGHBOUR), ssl=False)
    try:
        i = 0
        while not stop.is_set():
            i += 1
            nik = await conn.fetchval("SELECT nik FROM customers WHERE id = $1", i % 50 + 1)
            assert nik is not None and nik.endswith("*" * 10), nik
            counts["queries"] += 1
            await asyncio.sleep(0.12)
    finally:
        await conn.close()


async def test_hostile_clients_do_not_disturb_topeng(start_topeng: StartTopeng) -> None:
    proxy = start_topeng(
        "--startup-timeout", f"{STARTUP_TIMEOUT:g}s", "--idle-timeout", f"{IDLE_TIMEOUT:g}s"
    )
    probe = await asyncpg.connect(proxy.dsn(*DBA), ssl=False)  # warm the catalog, then go
    await probe.close()
    baseline = await wait_fds(proxy.pid, 0, timeout=0)
    stop = asyncio.Event()
    counts = {"queries": 0}
    steady = asyncio.ensure_future(neighbour(proxy, stop, counts))
    loop = asyncio.get_running_loop()
    kinds: dict[str, int] = {}
    base_seed = int.from_bytes(os.urandom(4), "big")
    deadline = share_deadline()
    seed = base_seed
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        while True:
            batch = [seed + i for i in range(CONCURRENCY)]
            seed += CONCURRENCY
            done = await asyncio.gather(
                *(loop.run_in_executor(pool, hostile_client, proxy.port, s) for s in batch)
            )
            for kind in done:
                kinds[kind] = kinds.get(kind, 0) + 1
            assert proxy.returncode is None, proxy.stderr_text()[-3000:]
            assert not steady.done(), steady.exception()
            clients = seed - base_seed
            if clients >= QUICK_CLIENTS and (not LONG or time.monotonic() > deadline):
                break
    stop.set()
    await steady  # raises what the neighbour saw
    assert counts["queries"] > 0
    assert set(kinds) == {"pre_auth", "authenticated_agent_citra", "authenticated_dba_ani"}
    # Topeng survived and serves a normal session; every hostile connection is gone.
    conn = await asyncpg.connect(proxy.dsn(*NEIGHBOUR), ssl=False)
    try:
        assert (await conn.fetchval("SELECT nik FROM customers WHERE id = 1")).endswith("*")
    finally:
        await conn.close()
    # Sessions left waiting on an incomplete message end with their client's close.
    assert await wait_fds(proxy.pid, baseline) <= baseline, f"seeds from {base_seed}"
    assert proxy.returncode is None


async def test_authenticated_client_stalling_mid_message(start_topeng: StartTopeng) -> None:
    """An authenticated client sends the first bytes of a message and then nothing. PostgreSQL
    closes such a session after idle_session_timeout; Topeng should after --idle-timeout."""
    proxy = start_topeng("--idle-timeout", "2s")

    def stall(user: tuple[str, str]) -> bool:
        conn = rawpg.connect("127.0.0.1", proxy.port, *user, "bank")
        try:
            conn.sock.sendall(rawpg.query("SELECT 1")[:7])
            return read_until_closed(conn.sock, 2 + SLACK)
        finally:
            conn.sock.close()

    closed = await asyncio.gather(*(asyncio.to_thread(stall, user) for user in (AGENT, DBA)))
    assert closed == [True, True], "agent_citra (tracked), dba_ani (fast)"
