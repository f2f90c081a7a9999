"""`python -m bench` (`make bench`): direct PostgreSQL vs pgbouncer vs Topeng, same run, ratios.

Order of events: PostgreSQL (embedded, or --dsn), the bench database (pgbench tables at scale 10,
the sample bank with 100,000 customers, two bench users), pgbouncer in session mode and Topeng
in front of it, each on a free loopback port; a check that the restricted user may run the
workloads through Topeng and sees exactly six masked columns; then R rounds in which every
workload runs against direct, pgbouncer and Topeng in turn; then the analysis cost (in-process)
and Topeng's memory with 1,000 idle connections. The table is printed, and written with the
machine and versions to docs/benchmarks.md, next to a PNG chart of the ratios.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from types import FrameType

from bench import chart, machine
from bench.report import (
    BEGIN_MARK,
    END_MARK,
    MEASURES,
    AnalysisQueryResult,
    Measure,
    Results,
    Row,
    cpu_lines,
    fmt_number,
    markdown,
    splice,
    summarize,
    text_table,
)
from bench.runs import Target, check_topeng, pgbench_args, run_pgbench, user_of, write_stream_script
from bench.services import (
    REPO_ROOT,
    RESTRICTED_USER,
    UNRESTRICTED_USER,
    BenchError,
    Postgres,
    Process,
    Users,
    cpu_seconds,
    find_pgbouncer,
    pgbouncer_version,
    prepare_database,
    server_setting,
    sql,
    start_pgbouncer,
    start_postgres,
    start_topeng,
    write_rules,
)
from proxy.policy import fastmask

CUSTOMERS = 100_000
MAX_CONNECTIONS = 1200
DEFAULT_OUT = REPO_ROOT / "docs" / "benchmarks.md"

SKELETON = f"""# Benchmarks

Direct PostgreSQL, pgbouncer (session mode) and Topeng, measured in the same run by `make bench`
(code in `bench/`). The section between the markers is written by the bench; the rest is kept.

## How to run

```sh
make bench                               # 3 rounds, about 10-12 minutes
.venv/bin/python -m bench --quick        # 1 short round
.venv/bin/python -m bench --help         # every option
```

{BEGIN_MARK}
{END_MARK}

## Optimisation log
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=(
            "Benchmark direct PostgreSQL, pgbouncer (session mode) and Topeng on loopback, "
            "interleaved round by round, and report medians and Topeng's ratios against the "
            "targets of issue 7. Needs pgbouncer (installed with apt-get when missing and run "
            "as root) and pgbench (shipped with the embedded PostgreSQL)."
        ),
        epilog=(
            "Workloads: pgbench -S with 16 and 1 clients, simple and prepared protocol, as an "
            "unrestricted and as a restricted (analysed) user; a 100,000-row result unmasked "
            "and with six of eight columns masked. Also: analysis cost per statement (cache hit "
            "and miss, in-process) and Topeng's RSS with idle connections. Timings are judged "
            "here only, never by `make test`."
        ),
    )
    parser.add_argument(
        "--rounds", type=int, default=3, metavar="R",
        help="rounds of direct/pgbouncer/Topeng runs (default 3)",
    )  # fmt: skip
    parser.add_argument(
        "--duration", type=float, default=None, metavar="SECONDS",
        help="length of each pgbench run (default 5, or 3 with --quick)",
    )  # fmt: skip
    parser.add_argument(
        "--quick", action="store_true",
        help="one round of short runs and fewer analysis iterations: a smoke run (~3 min)",
    )  # fmt: skip
    parser.add_argument(
        "--dsn", metavar="URL",
        help="use this PostgreSQL on 127.0.0.1 instead of an embedded one: a superuser URL, "
        "postgresql://postgres:PASSWORD@127.0.0.1:5432 (database topeng_bench is recreated; "
        "max_connections must exceed --connections for the memory measure)",
    )  # fmt: skip
    parser.add_argument(
        "--out", metavar="FILE", default=str(DEFAULT_OUT),
        help="markdown report to write (default docs/benchmarks.md; the chart goes next to it "
        "with the suffix .png; '-' only prints)",
    )  # fmt: skip
    parser.add_argument(
        "--connections", type=int, default=1000, metavar="N",
        help="idle client connections for the memory measure (default 1000; 0 skips it)",
    )  # fmt: skip
    parser.add_argument(
        "--workers", type=int, default=1, metavar="N",
        help="Topeng worker processes (topeng serve --workers; default 1); its CPU per "
        "transaction counts all of them",
    )  # fmt: skip
    parser.add_argument(
        "--only", metavar="KEYS",
        help="run only the pgbench workloads whose key contains one of these comma-separated "
        "words (keys: select-16c-simple-restricted, ..., stream-masked); the report then only "
        "prints (--out defaults to '-'), since a partial table would overwrite the full one",
    )  # fmt: skip
    parser.add_argument(
        "--rated", action="store_true",
        help="give the restricted role statement and row rates it never exhausts (100 million "
        "statements, a billion rows a minute): its gated sessions then spend rate budgets held "
        "ahead, as the bank's agent role does; the report then only prints, as with --only",
    )  # fmt: skip
    parser.add_argument(
        "--profile", metavar="DIR",
        help="after the rounds, run each workload once more through Topeng under py-spy and "
        "write raw profiles (flamegraph input) to DIR; these runs are not measured",
    )  # fmt: skip
    return parser


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def selected(only: str | None) -> tuple[Measure, ...]:
    """The workloads `--only` names (every one without it)."""
    if only is None:
        return MEASURES
    words = [w.strip() for w in only.split(",") if w.strip()]
    return tuple(m for m in MEASURES if any(w in m.key for w in words))


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.rounds < 1:
        print("bench: --rounds must be at least 1", file=sys.stderr)
        return 2
    if args.duration is not None and args.duration < 1:
        print("bench: --duration must be at least 1 second", file=sys.stderr)
        return 2
    if args.only is not None:
        if not selected(args.only):
            keys = ", ".join(m.key for m in MEASURES)
            print(f"bench: --only {args.only!r} matches no workload; keys: {keys}", file=sys.stderr)
            return 2
    if (args.only is not None or args.rated) and args.out == str(DEFAULT_OUT):
        args.out = "-"  # a partial or variant table must not overwrite the full one
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("\nbench: interrupted; every process it started has been stopped", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace) -> int:
    rounds = 1 if args.quick else args.rounds
    duration = args.duration if args.duration is not None else (3.0 if args.quick else 5.0)
    hit_iterations, miss_iterations = (300, 10) if args.quick else (2000, 40)
    results = Results(rounds=rounds, duration=duration)
    measures = selected(args.only)
    runs = rounds * len(measures) * 3
    log(
        f"{rounds} round(s) x {len(measures)} workloads x 3 servers = {runs} pgbench runs of "
        f"{duration:g} s: about {runs * (duration + 0.3) / 60:.0f} min of runs, plus ~2 min"
    )
    environment: list[tuple[str, str]] = [
        ("date", machine.now_utc()),
        (
            "machine",
            f"{machine.cpu_model()}, {machine.cores()} cores, {machine.memory_total()} memory",
        ),
        ("load average at start (1/5/15 min)", machine.load_average()),
    ]
    with ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="topeng-bench-"))
        workdir.chmod(0o711)  # pgbouncer's unprivileged user must reach its own directory
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        bouncer_bin = find_pgbouncer(log)
        log("starting PostgreSQL ..." if args.dsn is None else "using the PostgreSQL of --dsn")
        pg = start_postgres(args.dsn, MAX_CONNECTIONS, stack)
        admin = pg.dsn(pg.superuser, pg.password, "postgres")
        version = str(sql(admin, "SHOW server_version")[0][0][0])
        users = prepare_database(pg, CUSTOMERS, log)
        max_connections = int(server_setting(pg, "max_connections"))
        shared_buffers = server_setting(pg, "shared_buffers")
        rules = write_rules(workdir, rated=args.rated)
        bouncer = start_pgbouncer(bouncer_bin, pg, users, workdir, stack)
        topeng = start_topeng(pg, rules, workdir, stack, "--workers", str(args.workers))
        log(f"PostgreSQL :{pg.port}, pgbouncer :{bouncer.port}, Topeng :{topeng.port}")
        targets = (
            Target("direct", pg.port),
            Target("pgbouncer", bouncer.port, bouncer.pid),
            Target("topeng", topeng.port, topeng.pid),
        )
        stream_script = write_stream_script(workdir)
        pgbench = pg.pgbench()
        check_topeng(pgbench, targets[0], targets[2], users, stream_script)
        log("checked: the restricted user runs pgbench -S through Topeng, six columns masked")
        for round_index in range(rounds):
            for measure in measures:
                for target in targets:
                    _one_run(results, measure, target, round_index, pgbench, users,
                             stream_script, topeng, bouncer)  # fmt: skip
        if args.profile:
            _profile(Path(args.profile), measures, topeng, targets[2], pgbench, users,
                     stream_script, duration)  # fmt: skip
        results.analysis, results.analysis_hit_samples, results.analysis_miss_samples = _analysis(
            pg.superuser_dsn, rules, hit_iterations, miss_iterations
        )
        _memory(args.connections, max_connections, pg, rules, workdir, users, results)
        origin = "embedded, pgserver wheel, fsync off" if pg.embedded else "from --dsn"
        environment += [
            ("load average at end (1/5/15 min)", machine.load_average()),
            (
                "PostgreSQL",
                f"{version} ({origin}; max_connections {max_connections}, "
                f"shared_buffers {shared_buffers})",
            ),  # fmt: skip
            ("pgbouncer", f"{pgbouncer_version(bouncer_bin)} (session mode, scram-sha-256)"),
            ("pgbench", _pgbench_version(pgbench)),
            ("Python", machine.python_version()),
            (
                "Topeng",
                f"python -m proxy serve: {args.workers} worker(s), --metrics-listen off, "
                f"--log-level warning; masking loop in {'C' if fastmask.AVAILABLE else 'Python'}"
                + ("; the restricted role rated (--rated)" if args.rated else ""),
            ),
            ("Topeng commit", machine.git_commit(REPO_ROOT)),
            (
                "runs",
                f"{rounds} round(s) of {duration:g} s pgbench runs, interleaved direct, "
                "pgbouncer, Topeng; pgbench -n, 16 clients with -j 2",
            ),
        ]
        log("stopping everything ...")
    rows = summarize(results)
    print()
    print(text_table(rows))
    print()
    cpu = cpu_lines(results)
    if cpu:
        print("proxy CPU per transaction (us): measure / pgbouncer / Topeng / ratio")
        for line in cpu:
            print(f"  {line[0]:<58} {line[1]:>10} {line[2]:>10} {line[3]:>6}")
        print()
    for error in results.errors:
        print(f"failed run: {error}")
    if args.out != "-":
        _write(Path(args.out), results, rows, environment, rounds, duration)
    return 0


def _one_run(
    results: Results,
    measure: Measure,
    target: Target,
    round_index: int,
    pgbench: str,
    users: Users,
    stream_script: Path,
    topeng: Process,
    bouncer: Process,
) -> None:
    args = pgbench_args(measure, results.duration, stream_script)
    value: float | None
    cpu_before = cpu_seconds(target.pid) if target.pid is not None else None
    try:
        out = run_pgbench(
            pgbench, target, user_of(measure), users, args, timeout=results.duration + 120
        )
        value = out.tps * measure.per_transaction
        shown = f"{fmt_number(value)} {measure.unit}"
        cpu_after = cpu_seconds(target.pid) if target.pid is not None else None
        if cpu_before is not None and cpu_after is not None and out.transactions > 0:
            per_transaction = (cpu_after - cpu_before) * 1e6 / out.transactions
            results.record_cpu(measure.key, target.name, round_index, per_transaction)
            shown += f"  (proxy CPU {fmt_number(per_transaction, 1)} us/transaction)"
    except BenchError as exc:
        value, shown = None, f"FAILED: {exc}"
        results.errors.append(f"round {round_index + 1}, {measure.key}, {target.name}: {exc}")
    results.record(measure.key, target.name, round_index, value)
    log(f"round {round_index + 1}/{results.rounds}  {measure.key:<32} {target.name:<9} {shown}")
    for process in (topeng, bouncer):
        if process.proc.poll() is not None:
            raise BenchError(
                f"{process.name} exited with code {process.proc.returncode}\n"
                f"--- {process.log_path} ---\n{process.log_tail()}"
            )


def _pgbench_version(pgbench: str) -> str:
    out = subprocess.run([pgbench, "--version"], capture_output=True, text=True, check=False)
    return out.stdout.strip() or "?"


def _analysis(
    dsn: str, rules: Path, hit_iterations: int, miss_iterations: int
) -> tuple[list[AnalysisQueryResult], list[float], list[float]]:
    from bench.analysis import measure_analysis

    log("analysis cost, in-process ...")
    per_query, hits, misses = measure_analysis(
        dsn, rules, hit_iterations=hit_iterations, miss_iterations=miss_iterations, log=log
    )
    return per_query, hits, misses


def _memory(
    connections: int,
    max_connections: int,
    pg: Postgres,
    rules: Path,
    workdir: Path,
    users: Users,
    results: Results,
) -> None:
    from bench.memory import measure_memory

    if connections <= 0:
        results.notes.append("memory measure skipped (--connections 0)")
        return
    if max_connections < connections + 20:
        results.notes.append(
            f"memory measure skipped: PostgreSQL's max_connections is {max_connections}, "
            f"{connections} idle connections need more"
        )
        return
    for who, user in (("unrestricted", UNRESTRICTED_USER), ("restricted", RESTRICTED_USER)):
        with ExitStack() as stack:
            topeng = start_topeng(pg, rules, workdir, stack, name=f"topeng-memory-{who}")
            try:
                results.memory.append(
                    measure_memory(topeng, who, user, users.password(user), connections, log)
                )
            except BenchError as exc:
                results.errors.append(f"memory, {who}: {exc}")
        mem = results.memory[-1] if results.memory and results.memory[-1].who == who else None
        if mem is not None:
            log(
                f"memory, {who}: {mem.before_kb / 1024:.1f} MB -> {mem.after_kb / 1024:.1f} MB "
                f"with {connections} idle connections ({mem.per_connection_kb:.1f} kB each)"
            )


def _profile(
    directory: Path,
    measures: Sequence[Measure],
    topeng: Process,
    target: Target,
    pgbench: str,
    users: Users,
    stream_script: Path,
    duration: float,
) -> None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.access(spy, os.X_OK):
        raise BenchError("--profile needs py-spy (pip install py-spy)")
    directory.mkdir(parents=True, exist_ok=True)
    for measure in measures:
        out = directory / f"{measure.key}.txt"
        recorder = subprocess.Popen(
            [spy, "record", "-p", str(topeng.pid), "-d", str(math.ceil(duration) + 1),
             "-f", "raw", "-o", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            run_pgbench(pgbench, target, user_of(measure), users,
                        pgbench_args(measure, duration, stream_script),
                        timeout=duration + 120)  # fmt: skip
        except BenchError as exc:
            log(f"profile of {measure.key}: {exc}")
        finally:
            try:
                recorder.wait(duration + 30)
            except subprocess.TimeoutExpired:
                recorder.kill()
                recorder.wait()
        log(f"profile of {measure.key} through Topeng: {out}")


def _write(
    out: Path,
    results: Results,
    rows: Sequence[Row],
    environment: Sequence[tuple[str, str]],
    rounds: int,
    duration: float,
) -> None:
    png_path = out.with_suffix(".png")
    bars = [
        chart.Bar(
            label=row.short,
            vs_pgbouncer=row.ratio_pgbouncer,
            vs_direct=row.ratio_direct,
            rounds_pgbouncer=tuple(r for r in row.vs_pgbouncer if r is not None),
            rounds_direct=tuple(r for r in row.vs_direct if r is not None),
            target_baseline=row.target_baseline,
            target=row.target_value,
        )
        for row in rows
        if row.medians
    ]
    date = environment[0][1]
    subtitle = f"{date}: MEDIAN OF {rounds} ROUND(S) OF {duration:g} S, TICKS = ROUNDS"
    out.parent.mkdir(parents=True, exist_ok=True)
    png_path.write_bytes(chart.bar_chart(bars, "TOPENG / PGBOUNCER AND TOPENG / DIRECT", subtitle))
    section = markdown(results, rows, environment=environment, chart_name=png_path.name)
    existing = out.read_text() if out.exists() else None
    out.write_text(splice(existing, section, SKELETON))
    log(f"wrote {out} and {png_path}")
