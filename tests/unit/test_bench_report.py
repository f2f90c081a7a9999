"""The bench's pure code: medians, per-round ratios, verdicts, pgbench parsing, markdown, PNG.

No sockets, no processes, no timing assertions: speed is judged by `make bench` only.
"""

from __future__ import annotations

import math
import struct
import sys
import zlib
from collections.abc import Sequence
from pathlib import Path

import pytest

# bench/ is not an installed package: make the repository root importable under any runner.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.chart import Bar, Canvas, bar_chart, png  # noqa: E402
from bench.report import (  # noqa: E402
    BEGIN_MARK,
    END_MARK,
    MEASURES,
    AnalysisQueryResult,
    MemoryResult,
    Results,
    Row,
    cpu_lines,
    fmt_number,
    markdown,
    median,
    parse_pgbench,
    ratio_per_round,
    splice,
    summarize,
    text_table,
)

PGBENCH_OUTPUT = """\
pgbench (15.4)
transaction type: <builtin: select only>
scaling factor: 10
query mode: prepared
number of clients: 16
number of threads: 2
maximum number of tries: 1
duration: 5 s
number of transactions actually processed: 118031
number of failed transactions: 0 (0.000%)
latency average = 0.676 ms
initial connection time = 12.719 ms
tps = 23654.282161 (without initial connection time)
"""


# -- numbers -------------------------------------------------------------------------------------


def test_median_ignores_missing_values() -> None:
    assert median([3.0, None, 1.0, 2.0]) == 2.0
    assert median([1.0, 2.0, 3.0, 4.0]) == 2.5
    assert median([None, math.nan, 5.0]) == 5.0


def test_median_of_nothing_is_nan() -> None:
    assert math.isnan(median([]))
    assert math.isnan(median([None, None]))


def test_ratio_is_taken_within_each_round() -> None:
    assert ratio_per_round([9.0, 8.0, 12.0], [10.0, 10.0, 10.0]) == [0.9, 0.8, 1.2]


def test_ratio_of_a_failed_or_zero_round_is_missing() -> None:
    assert ratio_per_round([9.0, None, 5.0], [10.0, 10.0, 0.0]) == [0.9, None, None]


def test_per_round_ratio_differs_from_ratio_of_medians() -> None:
    # Drift hits both servers of a round alike: pairing by round keeps the ratio steady.
    topeng = [10.0, 20.0, 30.0]
    pgbouncer = [10.0, 20.0, 40.0]
    assert median(ratio_per_round(topeng, pgbouncer)) == 1.0
    assert median(topeng) / median(pgbouncer) == 1.0
    assert median(ratio_per_round([10.0, 20.0, 30.0], [12.0, 16.0, 30.0])) == 1.0


# -- pgbench -------------------------------------------------------------------------------------


def test_parse_pgbench_reads_tps_without_connection_time() -> None:
    out = parse_pgbench(PGBENCH_OUTPUT)
    assert out.tps == pytest.approx(23654.282161)
    assert out.transactions == 118031
    assert out.failed == 0


def test_parse_pgbench_reads_failures() -> None:
    text = PGBENCH_OUTPUT.replace("failed transactions: 0", "failed transactions: 7")
    assert parse_pgbench(text).failed == 7


def test_parse_pgbench_without_tps_is_an_error() -> None:
    with pytest.raises(ValueError, match="tps"):
        parse_pgbench("pgbench: error: connection to server failed\n")


# -- summary -------------------------------------------------------------------------------------


def _results(rounds: int = 3) -> Results:
    results = Results(rounds=rounds, duration=5.0)
    for measure in MEASURES:
        for r in range(rounds):
            results.record(measure.key, "direct", r, 1000.0)
            results.record(measure.key, "pgbouncer", r, 800.0)
            results.record(measure.key, "topeng", r, 760.0 + r * 40)  # 0.95, 1.0, 1.05
    results.analysis_hit_samples = [10.0, 12.0, 50.0]
    results.analysis_miss_samples = [4000.0, 6000.0, 7000.0]
    results.memory = [MemoryResult("unrestricted", 1000, 40_000, 100_000)]
    return results


def _row(rows: Sequence[Row], label: str) -> Row:
    return next(r for r in rows if r.label == label)


def test_summary_has_a_row_per_measure_and_limit() -> None:
    rows = summarize(_results())
    assert len(rows) == len(MEASURES) + 3
    first = rows[0]
    assert first.medians == {"direct": 1000.0, "pgbouncer": 800.0, "topeng": 800.0}
    assert first.vs_pgbouncer == pytest.approx((0.95, 1.0, 1.05))
    assert first.vs_direct == pytest.approx((0.76, 0.8, 0.84))


def test_verdicts_follow_the_targets_of_issue_7() -> None:
    rows = summarize(_results())
    unrestricted = _row(rows, "pgbench -S, 16 clients, simple, unrestricted")
    assert unrestricted.target == "Topeng/pgbouncer >= 1"
    assert unrestricted.value == pytest.approx(1.0)
    assert unrestricted.verdict == "met"
    masked = _row(rows, "100,000-row stream, six of eight columns masked")
    assert masked.target == "Topeng/direct >= 0.5"
    assert masked.value == pytest.approx(0.8)
    assert masked.verdict == "met"
    no_target = _row(rows, "pgbench -S, 1 client, simple, unrestricted")
    assert no_target.verdict == "" and no_target.target == ""


def test_a_missed_target_is_reported_as_not_met() -> None:
    results = _results()
    for r in range(3):
        results.record("select-16c-simple-restricted", "topeng", r, 400.0)  # 0.5 of pgbouncer
    rows = summarize(results)
    row = _row(rows, "pgbench -S, 16 clients, simple, restricted (analysed)")
    assert row.verdict == "NOT MET"
    assert "NOT MET" in text_table(rows)


def test_limits_are_judged_on_medians() -> None:
    rows = summarize(_results())
    hit = _row(rows, "analysis, cache hit (median per statement)")
    assert hit.value == 12.0 and hit.verdict == "met"
    miss = _row(rows, "analysis, cache miss (median per statement)")
    assert miss.value == 6000.0 and miss.verdict == "NOT MET"
    rss = _row(rows, "Topeng RSS with 1,000 idle connections (unrestricted)")
    assert rss.value == pytest.approx(100_000 / 1024) and rss.verdict == "met"


def test_missing_data_is_no_data_never_met() -> None:
    results = Results(rounds=1, duration=5.0)
    results.record("stream-unmasked", "direct", 0, 5.0)
    results.record("stream-unmasked", "pgbouncer", 0, None)
    rows = summarize(results)
    stream = _row(rows, "100,000-row stream, unrestricted (unmasked)")
    assert stream.verdict == "no data"
    assert all(r.verdict == "no data" for r in rows if not r.medians)


def test_memory_per_connection() -> None:
    assert MemoryResult("x", 1000, 40_000, 100_000).per_connection_kb == 60.0
    assert math.isnan(MemoryResult("x", 0, 1, 2).per_connection_kb)


# -- rendering -----------------------------------------------------------------------------------


def test_fmt_number() -> None:
    assert fmt_number(1234567.8) == "1,234,568"
    assert fmt_number(12.34) == "12.3"
    assert fmt_number(1.234) == "1.23"
    assert fmt_number(None) == "-"
    assert fmt_number(math.nan) == "-"


def test_text_table_lines_up() -> None:
    table = text_table(summarize(_results()))
    lines = table.splitlines()
    assert lines[0].startswith("measure")
    assert set(lines[1]) <= {"-", " "}
    assert "0.95, 1.00, 1.05" in table


def test_markdown_section_has_environment_table_chart_and_details() -> None:
    results = _results()
    results.analysis = [AnalysisQueryResult("SELECT 1 | 2", "allow", 12.0, 3456.0)]
    results.errors = ["round 1, stream-masked, topeng: pgbench exited 1"]
    section = markdown(
        results, summarize(results), environment=[("date", "today")], chart_name="b.png"
    )
    assert section.startswith(BEGIN_MARK) and section.endswith(END_MARK)
    assert "| date | today |" in section
    assert "![" in section and "(b.png)" in section
    assert "SELECT 1 \\| 2" in section
    assert "**NOT MET**" in section
    assert "failed run: round 1" in section
    assert "Targets met: **" in section


def test_splice_replaces_only_the_generated_section() -> None:
    existing = f"# B\n\nhand-written\n\n{BEGIN_MARK}\nold numbers\n{END_MARK}\n\n## Log\nkept\n"
    new = f"{BEGIN_MARK}\nnew numbers\n{END_MARK}"
    out = splice(existing, new, skeleton="unused")
    assert "old numbers" not in out
    assert "new numbers" in out
    assert out.startswith("# B\n\nhand-written\n") and out.endswith("## Log\nkept\n")


def test_splice_without_a_file_fills_the_skeleton() -> None:
    skeleton = f"# B\n{BEGIN_MARK}\n{END_MARK}\n## Log\n"
    out = splice(None, f"{BEGIN_MARK}\nN\n{END_MARK}", skeleton)
    assert out == f"# B\n{BEGIN_MARK}\nN\n{END_MARK}\n## Log\n"


def test_splice_keeps_a_file_that_lost_its_markers() -> None:
    out = splice("# B\nmine\n", f"{BEGIN_MARK}\nN\n{END_MARK}", skeleton="")
    assert out.startswith("# B\nmine\n") and out.rstrip().endswith(END_MARK)


# -- chart ---------------------------------------------------------------------------------------


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body)
        chunks.append((kind, body))
        pos += 12 + length
    return chunks


def test_png_is_valid_and_decodes_to_the_pixels() -> None:
    rgb = bytes([255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30])
    chunks = _chunks(png(2, 2, rgb))
    assert [k for k, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    width, height, depth, color = struct.unpack(">IIBB", chunks[0][1][:10])
    assert (width, height, depth, color) == (2, 2, 8, 2)
    raw = zlib.decompress(chunks[1][1])
    assert raw == b"\x00" + rgb[:6] + b"\x00" + rgb[6:]


def test_png_rejects_wrong_sizes() -> None:
    with pytest.raises(ValueError):
        png(2, 2, b"\x00" * 5)


def test_canvas_draws_text_and_clips() -> None:
    canvas = Canvas(40, 20)
    end = canvas.text(0, 0, "A1", scale=1)
    assert end == 12
    assert canvas.pixels[:3] == b"\xff\xff\xff"  # A's top-left pixel is blank
    assert b"\x00\x00\x00" in canvas.pixels
    canvas.rect(-5, -5, 100, 100, (1, 2, 3))  # clipped, no error
    assert canvas.pixels[-3:] == b"\x01\x02\x03"


def test_bar_chart_with_missing_values() -> None:
    bars = [
        Bar("-S 16C SIMPLE UNRESTR.", 0.8, 0.5, (0.7, 0.8, 0.9), (0.5,), "pgbouncer", 1.0),
        Bar("100K ROWS 6/8 MASKED", math.nan, 0.6, (), (0.6,), "direct", 0.5),
    ]
    chunks = _chunks(bar_chart(bars, "TITLE", "SUB"))
    width, height = struct.unpack(">II", chunks[0][1][:8])
    assert width > 600 and height > 100


def test_cpu_per_transaction_lines_and_markdown() -> None:
    results = _results(rounds=2)
    key = MEASURES[0].key
    results.record_cpu(key, "pgbouncer", 0, 40.0)
    results.record_cpu(key, "pgbouncer", 1, 60.0)
    results.record_cpu(key, "topeng", 0, 100.0)
    results.record_cpu(key, "topeng", 1, None)
    assert cpu_lines(results) == [[MEASURES[0].label, "50.0", "100.0", "2.00"]]
    section = markdown(results, summarize(results), environment=[], chart_name=None)
    assert "CPU time of the proxy process" in section
    assert "| 50.0 | 100.0 | 2.00 |" in section


def test_only_picks_workloads_by_key_words() -> None:
    from bench.cli import selected

    restricted = selected("-restricted")
    assert [m.key for m in restricted] == [
        m.key for m in MEASURES if m.user == "restricted" and m.script == "select-only"
    ]
    assert len(restricted) == 4
    assert {m.key for m in selected("16c,stream-masked")} == {
        "select-16c-simple-unrestricted",
        "select-16c-prepared-unrestricted",
        "select-16c-simple-restricted",
        "select-16c-prepared-restricted",
        "stream-masked",
    }
    assert selected(None) == MEASURES


def test_only_with_no_match_is_refused_before_anything_starts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from bench.cli import main

    assert main(["--only", "nothing-like-this"]) == 2
    assert "matches no workload" in capsys.readouterr().err


def test_rated_gives_the_restricted_role_rates_it_never_exhausts(tmp_path: Path) -> None:
    from bench.services import write_rules
    from proxy.policy.rules import load_rules

    (tmp_path / "plain").mkdir()
    (tmp_path / "rated").mkdir()
    plain = load_rules(write_rules(tmp_path / "plain")).role("bench_restricted")
    rated = load_rules(write_rules(tmp_path / "rated", rated=True)).role("bench_restricted")
    assert plain.max_queries_per_minute is None and plain.max_rows_per_minute is None
    assert rated.max_queries_per_minute == 100_000_000
    assert rated.max_rows_per_minute == 1_000_000_000
    assert rated.max_rows_per_query == plain.max_rows_per_query == 10_000_000
