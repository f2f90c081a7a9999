"""Every metric Topeng exports: name, type, help text and labels in one place.

Labels stay low-cardinality: roles, decisions, reasons, labels, results. Never user names,
query text or addresses.

With `--workers N` the values live in prometheus_client's multiprocess files (see
proxy.observe.multiproc): counters and histograms are summed over the workers, and every gauge
says how with `multiprocess_mode` (ignored by a single process).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_ANALYSIS_BUCKETS = (0.00001, 0.00003, 0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1)

CLIENT_CONNECTIONS = Gauge(
    "topeng_client_connections",
    "Client connections open now.",
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
CONNECTIONS = Counter(
    "topeng_connections",
    "Client connections by how they ended or were refused at startup.",
    ["result"],
    registry=REGISTRY,
)
SESSIONS_BY_ROLE = Gauge(
    "topeng_sessions",
    "Authenticated sessions open now, by role.",
    ["role"],
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
QUERIES = Counter(
    "topeng_queries",
    "Statements judged, by role and decision (allowed, masked, refused).",
    ["role", "decision"],
    registry=REGISTRY,
)
REFUSALS = Counter(
    "topeng_refusals", "Refusals by role and reason.", ["role", "reason"], registry=REGISTRY
)
MASKED_VALUES = Counter(
    "topeng_masked_values",
    "Values masked, by role and label.",
    ["role", "label"],
    registry=REGISTRY,
)
ROWS = Counter("topeng_rows", "Result rows sent to clients, by role.", ["role"], registry=REGISTRY)
BYTES = Counter(
    "topeng_bytes",
    "Bytes relayed, by direction (in: from clients, out: to clients).",
    ["direction"],
    registry=REGISTRY,
)
QUERY_DURATION = Histogram(
    "topeng_query_duration_seconds",
    "Time from a statement to its result's end, by role.",
    ["role"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
ANALYSIS_DURATION = Histogram(
    "topeng_analysis_duration_seconds",
    "Time to analyse one statement (cache misses included).",
    buckets=_ANALYSIS_BUCKETS,
    registry=REGISTRY,
)
ANALYSIS_CACHE = Counter(
    "topeng_analysis_cache",
    "Analysis cache lookups by result (hit, miss).",
    ["result"],
    registry=REGISTRY,
)
ANALYSIS_CACHE_SIZE = Gauge(
    "topeng_analysis_cache_entries",
    "Statements in the analysis cache (summed over the worker processes).",
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
RULES_RELOADS = Counter(
    "topeng_rules_reloads", "Rules reloads by result (ok, error).", ["result"], registry=REGISTRY
)
RULES_LAST_RELOAD_SUCCESS = Gauge(
    "topeng_rules_last_reload_success",
    "1 if the last rules load succeeded, else 0 (with workers: 0 if any worker's failed).",
    registry=REGISTRY,
    multiprocess_mode="livemin",
)
UPSTREAM_ERRORS = Counter(
    "topeng_upstream_errors",
    "Failures talking to the server, by kind.",
    ["kind"],
    registry=REGISTRY,
)
UPSTREAM_CONNECT_DURATION = Histogram(
    "topeng_upstream_connect_duration_seconds",
    "Time to connect to the server (TLS included).",
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
TLS_HANDSHAKES = Counter(
    "topeng_tls_handshakes", "Client TLS handshakes by result.", ["result"], registry=REGISTRY
)
RELAY_HANDOVERS = Counter(
    "topeng_relay_handovers",
    "Times an unrestricted session was handed to the C relay thread.",
    registry=REGISTRY,
)
RELAY_HANDBACKS = Counter(
    "topeng_relay_handbacks",
    "Times the relay thread handed a session back, by reason (chunk: a message that needs"
    " Python; closed; write_error; recalled: Topeng took it back).",
    ["reason"],
    registry=REGISTRY,
)
BUILD_INFO = Gauge(
    "topeng_build_info",
    "Always 1; the version of the running Topeng.",
    ["version"],
    registry=REGISTRY,
    multiprocess_mode="livemax",
)


def _initialise() -> None:
    """Create the series whose label values are known up front, at 0.

    A counter that has never been incremented has no series, and `rate()` over a missing series
    is an empty result rather than 0: alerts and dashboard panels would show "no data" instead
    of "none yet".
    """
    from proxy import __version__

    BUILD_INFO.labels(__version__).set(1)
    for result in ("hit", "miss"):
        ANALYSIS_CACHE.labels(result)
    for result in ("ok", "error"):
        RULES_RELOADS.labels(result)
    for direction in ("in", "out"):
        BYTES.labels(direction)
    for kind in ("connect", "lost", "protocol", "cancel"):
        UPSTREAM_ERRORS.labels(kind)
    for result in ("ok", "error"):
        TLS_HANDSHAKES.labels(result)
    for reason in ("chunk", "closed", "write_error", "recalled"):
        RELAY_HANDBACKS.labels(reason)


_initialise()


def metric_names() -> set[str]:
    """Every series name this registry can export (`_total`, `_bucket`, ... included)."""
    names: set[str] = set()
    for family in REGISTRY.collect():
        names.add(family.name)
        if family.type == "counter":
            names.update({family.name + "_total", family.name + "_created"})
        elif family.type == "histogram":
            for suffix in ("_bucket", "_count", "_sum", "_created"):
                names.add(family.name + suffix)
        elif family.type == "info":
            names.add(family.name + "_info")
    return names
