"""The asyncio side: listeners, TLS, upstream connections, cancel routing, shutdown.

Strategy: one `Connection` per client. Its startup runs as a coroutine (read the startup packet,
negotiate TLS, connect to the server, relay the password exchange, decide the role); from then on
both directions are handled in `data_received` callbacks that feed the sans-I/O `Session` and
write what it returns, so the hot path has no task switches and forwards whole chunks.

Cancel requests are forwarded to the server as they came: Topeng hands clients the server's own
BackendKeyData, so a cancel works whichever worker process or Topeng instance receives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from proxy import relay as relays
from proxy.config import Config
from proxy.observe import metrics, tally
from proxy.observe.audit import AuditLog, SessionContext, open_audit_log
from proxy.observe.http import start_http
from proxy.observe.instrument import register_analysis_cache
from proxy.pipe import Pipe
from proxy.policy import fastmask
from proxy.policy.cache import AnalysisCache
from proxy.policy.catalog import CATALOG_SQL, Catalog, CatalogCache, CatalogError
from proxy.policy.catalog import from_json as catalog_from_json
from proxy.policy.decision import Decision, Refuse
from proxy.policy.engine import AllowAll, RestrictedPolicy
from proxy.policy.limits import Limiter, make_limiter
from proxy.policy.masks import MaskCounts
from proxy.policy.roles import RoleMatch
from proxy.policy.rules import HashKeySpec, Rules
from proxy.policy.store import RulesStore
from proxy.session import (
    Approval,
    Counters,
    GateMismatch,
    InternalResult,
    Phase,
    Session,
    SessionRefused,
    StatementPolicy,
    _summary,
)
from proxy.tasks import spawn
from proxy.wire import messages as m
from proxy.wire.framing import (
    BACKEND_LIMITS,
    FRONTEND_LIMITS,
    MessageScanner,
    ProtocolViolation,
    StartupReader,
)
from proxy.wire.startup import (
    SSL_REQUEST,
    CancelRequest,
    GSSENCRequest,
    SSLRequest,
    StartupMessage,
    decode_startup_packet,
)

if TYPE_CHECKING:
    from proxy._relay import GateSpec

log = logging.getLogger("topeng")

PROTOCOL_VIOLATION = "08P01"
INTERNAL_ERROR = "XX000"
GATE_BUDGET_SKIP = 16  # replies before a session with no rate budget to hold asks again
CONNECTION_FAILURE = "08006"
TOO_MANY_CONNECTIONS = "53300"
ADMIN_SHUTDOWN = "57P01"
IDLE_SESSION_TIMEOUT = "57P05"
INVALID_AUTHORIZATION = "28000"
INSUFFICIENT_PRIVILEGE_STATE = "42501"

SEARCH_PATH_SQL = "SELECT pg_catalog.unnest(pg_catalog.current_schemas(true))"

MEMBERSHIP_SQL = (
    "SELECT r.rolname FROM pg_catalog.pg_roles r "
    "WHERE r.rolname <> session_user "
    "AND pg_catalog.pg_has_role(session_user, r.oid, 'MEMBER')"
)

WRITE_HIGH_WATER = 256 * 1024


class SessionEnded(Exception):
    """Raised inside a connection's startup when it is over; the message was already sent."""


class _RoleMetrics:
    """The per-statement metrics of one role, looked up once a session (`labels()` takes a
    lock and builds a key every time), as tallies (proxy/observe/tally.py) the sweep hands to
    prometheus_client. A child is made when first used, so series appear exactly when they
    did before."""

    __slots__ = ("role", "duration", "_queries", "_refusals")

    def __init__(self, role: str) -> None:
        self.role = role
        self.duration = tally.histogram(metrics.QUERY_DURATION.labels(role))
        self._queries: dict[str, tally.CounterTally] = {}
        self._refusals: dict[str, tally.CounterTally] = {}

    def executed(self, decision: Decision, runs: int) -> None:
        """`runs` statements of a prepared statement whose rows passed (the relay's gate)."""
        summary = _summary(decision)[0]
        counter = self._queries.get(summary)
        if counter is None:
            child = metrics.QUERIES.labels(self.role, summary)
            counter = self._queries[summary] = tally.counter(child)
        counter.n += runs

    def statement(self, decision: str, reason: str | None) -> None:
        counter = self._queries.get(decision)
        if counter is None:
            child = metrics.QUERIES.labels(self.role, decision)
            counter = self._queries[decision] = tally.counter(child)
        counter.n += 1
        if decision == "refused":
            why = reason or "policy"
            refusals = self._refusals.get(why)
            if refusals is None:
                child = metrics.REFUSALS.labels(self.role, why)
                refusals = self._refusals[why] = tally.counter(child)
            refusals.n += 1


class Connection:
    """One client and its upstream connection."""

    def __init__(self, proxy: Proxy, client: Pipe) -> None:
        self.proxy = proxy
        self.config = proxy.config
        self.client = client
        self.upstream: Pipe | None = None
        self.session: Session | None = None
        self.role = ""
        self.peer = self._peer_name()
        self.session_id = secrets.token_hex(6)
        self.started = time.monotonic()
        self.tls = False
        self.context: SessionContext | None = None
        self.end_reason = "ok"
        self.last_activity = time.monotonic()
        self.closing = False
        self._done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._internal_done: asyncio.Future[None] | None = None
        self._authenticated: asyncio.Future[None] | None = None
        self._flushed = Counters()
        self._masker: MaskCounts | None = None  # latest result's, counts not yet flushed
        self._cancelling: asyncio.Task[Any] | None = None  # a cancel on its way to the server
        self._held_client: list[bytes] = []  # client data waiting for that cancel
        self._children: _RoleMetrics | None = None  # the role's metric children, once known
        # Fast mode over plain sockets: the relay thread may carry the session (proxy/relay.py).
        self._relay_fds: tuple[int, int] | None = None  # client, server; None: never relayed
        self._relay_id: int | None = None  # while the relay has it
        self._fast_feed: tuple[Callable[[bytes], None], Callable[[bytes], None]] | None = None
        # Tracked mode: the relay thread may carry the session through approved statements
        # (the gate, proxy/relay.py) while it has them.
        self._gated: list[Approval] | None = None  # the approvals it holds now
        self._gate_busy = False  # a request of its is in flight (as of the last report)
        self._gate_runs = 0  # statements it ran since the session was last handed over
        self._gate_backoff = 0  # chances to skip after a short stay (doubles up to 64)
        self._gate_skip = 0

    def _peer_name(self) -> str:
        t = self.client.transport
        peer = t.get_extra_info("peername") if t is not None else None
        if isinstance(peer, tuple):
            return f"{peer[0]}:{peer[1]}"
        return "unix"

    # ------------------------------------------------------------------ startup

    async def run(self) -> None:
        result = "ok"
        try:
            async with asyncio.timeout(self.config.startup_timeout or None):
                startup = await self._read_startup()
                if startup is None:
                    result = "cancel"
                    return
                await self._connect_upstream(startup)
                await self._authenticate()
                await self._setup()
            # From here on all traffic is handled in the pipes' callbacks.
            await self._done
        except TimeoutError:
            result = "startup_timeout"
            log.info("client %s: startup timed out", self.peer)
            self._fatal(
                PROTOCOL_VIOLATION,
                "topeng: startup timed out: the client did not "
                "finish connecting and authenticating in time",
            )
        except SessionEnded as exc:
            result = str(exc) or "refused"
        except ProtocolViolation as exc:
            result = "protocol_error"
            log.info("client %s: protocol violation during startup: %s", self.peer, exc)
            self._fatal(PROTOCOL_VIOLATION, f"topeng: protocol violation: {exc}")
        except (ConnectionError, ssl.SSLError, OSError) as exc:
            result = "network_error"
            log.info("client %s: connection failed: %s", self.peer, exc)
        finally:
            metrics.CONNECTIONS.labels(result).inc()
            self._teardown()

    async def _read_startup(self) -> StartupMessage | None:
        reader = StartupReader()
        tls_done = False
        while True:
            packet = None
            while packet is None:
                data = await self.client.read()
                if not data:
                    raise SessionEnded("client_gone")
                reader.feed(data)
                got = reader.next_packet()
                if got is not None:
                    packet = decode_startup_packet(*got)
            if isinstance(packet, SSLRequest):
                if tls_done:
                    raise ProtocolViolation("SSLRequest after the TLS handshake")
                if reader.pending() or self.client.take_buffered():
                    raise ProtocolViolation("received unencrypted data after SSL request")
                if self.config.client_tls == "disable" or self.proxy.client_ssl is None:
                    self.client.write(b"N")
                    continue
                self.client.write(b"S")
                await self._start_client_tls()
                tls_done = True
                continue
            if isinstance(packet, GSSENCRequest):
                if reader.pending():
                    raise ProtocolViolation("received unencrypted data after GSSENC request")
                self.client.write(b"N")
                continue
            if isinstance(packet, CancelRequest):
                await self.proxy.forward_cancel(packet)
                return None
            if reader.pending():
                raise ProtocolViolation("data after the startup packet before authentication")
            assert isinstance(packet, StartupMessage)
            if self.config.client_tls == "require" and not tls_done:
                self._fatal(
                    INVALID_AUTHORIZATION, "topeng: TLS is required: connect with sslmode=require"
                )
                raise SessionEnded("tls_required")
            if packet.get("replication") not in (None, "false", "0", "off", "no"):
                self._fatal("0A000", "topeng: replication connections are not proxied")
                raise SessionEnded("refused")
            if self.proxy.over_limit:
                self._fatal(
                    TOO_MANY_CONNECTIONS,
                    "sorry, too many clients already",
                    hint=f"Topeng accepts {self.config.max_client_connections} client "
                    "connections per process (max_client_connections).",
                )
                raise SessionEnded("too_many")
            return packet

    async def _start_client_tls(self) -> None:
        loop = asyncio.get_running_loop()
        transport = self.client.transport
        assert transport is not None and self.proxy.client_ssl is not None
        try:
            new = await loop.start_tls(
                transport,
                self.client,
                self.proxy.client_ssl,
                server_side=True,
                ssl_handshake_timeout=self.config.startup_timeout or None,
            )
        except (ssl.SSLError, ConnectionError, TimeoutError, OSError) as exc:
            metrics.TLS_HANDSHAKES.labels("error").inc()
            log.info("client %s: TLS handshake failed: %s", self.peer, exc)
            raise SessionEnded("tls_error") from exc
        if new is None:
            raise SessionEnded("tls_error")
        metrics.TLS_HANDSHAKES.labels("ok").inc()
        self.tls = True
        self.client.transport = new

    async def _connect_upstream(self, startup: StartupMessage) -> None:
        started = time.monotonic()
        try:
            self.upstream = await self.proxy.open_upstream()
        except (OSError, TimeoutError, ssl.SSLError, UpstreamRefused) as exc:
            metrics.UPSTREAM_ERRORS.labels("connect").inc()
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            why = why or type(exc).__name__
            log.warning("cannot connect to the server at %s: %s", self.config.upstream, why)
            self._fatal(
                CONNECTION_FAILURE,
                f"topeng: cannot connect to the server at {self.config.upstream}: {why}",
            )
            raise SessionEnded("upstream_error") from exc
        metrics.UPSTREAM_CONNECT_DURATION.observe(time.monotonic() - started)
        self.session = Session(
            startup,
            client_limits=self.proxy.client_limits,
            server_limits=self.proxy.server_limits,
        )
        self.upstream.peer = self.client
        self.client.peer = self.upstream
        self.upstream.write(startup.encode())

    async def _authenticate(self) -> None:
        """Relay the password exchange until the server's first ReadyForQuery."""
        session = self.session
        upstream = self.upstream
        assert session is not None and upstream is not None
        loop = asyncio.get_running_loop()
        self._authenticated = loop.create_future()
        self._attach()
        leftover = self.client.take_buffered()
        if leftover:
            self._on_client_data(leftover)
        early = upstream.take_buffered()
        if early:
            self._on_server_data(early)
        await self._authenticated
        if session.phase is not Phase.SETUP:
            error = session.auth_error
            audit = self.proxy.audit
            if error is not None and audit is not None:
                audit.auth_failure(self._context(), error.sqlstate, error.message)
            raise SessionEnded("auth_failed")

    async def _setup(self) -> None:
        """Decide the role, then hand the session to the client."""
        session = self.session
        assert session is not None
        store = self.proxy.rules
        rules = store.current
        memberships: frozenset[str] | None = None
        if store.needs_membership(rules, session.user):
            result = await self._internal(MEMBERSHIP_SQL)
            if result.error is not None:
                raise self._setup_failed("look up role membership", result.error)
            memberships = frozenset(r[0] for r in result.rows if r[0] is not None)
        match = store.resolve(rules, session.user, memberships)
        self.role = match.role.name
        policy: StatementPolicy | None
        if match.role.unrestricted:
            policy = AllowAll() if self.config.track_all else None
        else:
            catalog = await self._catalog()
            search_path = await self._search_path()
            policy = self.proxy.restricted_policy(
                rules, match, catalog, search_path, on_masked=self._on_masked, user=session.user
            )
            startup_refusal = startup_parameter_refusal(session.startup, match.role.name)
            if startup_refusal is not None:
                self._refuse_session(startup_refusal)
                raise SessionEnded("refused")
            for name, value in session.parameters.items():
                refusal = policy.check_parameter(name, value)
                if refusal is not None:
                    self._refuse_session(refusal)
                    raise SessionEnded("refused")
        log.debug(
            "client %s: user %s gets role %s (%s)", self.peer, session.user, self.role, match.reason
        )
        metrics.SESSIONS_BY_ROLE.labels(self.role).inc()
        self.context = self._context()
        if self.proxy.audit is not None:
            self.proxy.audit.session_start(self.context)
        to_server = session.begin(policy=policy)
        self._flush(to_server)
        if session.mode == "fast":
            self._install_fast_path()
        elif self.proxy.audit is None and hasattr(policy, "gateable"):
            # Every statement of an audited session is written down: never gated.
            self._relay_fds = self._plain_fds()

    def _refuse_session(self, refusal: Refuse) -> None:
        self.client.write(
            m.error_response(
                refusal.sqlstate,
                refusal.message,
                severity="FATAL",
                detail=refusal.detail,
                hint=refusal.hint,
            )
        )

    def _context(self) -> SessionContext:
        session = self.session
        return SessionContext(
            session_id=self.session_id,
            client=self.peer,
            user=session.user if session is not None else "",
            database=session.database if session is not None else "",
            role=self.role,
            tls=self.tls,
        )

    def _setup_failed(self, what: str, error: m.ErrorFields) -> SessionEnded:
        self._fatal("XX000", f"topeng: could not {what}: {error.message}")
        return SessionEnded("setup_error")

    async def _catalog(self) -> Catalog:
        """The schema of this session's database, loaded over this connection if needed."""
        session = self.session
        assert session is not None
        cache = self.proxy.catalogs
        db = session.database
        interval = self.config.catalog_refresh
        if cache.needs_refresh(db, time.monotonic(), interval):
            # One session loads it; the others wait for that load rather than repeat it.
            async with self.proxy.catalog_lock(db):
                if cache.needs_refresh(db, time.monotonic(), interval):
                    epoch = cache.begin_refresh(db)
                    started = time.monotonic()
                    result = await self._internal(CATALOG_SQL)
                    if result.error is not None or not result.rows or result.rows[0][0] is None:
                        raise self._setup_failed(
                            "read the schema", result.error or m.ErrorFields((("M", "no rows"),))
                        )
                    try:
                        catalog = catalog_from_json(result.rows[0][0])
                    except CatalogError as exc:
                        self._fatal("XX000", f"topeng: could not read the schema: {exc}")
                        raise SessionEnded("setup_error") from exc
                    cache.put(db, catalog, time.monotonic(), epoch=epoch)
                    log.info(
                        "catalog of database %s loaded: %d relations in %.0f ms",
                        db,
                        len(catalog.relations_by_oid),
                        (time.monotonic() - started) * 1000,
                    )
        loaded = cache.get(db)
        assert loaded is not None
        return loaded

    async def _search_path(self) -> tuple[str, ...]:
        """The schemas this session searches, as the server resolves them."""
        result = await self._internal(SEARCH_PATH_SQL)
        if result.error is not None:
            raise self._setup_failed("read the search_path", result.error)
        return tuple(r[0] for r in result.rows if r[0] is not None)

    async def _internal(self, sql: str) -> InternalResult:
        session = self.session
        assert session is not None
        self._internal_done = asyncio.get_running_loop().create_future()
        result = session.start_internal(sql)
        session.on_internal_done = self._on_internal_done
        self._flush(b"")
        await self._internal_done
        return result

    def _on_internal_done(self, result: object) -> None:
        if self._internal_done is not None and not self._internal_done.done():
            self._internal_done.set_result(None)

    # ------------------------------------------------------------------ relay

    def _attach(self) -> None:
        assert self.upstream is not None
        self.client.on_data = self._on_client_data
        self.upstream.on_data = self._on_server_data
        self.client.on_lost = self._on_client_lost
        self.upstream.on_lost = self._on_server_lost
        for pipe in (self.client, self.upstream):
            if pipe.transport is not None:
                pipe.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        if self.client.closed:
            self._on_client_lost(None)
        if self.upstream.closed:
            self._on_server_lost(None)

    def _flush(self, to_server: bytes) -> None:
        session = self.session
        assert session is not None and self.upstream is not None
        extra = session.take_to_server()
        if to_server:
            self.upstream.write(to_server)
        if extra:
            self.upstream.write(extra)
        to_client = session.take_to_client()
        if to_client:
            self.client.write(to_client)

    def _on_client_data(self, data: bytes) -> None:
        session = self.session
        assert session is not None and self.upstream is not None
        if self.config.idle_timeout:
            self.last_activity = time.monotonic()
        if self._cancelling is not None:
            self._held_client.append(data)
            return
        try:
            out = session.from_client(data)
        except ProtocolViolation as exc:
            self._client_broke_protocol(exc)
            return
        if out:
            self.upstream.write(out)
        to_client = session.take_to_client()
        if to_client:
            self.client.write(to_client)
        if session.terminated:
            self._end("ok")

    def _on_server_data(self, data: bytes) -> None:
        session = self.session
        assert session is not None
        try:
            out = session.from_server(data)
        except SessionRefused as exc:
            refusal = exc.refusal
            log.info("client %s: session ended: %s", self.peer, refusal.message)
            self.client.write(session.take_to_client())
            self._refuse_session(refusal)
            self._end("refused")
            return
        except ProtocolViolation as exc:
            self._server_broke_protocol(exc)
            return
        if out:
            self.client.write(out)
        extra = session.take_to_server()
        if extra and self.upstream is not None:
            self.upstream.write(extra)
        if session.records:
            self._take_records()
        if session.cancel_requested:
            session.cancel_requested = False
            self._cancel_running()
        if session.schema_changed:
            session.schema_changed = False
            self.proxy.catalogs.mark_stale(session.database)
        auth = self._authenticated
        if auth is not None and not auth.done() and session.phase is not Phase.AUTH:
            auth.set_result(None)
        if self._relay_fds is not None and self._relay_id is None and not self.closing:
            self._try_gate()

    def _client_broke_protocol(self, exc: ProtocolViolation) -> None:
        log.info("client %s: protocol violation: %s", self.peer, exc)
        self._fatal(PROTOCOL_VIOLATION, f"topeng: protocol violation: {exc}")
        self._end("protocol_error")

    def _server_broke_protocol(self, exc: ProtocolViolation) -> None:
        metrics.UPSTREAM_ERRORS.labels("protocol").inc()
        log.warning("client %s: the server broke the protocol: %s", self.peer, exc)
        self._fatal(PROTOCOL_VIOLATION, f"topeng: the server broke the protocol: {exc}")
        self._end("upstream_protocol_error")

    def _install_fast_path(self) -> None:
        """An unrestricted session: from now on each chunk is counted, its message headers
        walked, and forwarded as it came, with as little Python in between as possible."""
        session, client, upstream = self.session, self.client, self.upstream
        assert session is not None and upstream is not None
        client_write = upstream.transport.write if upstream.transport else upstream.write
        server_write = client.transport.write if client.transport else client.write
        feed_client, feed_server = session.fast_client, session.fast_server
        monotonic = time.monotonic
        track_activity = self.config.idle_timeout > 0
        catalogs, database = self.proxy.catalogs, session.database

        self._relay_fds = self._plain_fds()
        relayable = self._relay_fds is not None
        try_relay = self._try_relay

        def on_client(data: bytes) -> None:
            if track_activity:
                self.last_activity = monotonic()
            try:
                feed_client(data)
            except ProtocolViolation as exc:
                self._client_broke_protocol(exc)
                return
            if not upstream.closed:
                client_write(data)
            if relayable:
                try_relay()

        def on_server(data: bytes) -> None:
            try:
                feed_server(data)
            except ProtocolViolation as exc:
                self._server_broke_protocol(exc)
                return
            if not client.closed:
                server_write(data)
            if session.schema_changed:
                session.schema_changed = False
                catalogs.mark_stale(database)
            if relayable:
                try_relay()

        client.on_data = on_client
        upstream.on_data = on_server
        self._fast_feed = (on_client, on_server)
        if relayable:
            try_relay()

    # ------------------------------------------------------------------ the relay thread

    def _plain_fds(self) -> tuple[int, int] | None:
        """The two sockets' descriptors if the relay thread can carry this session: plain
        (not TLS) on both sides, and a relay in this process."""
        upstream = self.upstream
        if self.proxy.relay is None or upstream is None or self.tls:
            return None
        fds = []
        for pipe in (self.client, upstream):
            t = pipe.transport
            if t is None or t.get_extra_info("ssl_object") is not None:
                return None
            sock = t.get_extra_info("socket")
            if sock is None:
                return None
            fds.append(sock.fileno())
        return fds[0], fds[1]

    def _can_hand_over(self) -> bool:
        """Nothing in the way of handing the session to the relay thread: it is not ending,
        and nothing waits to be written either way."""
        relay, fds = self.proxy.relay, self._relay_fds
        session, upstream = self.session, self.upstream
        if relay is None or fds is None or self._relay_id is not None or self.closing:
            return False
        assert session is not None and upstream is not None
        client = self.client
        ct, ut = client.transport, upstream.transport
        if ct is None or ut is None or client.closed or upstream.closed or session.terminated:
            return False
        if ct.get_write_buffer_size() or ut.get_write_buffer_size():
            return False
        if client.holding_peer or upstream.holding_peer or self._cancelling is not None:
            return False
        return True

    def _hand_over(
        self,
        scanners: tuple[MessageScanner, MessageScanner],
        gate: GateSpec | None = None,
    ) -> bool:
        relay, fds, upstream = self.proxy.relay, self._relay_fds, self.upstream
        assert relay is not None and fds is not None and upstream is not None
        ct, ut = self.client.transport, upstream.transport
        assert ct is not None and ut is not None
        ct.pause_reading()
        ut.pause_reading()
        try:
            rid = relay.add(fds[0], fds[1], scanners[0], scanners[1], self._relay_back, gate)
        except OSError as exc:  # epoll refused the sockets: relay this one in Python
            log.warning("client %s: the relay thread cannot take the session: %s", self.peer, exc)
            self._relay_fds = None
            rid = None
        if rid is None:
            ct.resume_reading()
            ut.resume_reading()
            return False
        self._relay_id = rid
        return True

    def _try_relay(self) -> None:
        """Hands an unrestricted session to the relay thread if nothing is in the way and the
        scanners are between messages they would collect."""
        if self._can_hand_over():
            assert self.session is not None
            self._hand_over(self.session.scanners)

    def _try_gate(self) -> None:
        """Hands a restricted session to the relay thread, gated, if it is between requests
        and has approved statements (after a short stay there, only every so often)."""
        if self._gate_skip:
            self._gate_skip -= 1
            return
        session = self.session
        assert session is not None
        approvals = session.gate_approvals()
        if not approvals or not self._can_hand_over():
            return
        children = self._role_metrics()
        if not children.duration.bounds:
            return  # the duration histogram could not take the thread's counts
        bounds = tuple(children.duration.bounds[:-1])  # (the last is +Inf)
        budget = session.gate_budget(self.ungate)  # (another session of the user needs it)
        if budget is None:
            # Too little of the user's rate budget left to hold a share ahead (or its window
            # is ending): judged here one by one for a while.
            self._gate_skip = GATE_BUDGET_SKIP
            return
        spec = (
            tuple(a.spec() for a in approvals),
            bounds,
            budget.spec(),
            session.transaction_status,
        )
        if self._hand_over(session.gate_scanners(), spec):
            self._gated = approvals
            self._gate_runs = 0
        else:
            session.gate_ended()

    def ungate(self) -> None:
        """Takes a gated session back from the relay thread (the rules were reloaded: its
        approvals were made under the old ones; or another session of the user needs the rate
        budget it holds)."""
        rid, relay = self._relay_id, self.proxy.relay
        if self._gated is not None and rid is not None and relay is not None:
            self._relay_back(relay.recall(rid))

    @property
    def gate_busy(self) -> bool:
        """A gated session with a request in flight (as of the relay's last report)."""
        return self._gated is not None and self._gate_busy

    def _relay_back(self, back: relays.Handback) -> None:
        """The relay handed the session back: take over where it stopped."""
        self._relay_id = None
        gated = self._gated
        self._absorb(back)
        self._gated = None
        if gated is not None:
            assert self.session is not None
            inflight = back.gate.inflight if back.gate is not None else -1
            self.session.gate_ended(gated, inflight)  # before anything is judged again
        client, upstream = self.client, self.upstream
        assert upstream is not None
        for pipe in (client, upstream):
            if pipe.transport is not None and not pipe.closed:
                pipe.transport.resume_reading()
        # Bytes it read and walked but could not write yet go first, as they came.
        if back.to_client:
            client.write(back.to_client)
        if back.to_server:
            upstream.write(back.to_server)
        if gated is not None:
            self._gate_back(back)
            return
        if back.chunk and self._fast_feed is not None:
            on_client, on_server = self._fast_feed
            (on_client if back.side == relays.CLIENT else on_server)(back.chunk)

    def _gate_back(self, back: relays.Handback) -> None:
        """A gated session back: the request in flight is replayed, then the chunk that
        needed Python is read as if it had just arrived."""
        session = self.session
        assert session is not None
        # A short stay: wait longer before the next hand-over (a client that mixes other
        # requests in would otherwise go back and forth on every one).
        if self._gate_runs < 4:
            self._gate_backoff = min(64, max(1, self._gate_backoff * 2))
        else:
            self._gate_backoff = 0
        self._gate_skip = self._gate_backoff
        request = back.gate.request if back.gate is not None else b""
        if request:
            try:
                session.replay_request(request)
            except (GateMismatch, ProtocolViolation) as exc:
                log.error("client %s: the gated session cannot go on: %s", self.peer, exc)
                self._fatal(INTERNAL_ERROR, "topeng: internal error; the session must end")
                self._end("internal_error")
                return
        if back.chunk:
            if back.side == relays.CLIENT:
                self._on_client_data(back.chunk)
            else:
                self._on_server_data(back.chunk)

    def _absorb(self, back: relays.Handback) -> None:
        session = self.session
        assert session is not None
        gated = self._gated
        if gated is None:
            cscan, sscan = session.scanners
            back.client.apply(cscan)
            back.server.apply(sscan)
        session.relayed(back.client.nbytes, back.server.nbytes)
        if back.last_activity > self.last_activity:
            self.last_activity = back.last_activity
        report = back.gate
        if gated is None or report is None:
            return
        self._gate_busy = bool(report.request)
        children = self._role_metrics()
        for approval, runs, rows in zip(gated, report.runs, report.rows, strict=True):
            if runs:
                self._gate_runs += runs
                session.gated(approval, runs, rows)
                children.executed(approval.decision, runs)
        children.duration.merge(report.buckets, report.seconds)
        session.gate_moved(
            gated, report.status, bool(report.cleared), report.bound, bool(report.bound_described)
        )

    def _unrelay(self) -> None:
        """Takes the session back for good (it is ending), before Topeng writes to it."""
        self._relay_fds = None  # never again
        rid, relay = self._relay_id, self.proxy.relay
        if rid is not None and relay is not None:
            self._relay_back(relay.recall(rid))

    def sync_relay(self) -> None:
        """Brings the session's counters and state up to date with the relay thread."""
        rid, relay = self._relay_id, self.proxy.relay
        if rid is not None and relay is not None:
            self._absorb(relay.peek(rid))

    @property
    def relayed(self) -> bool:
        return self._relay_id is not None

    def check_statement_timeout(self, timeout: float) -> None:
        """Cancel the running statement if it has run longer than the role allows."""
        session = self.session
        assert session is not None
        since = session.running_since()
        if since is None or session.clock() - since <= timeout:
            return
        refusal = Refuse(
            "57014",
            f"topeng: statement_timeout ({timeout:g}s) for role {self.role!r} exceeded",
            detail="the statement was cancelled",
            hint="Narrow the query so that it finishes sooner.",
            reason="timeout",
        )
        if session.expire_running(refusal):
            session.cancel_requested = False
            self._cancel_running()

    def _role_metrics(self) -> _RoleMetrics:
        children = self._children
        if children is None or children.role != self.role:
            children = self._children = _RoleMetrics(self.role)
        return children

    def _take_records(self) -> None:
        """Statements that ended: into the metrics and the audit log."""
        session = self.session
        assert session is not None
        records, session.records = session.records, []
        if not records:
            return
        children = self._role_metrics()
        audit = self.proxy.audit
        for record in records:
            children.statement(record.decision, record.reason)
            children.duration.observe(max(0.0, record.finished - record.started))
            if audit is not None and self.context is not None:
                audit.statement(self.context, record)

    def _cancel_running(self) -> None:
        """Cancel whatever this session's server backend is running.

        Until the server has taken the cancel, the client's next messages wait: a cancel that
        reached the backend after the aborted statement had finished would otherwise cancel
        the client's next one (a cancel that arrives while the backend is idle is dropped).
        """
        session = self.session
        key = session.backend_key if session is not None else None
        if key is None:
            return
        task = spawn(self.proxy.forward_cancel(CancelRequest(key.process_id, key.secret_key)))
        if self.closing:
            return
        self._cancelling = task
        task.add_done_callback(self._cancel_done)

    def _cancel_done(self, task: asyncio.Task[Any]) -> None:
        if self._cancelling is not task:
            return
        self._cancelling = None
        held, self._held_client = self._held_client, []
        for data in held:
            if self.closing:
                return
            self._on_client_data(data)

    def _on_client_lost(self, exc: Exception | None) -> None:
        session = self.session
        if session is not None and session.terminated:
            self._end("ok")  # it said goodbye (Terminate) before it closed
            return
        if session is not None and session.phase is Phase.READY and not session.idle:
            # The client vanished with a statement running: stop it on the server.
            self._cancel_running()
        self._end("client_gone")

    def _on_server_lost(self, exc: Exception | None) -> None:
        session = self.session
        if session is not None and session.terminated:
            self._end("ok")  # the client said goodbye; the server closing is the answer
            return
        if session is not None and session.server_said_goodbye:
            # The server told the client why it is closing (a wrong password, a shutdown);
            # nothing to add.
            self._end("upstream_closed")
            return
        if not self.closing:
            metrics.UPSTREAM_ERRORS.labels("lost").inc()
            session = self.session
            at_boundary = session is None or session.phase is not Phase.READY or session.idle
            if at_boundary or (session is not None and session.mode == "tracked"):
                self._fatal(CONNECTION_FAILURE, "topeng: lost the connection to the server")
        self._end("upstream_lost")

    # ------------------------------------------------------------------ ending

    def _fatal(self, sqlstate: str, message: str, *, hint: str | None = None) -> None:
        if self.client.closed or self.closing:
            return
        self.client.write(m.error_response(sqlstate, message, severity="FATAL", hint=hint))

    def close_for(self, sqlstate: str, message: str) -> None:
        """End this session from outside (shutdown, idle timeout) with a FATAL error."""
        self._unrelay()
        if self.closing:
            return  # what the relay handed back ended it
        self._fatal(sqlstate, message)
        self._end("closed_by_topeng")

    def _end(self, why: str) -> None:
        if not self.closing:
            self.end_reason = why
        if not self._done.done():
            self._done.set_result(None)
        auth = self._authenticated
        if auth is not None and not auth.done():
            auth.set_result(None)
        if self._internal_done is not None and not self._internal_done.done():
            self._internal_done.set_exception(SessionEnded(why))
        self._teardown()

    def _teardown(self) -> None:
        if self.closing:
            return
        self._unrelay()
        if self.closing:
            return  # what the relay handed back ended it (and tore it down)
        self.closing = True
        upstream = self.upstream
        session = self.session
        if upstream is not None and not upstream.closed:
            if session is not None and session.phase is Phase.READY and session.idle:
                upstream.write(m.TERMINATE)
            upstream.close()
        if not self.client.closed:
            self.client.close()
        if self.role:
            metrics.SESSIONS_BY_ROLE.labels(self.role).dec()
        if session is not None and session.records:
            self._take_records()
        self.flush_metrics()
        tally.flush_all()  # an ended session's statements are counted by the time it is
        audit = self.proxy.audit
        if audit is not None and self.context is not None and session is not None:
            c = session.counters
            audit.session_end(
                self.context,
                reason=self.end_reason,
                rows=c.rows,
                bytes_in=c.bytes_in,
                bytes_out=c.bytes_out,
                duration=time.monotonic() - self.started,
            )
        self.proxy.forget(self)

    def _on_masked(self, masker: MaskCounts) -> None:
        self._flush_masked()
        self._masker = masker

    def _flush_masked(self) -> None:
        masker = self._masker
        if masker is None or not self.role:
            return
        for label, count in masker.take_masked_counts().items():
            if count:
                metrics.MASKED_VALUES.labels(self.role, label).inc(count)

    def flush_metrics(self) -> None:
        """Add what the session counted since the last flush to the Prometheus metrics."""
        self._flush_masked()
        session = self.session
        if session is None:
            return
        now, last = session.counters, self._flushed
        metrics.BYTES.labels("in").inc(now.bytes_in - last.bytes_in)
        metrics.BYTES.labels("out").inc(now.bytes_out - last.bytes_out)
        role = self.role
        if role:
            if session.mode == "fast" and now.queries != last.queries:
                # Tracked sessions count statements from their records (_take_records).
                metrics.QUERIES.labels(role, "allowed").inc(now.queries - last.queries)
            if now.rows != last.rows:
                metrics.ROWS.labels(role).inc(now.rows - last.rows)
        self._flushed = replace(now)


# Startup parameters a restricted session may carry: who and where, and the settings every
# driver sends. Anything else (`options`, `role`, `search_path`, any other server parameter)
# would change what the server runs behind the analysis's back.
STARTUP_PARAMETERS = frozenset(
    {
        "user",
        "database",
        "application_name",
        "fallback_application_name",
        "client_encoding",
        "DateStyle",
        "TimeZone",
        "extra_float_digits",
        "IntervalStyle",
        "datestyle",
        "timezone",
        "intervalstyle",
        "_pq_.command_tag",
    }
)


def startup_parameter_refusal(startup: StartupMessage, role: str) -> Refuse | None:
    """Why a restricted session's StartupMessage is refused, or None."""
    for name, value in startup.params:
        if name in STARTUP_PARAMETERS:
            continue
        if name == "options" and not value.strip():
            continue
        return Refuse(
            INSUFFICIENT_PRIVILEGE_STATE,
            f"topeng: startup parameter {name!r} is not allowed for role {role!r}",
            detail=f"{name}={value!r} would set a server parameter for the session",
            hint="Connect without it; ask your DBA to set defaults with ALTER ROLE instead.",
            reason="set",
        )
    return None


class UpstreamRefused(Exception):
    """The server would not speak TLS although the configuration demands it."""


class _ClientPipe(Pipe):
    __slots__ = ("proxy",)

    def __init__(self, proxy: Proxy) -> None:
        super().__init__()
        self.proxy = proxy

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.proxy.accept(self)


class Proxy:
    """All listeners and sessions of one process."""

    def __init__(self, config: Config, rules: RulesStore, *, audit: AuditLog | None = None) -> None:
        self.config = config
        self.rules = rules
        self.audit = audit
        self.connections: set[Connection] = set()
        self.servers: list[asyncio.Server] = []
        self.http: asyncio.AbstractServer | None = None
        self.client_ssl = self._client_ssl_context()
        self.upstream_ssl = self._upstream_ssl_context()
        self.client_limits = replace(FRONTEND_LIMITS, max_message=config.max_message_size)
        # The server is trusted to send what it sends (a DataRow may reach 1 GB).
        self.server_limits = replace(BACKEND_LIMITS, max_message=1024 * 1024 * 1024)
        self.shutting_down = False
        self.catalogs = CatalogCache()
        self.analysis_cache = AnalysisCache()
        register_analysis_cache(self.analysis_cache)
        self.limiters: dict[str, Limiter] = {}
        self._hash_keys: dict[HashKeySpec, bytes] = {}
        self._catalog_locks: dict[str, asyncio.Lock] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        self.relay: relays.Relay | None = None  # made in start(), on the loop it serves

    # -- TLS contexts

    def _client_ssl_context(self) -> ssl.SSLContext | None:
        if not self.config.tls_cert:
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.config.tls_cert, self.config.tls_key)
        return ctx

    def _upstream_ssl_context(self) -> ssl.SSLContext | None:
        mode = self.config.upstream_tls
        if mode == "disable":
            return None
        if mode == "verify-full":
            ctx = ssl.create_default_context(cafile=self.config.upstream_tls_ca)
            return ctx
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx

    # -- policy

    def catalog_lock(self, db: str) -> asyncio.Lock:
        lock = self._catalog_locks.get(db)
        if lock is None:
            lock = self._catalog_locks[db] = asyncio.Lock()
        return lock

    def restricted_policy(
        self,
        rules: Rules,
        match: RoleMatch,
        catalog: Catalog,
        search_path: tuple[str, ...],
        on_masked: Callable[[MaskCounts], None] | None = None,
        user: str | None = None,
    ) -> StatementPolicy:
        """The policy that judges a restricted session's statements."""
        return RestrictedPolicy(
            rules,
            match.role,
            catalog,
            search_path,
            cache=self.analysis_cache,
            hash_key=self.hash_key(rules),
            on_masked=on_masked,
            limiter=self.limiter(rules),
            user=user,
            rules_source=lambda: self.rules.current,
        )

    def limiter(self, rules: Rules) -> Limiter:
        """The rate-limit counters of the rules' backend, one per backend for the process."""
        backend = rules.limits_backend
        found = self.limiters.get(backend)
        if found is None:
            found = self.limiters[backend] = make_limiter(rules)
            spawn(found.run(), name="topeng-limits")
        return found

    def hash_key(self, rules: Rules) -> bytes:
        """The key of the `hash` mask: from the rules' hash_key, else random per instance."""
        spec = rules.hash_key
        if spec is None:
            return self.rules.random_hash_key
        cached = self._hash_keys.get(spec)
        if cached is None:
            cached = self._hash_keys[spec] = spec.read()
        return cached

    # -- lifecycle

    @property
    def over_limit(self) -> bool:
        return len(self.connections) > self.config.max_client_connections

    def _rules_reloaded(self, ok: bool, detail: str) -> None:
        """Gated sessions come back from the relay thread: their approvals were made under
        the rules that were in force, and the next statement is judged under the new ones."""
        if ok:
            for conn in list(self.connections):
                conn.ungate()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.relay = relays.Relay.create(loop)
        if self.relay is not None:
            self.rules.on_reload.append(self._rules_reloaded)
        reuse = self.config.workers > 1
        # Metrics and health first: once clients are accepted, /readyz and /metrics answer.
        if self.config.metrics_listen is not None:
            ma = self.config.metrics_listen
            self.http = await start_http(ma.host, ma.port, self.ready, reuse_port=reuse)
        for addr in self.config.listen:
            if addr.path:
                server = await loop.create_unix_server(lambda: _ClientPipe(self), addr.path)
            else:
                server = await loop.create_server(
                    lambda: _ClientPipe(self),
                    addr.host,
                    addr.port,
                    reuse_port=reuse or None,
                    backlog=4096,
                )
            self.servers.append(server)
        self._sweeper = spawn(self._sweep(), name="topeng-sweeper")

    @property
    def ports(self) -> list[int]:
        out = []
        for server in self.servers:
            for sock in server.sockets:
                name = sock.getsockname()
                if isinstance(name, tuple):
                    out.append(int(name[1]))
        return out

    async def ready(self) -> tuple[bool, str]:
        if self.shutting_down:
            return False, "shutting down"
        try:
            pipe = await self._connect_raw()
        except (OSError, TimeoutError) as exc:
            return False, f"upstream unreachable: {exc}"
        pipe.close()
        return True, "ready"

    def accept(self, pipe: _ClientPipe) -> None:
        if self.shutting_down:
            pipe.abort()
            return
        conn = Connection(self, pipe)
        self.connections.add(conn)
        metrics.CLIENT_CONNECTIONS.set(len(self.connections))
        spawn(conn.run())

    def forget(self, conn: Connection) -> None:
        self.connections.discard(conn)
        metrics.CLIENT_CONNECTIONS.set(len(self.connections))
        if self.shutting_down and not self.connections:
            self._stopped.set()

    async def _sweep(self) -> None:
        """A few times a second: statement timeouts, idle timeouts, metrics, and during
        shutdown, closing sessions once idle."""
        ticks = 0
        while True:
            await asyncio.sleep(0.25 if not self.shutting_down else 0.1)
            ticks += 1
            tally.flush_all()
            now = time.monotonic()
            idle_limit = self.config.idle_timeout
            for conn in list(self.connections):
                session = conn.session
                if session is None or session.phase is not Phase.READY:
                    continue
                policy = session.policy
                if policy is not None and policy.statement_timeout:
                    conn.check_statement_timeout(policy.statement_timeout)
                if conn.relayed and (ticks % 4 == 0 or self.shutting_down or idle_limit):
                    conn.sync_relay()
                if self.shutting_down:
                    conn.ungate()  # (the session does not know whether it is idle)
                if ticks % 4 == 0:
                    conn.flush_metrics()
                if self.shutting_down and session.idle:
                    conn.close_for(
                        ADMIN_SHUTDOWN, "terminating connection due to administrator command"
                    )
                elif (
                    idle_limit
                    and now - conn.last_activity > idle_limit
                    and session.quiet
                    and not conn.gate_busy
                ):
                    conn.close_for(
                        IDLE_SESSION_TIMEOUT, "terminating connection due to idle-session timeout"
                    )

    async def shutdown(self, grace: float) -> None:
        """Stop accepting; let sessions finish their transaction for `grace` seconds; close."""
        if self.shutting_down:
            return
        self.shutting_down = True
        log.info("shutting down: %d sessions, grace %.0fs", len(self.connections), grace)
        for server in self.servers:
            server.close()
        if self.http is not None:
            self.http.close()
        if self.connections and grace > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), timeout=grace)
        for conn in list(self.connections):
            conn.close_for(ADMIN_SHUTDOWN, "terminating connection due to administrator command")
        if self._sweeper is not None:
            self._sweeper.cancel()
        for limiter in self.limiters.values():
            limiter.close()
        if self.relay is not None:
            self.relay.close()
        tally.flush_all()
        for server in self.servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()

    # -- upstream

    async def _connect_raw(self) -> Pipe:
        loop = asyncio.get_running_loop()
        addr = self.config.upstream
        timeout = self.config.connect_timeout or None
        async with asyncio.timeout(timeout):
            if addr.path:
                _, pipe = await loop.create_unix_connection(Pipe, addr.path)
            else:
                _, pipe = await loop.create_connection(Pipe, addr.host, addr.port)
        transport = pipe.transport
        if transport is not None and not addr.path:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return pipe

    async def open_upstream(self) -> Pipe:
        pipe = await self._connect_raw()
        ctx = self.upstream_ssl
        if ctx is None:
            return pipe
        try:
            async with asyncio.timeout(self.config.connect_timeout or None):
                pipe.write(SSL_REQUEST)
                answer = await pipe.read()
                if answer[:1] == b"S" and len(answer) == 1:
                    loop = asyncio.get_running_loop()
                    assert pipe.transport is not None
                    host = self.config.upstream.host
                    new = await loop.start_tls(
                        pipe.transport,
                        pipe,
                        ctx,
                        server_hostname=host if ctx.check_hostname else None,
                    )
                    pipe.transport = new
                    return pipe
                if answer[:1] == b"N" and self.config.upstream_tls == "prefer":
                    return pipe
        except BaseException:
            pipe.abort()
            raise
        pipe.abort()
        raise UpstreamRefused("the server does not accept TLS, and upstream_tls requires it")

    async def forward_cancel(self, request: CancelRequest) -> None:
        """Pass a client's CancelRequest to the server, as PostgreSQL itself would get it."""
        try:
            pipe = await self._connect_raw()
        except (OSError, TimeoutError) as exc:
            metrics.UPSTREAM_ERRORS.labels("cancel").inc()
            log.info("could not forward a cancel request: %s", exc)
            return
        pipe.write(request.encode())
        # The server closes the connection without a reply once it has read the request.
        with contextlib.suppress(TimeoutError, OSError):
            async with asyncio.timeout(5):
                while await pipe.read():
                    pass
        pipe.close()


def install_signal_handlers(
    proxy: Proxy, on_reload: Callable[[], None], stop: asyncio.Event
) -> None:
    loop = asyncio.get_running_loop()

    def graceful() -> None:
        log.info("SIGTERM: finishing sessions, then stopping")
        spawn(_stop(proxy, proxy.config.shutdown_grace, stop))

    def immediate() -> None:
        log.info("SIGINT: stopping now")
        spawn(_stop(proxy, 0.0, stop))

    loop.add_signal_handler(signal.SIGTERM, graceful)
    loop.add_signal_handler(signal.SIGINT, immediate)
    loop.add_signal_handler(signal.SIGHUP, on_reload)


async def _stop(proxy: Proxy, grace: float, stop: asyncio.Event) -> None:
    await proxy.shutdown(grace)
    stop.set()


async def serve(config: Config, rules: RulesStore) -> None:
    """Run one worker until SIGTERM or SIGINT."""
    audit = open_audit_log(config.audit_log)
    proxy = Proxy(config, rules, audit=audit)
    if audit is not None:
        rules.on_reload.append(audit.rules_reload)
    await proxy.start()
    stop = asyncio.Event()

    def on_hangup() -> None:
        log.info("SIGHUP: reloading the rules and reopening the audit log")
        if audit is not None:
            audit.reopen()
        rules.request_reload()

    install_signal_handlers(proxy, on_hangup, stop)
    watcher = spawn(rules.watch(), name="topeng-rules-watch")
    log.info(
        "topeng listening on %s, upstream %s, rules %s",
        ", ".join(str(a) for a in config.listen),
        config.upstream,
        config.rules,
    )
    if not relays.AVAILABLE:
        log.warning(
            "the C relay (proxy._relay) is not built or TOPENG_PURE_PYTHON is set: unrestricted"
            " sessions are relayed in the event loop, with more CPU per message"
        )
    if not fastmask.AVAILABLE:
        log.warning(
            "the C masking loop (proxy.policy._splice) is not built or TOPENG_PURE_PYTHON is set:"
            " masking in Python, the same output at several times the CPU per masked row"
        )
    await stop.wait()
    watcher.cancel()
    if audit is not None:
        audit.close()
