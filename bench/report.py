"""The pure half of the benchmark: measures, targets, medians, ratios, tables and markdown.

Nothing here starts a process or opens a socket, so all of it is unit-tested
(tests/unit/test_bench_report.py). A run produces `Results`; `summarize` turns them into `Row`s,
one per measure, each with its medians, its ratios round by round and its verdict against the
targets of issue 7; `text_table` and `markdown` render the rows.

A ratio is always taken within one round (Topeng's run against the pgbouncer or direct run just
before it), then the median over rounds is the headline: the interleaving exists so that drift of
a busy machine hits the three alike, and pairing by round keeps that benefit.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "BEGIN_MARK",
    "END_MARK",
    "LIMITS",
    "MEASURES",
    "SERVERS",
    "AnalysisQueryResult",
    "LimitTarget",
    "Measure",
    "MemoryResult",
    "cpu_lines",
    "PgbenchOutput",
    "RatioTarget",
    "Results",
    "Row",
    "fmt_number",
    "markdown",
    "median",
    "parse_pgbench",
    "ratio_per_round",
    "splice",
    "summarize",
    "text_table",
]

Server = Literal["direct", "pgbouncer", "topeng"]
SERVERS: tuple[Server, ...] = ("direct", "pgbouncer", "topeng")
SERVER_TITLES: Mapping[Server, str] = {
    "direct": "direct",
    "pgbouncer": "pgbouncer",
    "topeng": "Topeng",
}

BEGIN_MARK = "<!-- bench:results:begin (written by `make bench`; edits here are overwritten) -->"
END_MARK = "<!-- bench:results:end -->"

STREAM_ROWS = 100_000


@dataclass(frozen=True, slots=True)
class RatioTarget:
    """Topeng / `baseline` of a measure must be at least `minimum`."""

    baseline: Literal["pgbouncer", "direct"]
    minimum: float


@dataclass(frozen=True, slots=True)
class Measure:
    """One pgbench workload, run against each server every round."""

    key: str
    label: str  # for tables
    short: str  # for the chart (upper case, few characters)
    unit: Literal["TPS", "rows/s"]
    clients: int
    protocol: Literal["simple", "prepared"]
    user: Literal["unrestricted", "restricted"]
    script: Literal["select-only", "stream"]
    target: RatioTarget | None = None

    @property
    def per_transaction(self) -> float:
        """Factor from pgbench's TPS to this measure's unit."""
        return float(STREAM_ROWS) if self.unit == "rows/s" else 1.0


def _select_only(
    clients: int,
    protocol: Literal["simple", "prepared"],
    user: Literal["unrestricted", "restricted"],
    target: RatioTarget | None,
) -> Measure:
    who = "unrestricted" if user == "unrestricted" else "restricted (analysed)"
    tag = "UNRESTR." if user == "unrestricted" else "RESTR."
    plural = "client" if clients == 1 else "clients"
    return Measure(
        key=f"select-{clients}c-{protocol}-{user}",
        label=f"pgbench -S, {clients} {plural}, {protocol}, {who}",
        short=f"-S {clients}C {protocol.upper()} {tag}",
        unit="TPS",
        clients=clients,
        protocol=protocol,
        user=user,
        script="select-only",
        target=target,
    )


#: Every pgbench workload, in the order each round runs them. The targets are issue 7's; where
#: the issue names no protocol, both protocols must meet it.
MEASURES: tuple[Measure, ...] = (
    _select_only(16, "simple", "unrestricted", RatioTarget("pgbouncer", 1.0)),
    _select_only(16, "prepared", "unrestricted", RatioTarget("pgbouncer", 1.0)),
    _select_only(1, "simple", "unrestricted", None),
    _select_only(1, "prepared", "unrestricted", None),
    _select_only(16, "simple", "restricted", RatioTarget("pgbouncer", 0.8)),
    _select_only(16, "prepared", "restricted", RatioTarget("pgbouncer", 0.8)),
    _select_only(1, "simple", "restricted", RatioTarget("pgbouncer", 0.9)),
    _select_only(1, "prepared", "restricted", RatioTarget("pgbouncer", 0.9)),
    Measure(
        key="stream-unmasked",
        label="100,000-row stream, unrestricted (unmasked)",
        short="100K ROWS UNMASKED",
        unit="rows/s",
        clients=1,
        protocol="simple",
        user="unrestricted",
        script="stream",
        target=RatioTarget("pgbouncer", 0.9),
    ),
    Measure(
        key="stream-masked",
        label="100,000-row stream, six of eight columns masked",
        short="100K ROWS 6/8 MASKED",
        unit="rows/s",
        clients=1,
        protocol="simple",
        user="restricted",
        script="stream",
        target=RatioTarget("direct", 0.5),
    ),
)


@dataclass(frozen=True, slots=True)
class LimitTarget:
    """A single number that must stay below `limit`."""

    key: str
    label: str
    unit: str
    limit: float


LIMITS: tuple[LimitTarget, ...] = (
    LimitTarget("analysis-hit", "analysis, cache hit (median per statement)", "us", 30.0),
    LimitTarget("analysis-miss", "analysis, cache miss (median per statement)", "us", 5000.0),
    LimitTarget("rss-1000", "Topeng RSS with 1,000 idle connections (unrestricted)", "MB", 150.0),
)


@dataclass(frozen=True, slots=True)
class AnalysisQueryResult:
    """Analysis cost of one typical agent query, in microseconds."""

    sql: str
    decision: str
    hit_us: float
    miss_us: float


@dataclass(frozen=True, slots=True)
class MemoryResult:
    """Topeng's resident memory before and after opening `connections` idle sessions."""

    who: str
    connections: int
    before_kb: int
    after_kb: int

    @property
    def per_connection_kb(self) -> float:
        if self.connections <= 0:
            return math.nan
        return (self.after_kb - self.before_kb) / self.connections


@dataclass
class Results:
    """Everything one run measured. `values[measure][server]` holds one value per round, None
    where that run failed (`errors` then says why)."""

    rounds: int
    duration: float
    values: dict[str, dict[str, list[float | None]]] = field(default_factory=dict)
    cpu_us: dict[str, dict[str, list[float | None]]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    analysis: list[AnalysisQueryResult] = field(default_factory=list)
    analysis_hit_samples: list[float] = field(default_factory=list)
    analysis_miss_samples: list[float] = field(default_factory=list)
    memory: list[MemoryResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def record(self, measure: str, server: str, round_index: int, value: float | None) -> None:
        per_server = self.values.setdefault(measure, {})
        series = per_server.setdefault(server, [None] * self.rounds)
        series[round_index] = value

    def record_cpu(self, measure: str, server: str, round_index: int, us: float | None) -> None:
        """CPU microseconds the proxy (`server`) spent per pgbench transaction in that run."""
        per_server = self.cpu_us.setdefault(measure, {})
        series = per_server.setdefault(server, [None] * self.rounds)
        series[round_index] = us


# -- numbers -----------------------------------------------------------------------------------


def median(values: Iterable[float | None]) -> float:
    """The median of the values that are present and finite; NaN when there are none."""
    present = [v for v in values if v is not None and math.isfinite(v)]
    if not present:
        return math.nan
    return float(statistics.median(present))


def ratio_per_round(
    numerator: Sequence[float | None], denominator: Sequence[float | None]
) -> list[float | None]:
    """numerator[i] / denominator[i] for each round; None where either is missing or zero."""
    ratios: list[float | None] = []
    for num, den in zip(numerator, denominator, strict=False):
        if num is None or den is None or den <= 0 or not math.isfinite(num + den):
            ratios.append(None)
        else:
            ratios.append(num / den)
    return ratios


@dataclass(frozen=True, slots=True)
class PgbenchOutput:
    tps: float
    transactions: int
    failed: int


_TPS = re.compile(r"^tps = ([0-9.]+) \((?:without initial connection time|excluding)", re.M)
_PROCESSED = re.compile(r"number of transactions actually processed: (\d+)")
_FAILED = re.compile(r"number of failed transactions: (\d+)")


def parse_pgbench(stdout: str) -> PgbenchOutput:
    """TPS (without connection time), transactions and failures from pgbench's report.

    ValueError if the report has no TPS line (pgbench failed before measuring).
    """
    tps = _TPS.search(stdout)
    if tps is None:
        raise ValueError("pgbench printed no `tps = ...` line")
    processed = _PROCESSED.search(stdout)
    failed = _FAILED.search(stdout)
    return PgbenchOutput(
        tps=float(tps.group(1)),
        transactions=int(processed.group(1)) if processed else 0,
        failed=int(failed.group(1)) if failed else 0,
    )


# -- rows --------------------------------------------------------------------------------------


Verdict = Literal["met", "NOT MET", "no data", ""]


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the results table."""

    label: str
    unit: str
    medians: Mapping[str, float]  # server -> median value (NaN if none)
    vs_pgbouncer: tuple[float | None, ...]  # Topeng / pgbouncer, round by round
    vs_direct: tuple[float | None, ...]
    target: str  # "Topeng/pgbouncer >= 1.0", "< 30 us", ""
    value: float  # what the target is judged on (a median ratio, or the scalar)
    verdict: Verdict
    short: str = ""
    target_baseline: str = ""  # "pgbouncer" | "direct" | ""
    target_value: float = math.nan

    @property
    def ratio_pgbouncer(self) -> float:
        return median(self.vs_pgbouncer)

    @property
    def ratio_direct(self) -> float:
        return median(self.vs_direct)


def _verdict(value: float, ok: bool) -> Verdict:
    if math.isnan(value):
        return "no data"
    return "met" if ok else "NOT MET"


def summarize(results: Results, measures: Sequence[Measure] = MEASURES) -> list[Row]:
    """A row per measure (ratios per round, medians, verdict), then a row per limit."""
    rows: list[Row] = []
    for measure in measures:
        per_server = results.values.get(measure.key)
        if per_server is None:
            continue
        series = {s: per_server.get(s, [None] * results.rounds) for s in SERVERS}
        vs_pgb = tuple(ratio_per_round(series["topeng"], series["pgbouncer"]))
        vs_direct = tuple(ratio_per_round(series["topeng"], series["direct"]))
        target_text, value = "", math.nan
        verdict: Verdict = ""
        baseline, threshold = "", math.nan
        if measure.target is not None:
            baseline, threshold = measure.target.baseline, measure.target.minimum
            value = median(vs_pgb if baseline == "pgbouncer" else vs_direct)
            target_text = f"Topeng/{baseline} >= {threshold:g}"
            verdict = _verdict(value, value >= threshold)
        rows.append(
            Row(
                label=measure.label,
                unit=measure.unit,
                medians={s: median(series[s]) for s in SERVERS},
                vs_pgbouncer=vs_pgb,
                vs_direct=vs_direct,
                target=target_text,
                value=value,
                verdict=verdict,
                short=measure.short,
                target_baseline=baseline,
                target_value=threshold,
            )
        )
    scalars = _scalars(results)
    for limit in LIMITS:
        value = scalars.get(limit.key, math.nan)
        rows.append(
            Row(
                label=limit.label,
                unit=limit.unit,
                medians={},
                vs_pgbouncer=(),
                vs_direct=(),
                target=f"< {fmt_number(limit.limit)} {limit.unit}",
                value=value,
                verdict=_verdict(value, value < limit.limit),
                target_value=limit.limit,
            )
        )
    return rows


def _scalars(results: Results) -> dict[str, float]:
    scalars = {
        "analysis-hit": median(results.analysis_hit_samples),
        "analysis-miss": median(results.analysis_miss_samples),
    }
    for mem in results.memory:
        if mem.who == "unrestricted":
            scalars["rss-1000"] = mem.after_kb / 1024
    return scalars


# -- rendering ---------------------------------------------------------------------------------


def fmt_number(value: float | None, digits: int = 0) -> str:
    """1234567.8 -> '1,234,568'; None/NaN -> '-'."""
    if value is None or math.isnan(value):
        return "-"
    if digits == 0 and abs(value) < 100 and value != int(value):
        digits = 1 if abs(value) >= 10 else 2
    return f"{value:,.{digits}f}"


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}"


def _rounds(ratios: Sequence[float | None]) -> str:
    if not ratios:
        return ""
    if len(ratios) == 1:
        return fmt_ratio(ratios[0])
    return f"{fmt_ratio(median(ratios))} ({', '.join(fmt_ratio(r) for r in ratios)})"


def _value_text(row: Row) -> str:
    if row.medians:
        return ""
    return f"{fmt_number(row.value)} {row.unit}"


def _cells(row: Row) -> list[str]:
    if row.medians:
        values = [fmt_number(row.medians.get(s)) for s in SERVERS]
    else:
        values = ["", "", _value_text(row)]
    return [
        row.label + (f" ({row.unit})" if row.medians else ""),
        *values,
        _rounds(row.vs_pgbouncer),
        _rounds(row.vs_direct),
        row.target,
        row.verdict,
    ]


HEADER = (
    "measure",
    "direct",
    "pgbouncer",
    "Topeng",
    "Topeng/pgbouncer (rounds)",
    "Topeng/direct (rounds)",
    "target",
    "verdict",
)


def text_table(rows: Sequence[Row]) -> str:
    """A fixed-width table for the terminal."""
    table = [list(HEADER), *(_cells(r) for r in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADER))]
    numeric = {1, 2, 3}
    lines = []
    for n, line in enumerate(table):
        cells = [
            c.rjust(widths[i]) if i in numeric and n else c.ljust(widths[i])
            for i, c in enumerate(line)
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_table(rows: Sequence[Row]) -> str:
    out = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for row in rows:
        cells = [_md_escape(c) for c in _cells(row)]
        if row.verdict == "NOT MET":
            cells[-1] = "**NOT MET**"
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def cpu_lines(results: Results, measures: Sequence[Measure] = MEASURES) -> list[list[str]]:
    """[label, pgbouncer us, Topeng us, ratio] for each measure with CPU readings."""
    lines = []
    for measure in measures:
        per_server = results.cpu_us.get(measure.key)
        if not per_server:
            continue
        bouncer = median(per_server.get("pgbouncer", []))
        topeng = median(per_server.get("topeng", []))
        ratio = topeng / bouncer if bouncer > 0 else math.nan
        lines.append(
            [measure.label, fmt_number(bouncer, 1), fmt_number(topeng, 1), fmt_ratio(ratio)]
        )
    return lines


def markdown(
    results: Results,
    rows: Sequence[Row],
    *,
    environment: Sequence[tuple[str, str]],
    chart_name: str | None,
    measures: Sequence[Measure] = MEASURES,
) -> str:
    """The generated section of docs/benchmarks.md (between the markers)."""
    met = sum(1 for r in rows if r.verdict == "met")
    judged = sum(1 for r in rows if r.verdict in ("met", "NOT MET"))
    missed = [r for r in rows if r.verdict == "NOT MET"]
    parts = [
        BEGIN_MARK,
        "## Latest run",
        "",
        "| | |",
        "|---|---|",
        *(f"| {_md_escape(k)} | {_md_escape(v)} |" for k, v in environment),
        "",
        f"Targets met: **{met} of {judged}**."
        + (
            " Not met: " + "; ".join(f"{r.label} ({_value_text_or_ratio(r)})" for r in missed) + "."
            if missed
            else ""
        ),
        "",
        "Medians over rounds; ratios are taken within each round (Topeng's run against the "
        "pgbouncer or direct run just before it) and the median of those is the headline, "
        "the rounds follow in brackets.",
        "",
        markdown_table(rows),
        "",
    ]
    if chart_name:
        parts += [f"![Topeng's ratios against pgbouncer and direct PostgreSQL]({chart_name})", ""]
    if results.cpu_us:
        parts += [
            "### CPU time of the proxy process per pgbench transaction",
            "",
            "User plus system time of the pgbouncer or Topeng process (from /proc) over a run, "
            "divided by the transactions pgbench completed; medians over rounds. Less sensitive "
            "to a busy machine than TPS. A stream transaction is 100,000 rows.",
            "",
            "| measure | pgbouncer (us) | Topeng (us) | Topeng/pgbouncer |",
            "|---|---|---|---|",
        ]
        for line in cpu_lines(results, measures):
            parts.append("| " + " | ".join(_md_escape(c) for c in line) + " |")
        parts.append("")
    if results.analysis:
        parts += [
            "### Analysis cost per statement (in-process, agent role of rules/bank.yaml)",
            "",
            "| statement | decision | hit (us) | miss (us) |",
            "|---|---|---|---|",
        ]
        for q in results.analysis:
            parts.append(
                f"| `{_md_escape(q.sql)}` | {q.decision} | {fmt_number(q.hit_us, 1)} "
                f"| {fmt_number(q.miss_us)} |"
            )
        parts.append("")
    if results.memory:
        parts += [
            "### Memory: Topeng's RSS with idle client connections",
            "",
            "| sessions | connections | RSS before | RSS after | per connection |",
            "|---|---|---|---|---|",
        ]
        for m in results.memory:
            parts.append(
                f"| {m.who} | {m.connections:,} | {m.before_kb / 1024:.1f} MB "
                f"| {m.after_kb / 1024:.1f} MB | {m.per_connection_kb:.1f} kB |"
            )
        parts.append("")
    if results.errors or results.notes:
        parts += ["### Notes", ""]
        parts += [f"- {_md_escape(n)}" for n in results.notes]
        parts += [f"- failed run: {_md_escape(e)}" for e in results.errors]
        parts.append("")
    parts.append(END_MARK)
    return "\n".join(parts)


def _value_text_or_ratio(row: Row) -> str:
    if row.medians:
        return f"{fmt_ratio(row.value)}, target {row.target}"
    return f"{fmt_number(row.value)} {row.unit}, target {row.target}"


def splice(existing: str | None, section: str, skeleton: str) -> str:
    """`existing` with the text between the markers replaced by `section` (markers included).

    Without an existing file, `skeleton` (which holds both markers) is filled in; an existing
    file that lost its markers keeps all its text and gets the section appended.
    """
    if existing is None:
        existing = skeleton
        if BEGIN_MARK not in skeleton or END_MARK not in skeleton:
            raise ValueError("the skeleton has no result markers")
    start = existing.find(BEGIN_MARK)
    end = existing.find(END_MARK, start + 1) if start >= 0 else -1
    if start >= 0 and end >= 0:
        return existing[:start] + section + existing[end + len(END_MARK) :]
    return existing.rstrip("\n") + "\n\n" + section + "\n"
