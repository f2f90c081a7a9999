"""Rate limits per user: rows a minute and an hour, statements a minute, lookups a minute.

Strategy: every limit is a *sliding window counter*. Usage is counted in fixed windows (minute
`n` is the wall-clock interval [60n, 60n+60)), and a check estimates the usage of the last
window length ending now as `current + previous * (1 - elapsed fraction of current)`. This is
the approximation nginx, Cloudflare and redis-cell use: two integers per key and window, no
per-event bookkeeping, no burst of twice the limit at a window boundary (which a plain fixed
window allows). A refused charge tells the caller how many seconds until the same charge would
fit (`Exhausted.retry_after`), assuming nothing else is charged meanwhile.

Counters are keyed by *user* (the PostgreSQL user name), not by session: every session of a
user draws on one budget. The limit values themselves are not stored: each check passes the
limit of the user's role, so a rules reload takes effect at once.

Holds: a session the relay thread runs on its own (the gate, proxy/relay.py) cannot ask the
limiter per statement, so its policy charges a share of the user's budget *ahead*, to the
window in force (`Limiter.slot`, `charge`), lets the thread spend it until that window ends,
and gives back what is left when the session returns (`charge` with a negative amount, to the
same slot). The usage that stays charged is then what was used, in the window it was used in.
Meanwhile the unused rest counts as used for the user's other sessions, which is stricter than
needed: so a check that fails asks the holders of that key in this process to give their holds
back (`hold`, `reclaim`) and checks again. Holds in other processes (Redis) are not reclaimed;
they are small (see RestrictedPolicy.reserve_gate).

Backends:

- `MemoryStore` (default): counters in this process. With `--workers N` each worker counts
  for itself; use Redis to share.
- `RedisStore` (`limits: {backend: redis://host:6379/0}` in the rules): the session path is
  synchronous, so checks never wait for Redis. Each process keeps its unsynced local deltas
  and the global totals it last saw; a background task (`Limiter.run`, every 200 ms) adds the
  deltas into per-window keys with INCRBY (+ EXPIRE), and reads the totals of the windows in
  use back. A check uses `global last seen + local unsynced`. If Redis is unreachable the
  same numbers keep being enforced locally (the last global totals plus this process's own
  usage: limited, never unlimited); the transition is logged and `topeng_limits_backend_up`
  drops to 0. When Redis is back, the deltas counted meanwhile are pushed and the totals read
  again. Between two syncs several processes may together overshoot a limit by what they
  charge within ~200 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

from pglast import parser as pg_parser
from prometheus_client import Counter, Gauge

from proxy.observe.metrics import REGISTRY
from proxy.policy.decision import FEATURE_NOT_SUPPORTED, Refuse

if TYPE_CHECKING:
    from proxy.policy.analyze import StatementFacts
    from proxy.policy.rules import Rules

__all__ = [
    "HOUR",
    "MINUTE",
    "Exhausted",
    "Limiter",
    "MemoryStore",
    "RedisStore",
    "count_lookups",
    "counts_as_query",
    "lookup_limits",
    "make_limiter",
    "reads_rows",
]

log = logging.getLogger("topeng.limits")

MINUTE: Final = 60
HOUR: Final = 3600
SYNC_INTERVAL: Final = 0.2
MAX_BACKOFF: Final = 2.0
KEY_PREFIX: Final = "topeng:rl:"

BACKEND_UP = Gauge(
    "topeng_limits_backend_up",
    "1 when the shared rate-limit backend (Redis) is reachable; 0 while limits are applied "
    "locally only. Always 1 for the in-memory backend.",
    registry=REGISTRY,
    multiprocess_mode="min",
)
BACKEND_ERRORS = Counter(
    "topeng_limits_backend_errors",
    "Failed synchronisations with the shared rate-limit backend.",
    registry=REGISTRY,
)

Clock = Callable[[], float]
_Slot = tuple[str, int, int]  # (key, window seconds, window index)


@dataclass(frozen=True, slots=True)
class Exhausted:
    """A charge that does not fit: `retry_after` seconds until it would (rounded up, >= 1)."""

    limit: int
    window: int
    used: int
    retry_after: int


class CounterStore(Protocol):
    """Counts per (key, window, window index); `get` includes everything counted locally."""

    name: str

    def get(self, slot: _Slot) -> int: ...

    def add(self, slot: _Slot, amount: int) -> None: ...

    async def run(self) -> None: ...

    def close(self) -> None: ...


class MemoryStore:
    """Counters in this process; old windows are forgotten as new ones start."""

    name = "memory"

    def __init__(self) -> None:
        self._counts: dict[_Slot, int] = {}
        self._adds = 0

    def get(self, slot: _Slot) -> int:
        return self._counts.get(slot, 0)

    def add(self, slot: _Slot, amount: int) -> None:
        self._counts[slot] = self._counts.get(slot, 0) + amount
        self._adds += 1
        if self._adds % 1024 == 0:
            self._prune()

    def _prune(self) -> None:
        now = time.time()
        stale = [s for s in self._counts if (s[2] + 2) * s[1] < now]
        for slot in stale:
            del self._counts[slot]

    async def run(self) -> None:
        BACKEND_UP.set(1)

    def close(self) -> None:
        pass


class RedisStore:
    """Local deltas + last-seen global totals, synchronised with Redis in the background."""

    name = "redis"

    def __init__(
        self, url: str, *, interval: float = SYNC_INTERVAL, clock: Clock = time.time
    ) -> None:
        self.url = url
        self.interval = interval
        self.clock = clock
        self._pending: dict[_Slot, int] = {}
        self._global: dict[_Slot, int] = {}
        self._seen: dict[_Slot, float] = {}  # slots read recently: their totals are refreshed
        self.up: bool | None = None  # None until the first sync
        self._closed = False
        self._wake = asyncio.Event()
        self.syncs = 0

    def get(self, slot: _Slot) -> int:
        self._seen[slot] = self.clock()
        return self._global.get(slot, 0) + self._pending.get(slot, 0)

    def add(self, slot: _Slot, amount: int) -> None:
        self._pending[slot] = self._pending.get(slot, 0) + amount
        self._seen[slot] = self.clock()

    def close(self) -> None:
        self._closed = True
        self._wake.set()

    async def run(self) -> None:
        import redis.asyncio as aioredis  # imported here: only Redis deployments need it

        client = aioredis.Redis.from_url(
            self.url, socket_connect_timeout=1.0, socket_timeout=1.0, health_check_interval=5
        )
        delay = self.interval
        try:
            while not self._closed:
                try:
                    await self.sync_once(client)
                except Exception as exc:  # noqa: BLE001 - any failure: keep limiting locally
                    BACKEND_ERRORS.inc()
                    if self.up is not False:
                        log.warning(
                            "rate limits: Redis at %s is unreachable (%s); applying limits "
                            "locally in this process until it is back",
                            _safe_url(self.url),
                            exc,
                        )
                    self.up = False
                    BACKEND_UP.set(0)
                    delay = min(MAX_BACKOFF, delay * 2)
                else:
                    if self.up is not True:
                        log.warning(
                            "rate limits: Redis at %s is reachable; limits are shared",
                            _safe_url(self.url),
                        )
                    self.up = True
                    BACKEND_UP.set(1)
                    delay = self.interval
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=delay)
            # a last push so that what this process counted is not lost to the others
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.sync_once(client), timeout=1.0)
        finally:
            with contextlib.suppress(Exception):
                await client.aclose()

    async def sync_once(self, client: Any) -> None:
        """Push the local deltas, read back the totals of the slots in use."""
        now = self.clock()
        for slot in [s for s, t in self._seen.items() if now - t > 2 * s[1]]:
            self._seen.pop(slot, None)
            self._global.pop(slot, None)
        for slot in [s for s in self._global if (s[2] + 2) * s[1] < now]:
            self._global.pop(slot, None)
        pushed = dict(self._pending)
        slots = sorted(set(pushed) | set(self._seen))
        if not slots:
            await client.ping()
            self.syncs += 1
            return
        pipe = client.pipeline(transaction=False)
        for slot in slots:
            key = _redis_key(slot)
            delta = pushed.get(slot, 0)
            if delta:
                pipe.incrby(key, delta)
                pipe.expire(key, 2 * slot[1] + 60)
            else:
                pipe.get(key)
        replies = await pipe.execute()
        # Only now are the pushed deltas part of the global totals: charges made while the
        # pipeline ran stay pending.
        for slot, delta in pushed.items():
            left = self._pending.get(slot, 0) - delta
            if left:
                self._pending[slot] = left
            else:
                self._pending.pop(slot, None)
        index = 0
        for slot in slots:
            reply = replies[index]
            index += 2 if pushed.get(slot, 0) else 1
            self._global[slot] = int(reply) if reply is not None else 0  # bytes or int
        self.syncs += 1


def _redis_key(slot: _Slot) -> str:
    key, window, index = slot
    return f"{KEY_PREFIX}{key}:{window}:{index}"


def _safe_url(url: str) -> str:
    """The URL without a password, for logs."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"


class Limiter:
    """Sliding-window counters over a store. Not thread-safe: one per event loop."""

    def __init__(self, store: CounterStore | None = None, *, clock: Clock = time.time) -> None:
        self.store: CounterStore = store if store is not None else MemoryStore()
        self.clock = clock
        # key -> the releases of the holds on its budget (see the module's docstring)
        self._holders: dict[str, dict[Callable[[], None], None]] = {}

    @property
    def backend(self) -> str:
        return self.store.name

    def _parts(self, key: str, window: int) -> tuple[int, int, float]:
        now = self.clock()
        index = math.floor(now / window)
        current = self.store.get((key, window, index))
        previous = self.store.get((key, window, index - 1))
        elapsed = (now - index * window) / window
        return current, previous, elapsed

    def used(self, key: str, window: int) -> int:
        """The estimated usage of the last `window` seconds (rounded up)."""
        current, previous, elapsed = self._parts(key, window)
        return math.ceil(current + previous * (1.0 - elapsed) - 1e-9)

    def remaining(self, key: str, limit: int, window: int) -> int:
        return max(0, limit - self.used(key, window))

    def check(self, key: str, limit: int, window: int, amount: int = 1) -> Exhausted | None:
        """None if `amount` more fits under `limit` now; else when it would."""
        current, previous, elapsed = self._parts(key, window)
        estimate = current + previous * (1.0 - elapsed)
        if estimate + amount <= limit + 1e-9:
            return None
        return Exhausted(
            limit,
            window,
            math.ceil(estimate),
            self._retry(current, previous, elapsed, limit, window, amount),
        )

    @staticmethod
    def _retry(
        current: int, previous: int, elapsed: float, limit: int, window: int, amount: int
    ) -> int:
        if amount > limit:
            return window  # never fits; say "a window from now" rather than forever
        room = limit - amount
        if current > room:
            # wait for the next window; then `current` decays as the previous window
            to_next = (1.0 - elapsed) * window
            fraction = 1.0 - room / current
            seconds = to_next + fraction * window
        else:
            # `previous` must decay enough: previous * (1 - f) <= room - current
            fraction = 1.0 - (room - current) / previous if previous else 0.0
            seconds = max(0.0, (fraction - elapsed) * window)
        return max(1, math.ceil(seconds))

    def add(self, key: str, window: int, amount: int) -> None:
        if amount > 0:
            self.store.add((key, window, math.floor(self.clock() / window)), amount)

    def slot(self, key: str, window: int) -> _Slot:
        """The counter `key` charges in the window of this length in force now."""
        return key, window, math.floor(self.clock() / window)

    def charge(self, slot: _Slot, amount: int) -> None:
        """Adds `amount` to one counter (negative: gives back part of a hold charged to it)."""
        if amount:
            self.store.add(slot, amount)

    def seconds_left(self, window: int) -> float:
        """Seconds until the window of this length in force now ends."""
        now = self.clock()
        return (math.floor(now / window) + 1) * window - now

    def hold(self, key: str, release: Callable[[], None]) -> None:
        """Someone holds part of `key`'s budget and gives it back when `release` is called
        (which must `unhold`)."""
        self._holders.setdefault(key, {})[release] = None

    def unhold(self, key: str, release: Callable[[], None]) -> None:
        holders = self._holders.get(key)
        if holders is not None:
            holders.pop(release, None)
            if not holders:
                del self._holders[key]

    def reclaim(self, key: str) -> bool:
        """Asks every holder of part of `key`'s budget to give it back; whether any held."""
        holders = self._holders.pop(key, None)
        if not holders:
            return False
        for release in list(holders):
            release()
        return True

    def held(self, key: str) -> bool:
        return key in self._holders

    def take(self, key: str, limit: int, window: int, amount: int = 1) -> Exhausted | None:
        """`check`, and charge when it fits."""
        refused = self.check(key, limit, window, amount)
        if refused is None:
            self.add(key, window, amount)
        return refused

    async def run(self) -> None:
        """Background work of the store: returns at once for memory, syncs Redis until
        `close()`. Spawn it once per process (and again after a rules reload that changes
        the backend, with a new Limiter)."""
        await self.store.run()

    def close(self) -> None:
        self.store.close()


def make_limiter(rules: Rules | str) -> Limiter:
    """The limiter for the rules' `limits.backend` (or a backend string)."""
    backend = rules if isinstance(rules, str) else rules.limits_backend
    if backend == "memory":
        return Limiter(MemoryStore())
    return Limiter(RedisStore(backend))


# -- what a statement charges -----------------------------------------------------------------

_QUERY_KINDS: Final = frozenset(
    {"select", "insert", "update", "delete", "merge", "copy_in", "copy_out", "call", "do"}
)
_QUERY_NODES: Final = frozenset({"ExecuteStmt", "FetchStmt", "ExplainStmt"})
_READ_NODES: Final = frozenset({"SelectStmt", "ExecuteStmt", "FetchStmt", "CopyStmt"})


def counts_as_query(facts: StatementFacts) -> bool:
    """Statements that make the server work count against max_queries_per_minute: queries,
    COPY, CALL, DO, EXPLAIN, EXECUTE, FETCH; BEGIN, SET, SHOW, PREPARE, DECLARE, CLOSE,
    DEALLOCATE do not."""
    return facts.kind in _QUERY_KINDS or facts.node in _QUERY_NODES


def reads_rows(facts: StatementFacts) -> bool:
    """Statements that return rows: refused up front when a row budget is used up."""
    return facts.node in _READ_NODES or facts.kind == "select"


def lookup_limits(rules: Rules, role_name: object) -> dict[str, int]:
    """label -> max_lookups_per_minute of the labels the role masks with such a limit."""
    name = getattr(role_name, "name", role_name)
    out: dict[str, int] = {}
    for label in rules.labels:
        policy = rules.policy_for(str(name), label.name)
        if policy.kind == "mask" and policy.max_lookups_per_minute:
            out[label.name] = policy.max_lookups_per_minute
    return out


def _effective(facts: StatementFacts) -> StatementFacts:
    """The query a PREPARE / DECLARE / EXPLAIN / COPY runs: its lookups are the statement's."""
    depth = 0
    while facts.inner is not None and depth < 4:
        facts = facts.inner
        depth += 1
    return facts


def count_lookups(
    facts: StatementFacts, rules: Rules, limited: Mapping[str, int], text: Callable[[], str]
) -> dict[str, int] | Refuse:
    """label -> lookups the statement makes on columns of the `limited` labels.

    A lookup is an equality use of the column in WHERE / HAVING / ON (the analysis' `equality`
    form: `= const`, `= $n`, `IN (...)`, `= ANY(ARRAY[...])`, `IS NULL`). The analysis is
    cached by fingerprint, which ignores constants and collapses IN lists, so the values are
    counted on this statement's own text: each value of an IN list or ARRAY[...] is one
    lookup, at least one per statement. `= ANY(<array parameter or literal>)` has a count not
    known when the statement is judged, so it is refused for these labels. `text` gives the
    statement's own text (facts found by fingerprint carry the text first seen).
    """
    query = _effective(facts)
    columns: dict[str, set[str]] = {}
    for use in query.uses:
        if use.form != "equality" or use.clause not in ("where", "having", "join"):
            continue
        info = query.info(use.column[0])
        name = None if info is None else info.column_name(use.column[1])
        if info is None or name is None:
            continue
        for label in rules.labels_for_column(info.label_schema, info.label_name, name):
            if label in limited:
                columns.setdefault(label, set()).add(name)
    if not columns:
        return {}
    counts = value_counts(text(), {n for names in columns.values() for n in names})
    if isinstance(counts, str):
        column = counts
        label = next(lb for lb, names in columns.items() if column in names)
        return Refuse(
            FEATURE_NOT_SUPPORTED,
            f"topeng: {column} = ANY(array) is not permitted for label {label}, which has "
            "max_lookups_per_minute",
            detail="the number of values looked up is not known until the statement runs",
            hint=f"list the values: {column} IN ('...', '...'), or run {column} = $1 once per "
            "value",
            reason="lookup_limit",
        )
    return {
        label: max(1, sum(counts.get(name, 0) for name in names))
        for label, names in columns.items()
    }


def value_counts(sql: str, names: set[str]) -> dict[str, int] | str:
    """Values compared by `=`, `IN` and `= ANY(ARRAY[...])` with each named column (matched by
    the last part of its name); the column's name when an `= ANY` array has unknown length."""
    try:
        doc = json.loads(pg_parser.parse_sql_json(sql))
    except pg_parser.ParseError:
        return {}
    counts: dict[str, int] = {}
    stack: list[object] = [doc]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
            continue
        if not isinstance(item, dict):
            continue
        expr = item.get("A_Expr")
        if isinstance(expr, dict):
            found = _lookup_in(expr, names)
            if isinstance(found, str):
                return found
            if found is not None:
                counts[found[0]] = counts.get(found[0], 0) + found[1]
        stack.extend(v for v in item.values() if isinstance(v, dict | list))
    return counts


def _column_name(node: object) -> str | None:
    while isinstance(node, dict) and "TypeCast" in node:
        node = node["TypeCast"].get("arg")
    if not isinstance(node, dict) or "ColumnRef" not in node:
        return None
    fields = node["ColumnRef"].get("fields") or []
    last = fields[-1] if fields else None
    if isinstance(last, dict) and "String" in last:
        return str(last["String"].get("sval", ""))
    return None


def _lookup_in(expr: dict[str, Any], names: set[str]) -> tuple[str, int] | str | None:
    op = [n["String"].get("sval") for n in expr.get("name") or [] if "String" in n]
    if op[-1:] != ["="]:
        return None
    kind = expr.get("kind")
    left, right = expr.get("lexpr"), expr.get("rexpr")
    name = _column_name(left)
    if kind == "AEXPR_OP":
        other = _column_name(right)
        if name in names:
            return str(name), 1
        if other in names:
            return str(other), 1
        return None
    if name is None or name not in names:
        return None
    if kind == "AEXPR_IN":
        items = right.get("List", {}).get("items") if isinstance(right, dict) else right
        return name, len(items) if isinstance(items, list) else 1
    if kind == "AEXPR_OP_ANY":
        inner = right
        while isinstance(inner, dict) and "TypeCast" in inner:
            inner = inner["TypeCast"].get("arg")
        if isinstance(inner, dict) and "A_ArrayExpr" in inner:
            return name, len(inner["A_ArrayExpr"].get("elements") or [])
        return name
    return None
