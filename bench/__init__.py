"""Topeng's benchmark: direct PostgreSQL vs pgbouncer vs Topeng, same run, ratios (issue 7).

`python -m bench --help` (or `make bench`). `bench.report` and `bench.chart` are pure (tested in
tests/unit/test_bench_report.py); `bench.services`, `bench.runs`, `bench.analysis` and
`bench.memory` start and measure the servers; `bench.cli` runs it all in order.
"""
