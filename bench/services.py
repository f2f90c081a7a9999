"""The three servers under test, on loopback: PostgreSQL, pgbouncer (session mode) and Topeng.

Strategy: every process is started in its own session (a Ctrl-C in the terminal reaches only the
bench, which then stops them in order) and, on Linux, told to die if the bench dies without
cleaning up. Each start registers its stop on an `ExitStack`, so leaving the `with` block, by an
error or by Ctrl-C, stops everything that was started.

PostgreSQL is the embedded cluster of `proxy.embedded` (pgserver wheel) unless `--dsn` names a
server on this machine. pgbouncer refuses to run as root, so as root it runs as an unprivileged
system user (the one the embedded cluster uses), with its ini and userlist in a directory that
user owns; as another user it simply runs as that user.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote, unquote, urlsplit

REPO_ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
DATABASE = "topeng_bench"
UNRESTRICTED_USER = "bench_dba"
RESTRICTED_USER = "bench_agent"
SYSTEM_USER = "topeng-pg"  # the unprivileged user of proxy.embedded

#: The bench's own roles, merged in front of rules/bank.yaml: the pgbench user unrestricted; the
#: restricted user analysed and masked, but with no row limit (the bank agent's 50 rows would
#: refuse the 100,000-row stream) and the mother's maiden name redacted instead of denied, so
#: that the stream has six masked columns.
BENCH_RULES = f"""\
version: 1
roles:
  bench_unrestricted: {{users: [{UNRESTRICTED_USER}], unrestricted: true}}
  bench_restricted:
    users: [{RESTRICTED_USER}]
    statements: [select]
    max_rows_per_query: 10000000
policies:
  bench_restricted:
    mother_maiden_name: {{mask: redact}}
"""


class BenchError(RuntimeError):
    """The bench cannot go on; the message says why and what to do."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def clean_env(**extra: str) -> dict[str, str]:
    """Our environment without libpq's PG* and Topeng's TOPENG_* variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "TOPENG_"))}
    env.update(extra)
    return env


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn: SIGTERM to the child when the bench dies (Linux, main thread only)."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not (
        threading.main_thread()
    ):
        return None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    prctl = ctypes.CDLL(name, use_errno=True).prctl

    def set_pdeathsig() -> None:
        prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG

    return set_pdeathsig


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection((LOOPBACK, port), timeout=1.0):
                return True
        except OSError:
            time.sleep(0.05)
    return False


@dataclass
class Process:
    """A server we started; `stop()` is idempotent."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    stop_signal: int = signal.SIGTERM

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        for sig, wait in ((self.stop_signal, 10.0), (signal.SIGKILL, 5.0)):
            try:
                self.proc.send_signal(sig)
                self.proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                return


def _spawn(
    name: str,
    args: Sequence[str],
    port: int,
    log_path: Path,
    stack: ExitStack,
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    ids: tuple[int, int] | None = None,
    stop_signal: int = signal.SIGTERM,
    timeout: float = 60.0,
) -> Process:
    kwargs: dict[str, Any] = {}
    if ids is not None:
        kwargs = {"user": ids[0], "group": ids[1], "extra_groups": []}
    log: IO[bytes]
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            list(args),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env if env is not None else clean_env(),
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_die_with_parent(),
            **kwargs,
        )
    process = Process(name, proc, port, log_path, stop_signal)
    stack.callback(process.stop)
    if not wait_for_port(port, proc, timeout):
        code = proc.poll()
        state = (
            f"exited with code {code}"
            if code is not None
            else f"still not ready after {timeout:.0f} s"
        )
        process.stop()
        raise BenchError(
            f"{name} did not accept connections on {LOOPBACK}:{port} ({state})\n"
            f"$ {' '.join(args)}\n--- {log_path} ---\n{process.log_tail()}"
        )
    return process


# -- PostgreSQL --------------------------------------------------------------------------------


@dataclass
class Postgres:
    """Where PostgreSQL is, and how to reach it as superuser."""

    host: str
    port: int
    superuser: str
    password: str
    bin_dir: Path | None  # pgbench lives here (None: use PATH)
    embedded: bool

    def dsn(self, user: str, password: str, database: str = DATABASE) -> str:
        return (
            f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}"
            f"@{self.host}:{self.port}/{quote(database, safe='')}"
        )

    @property
    def superuser_dsn(self) -> str:
        return self.dsn(self.superuser, self.password)

    def pgbench(self) -> str:
        if self.bin_dir is not None and (self.bin_dir / "pgbench").is_file():
            return str(self.bin_dir / "pgbench")
        found = shutil.which("pgbench")
        if found is None:
            raise BenchError(
                "no pgbench: install the Debian package postgresql-contrib (or use the embedded "
                "cluster, whose pgserver wheel ships one)"
            )
        return found


def start_postgres(dsn: str | None, max_connections: int, stack: ExitStack) -> Postgres:
    if dsn is None:
        from proxy.embedded import Cluster, ClusterError

        cluster = Cluster(
            max_connections=max_connections,
            settings={"shared_buffers": "256MB", "max_wal_size": "2GB"},
        )
        try:
            cluster.start()
        except ClusterError as exc:
            raise BenchError(f"the embedded PostgreSQL did not start: {exc}") from None
        stack.callback(cluster.stop)
        return Postgres(
            cluster.host, cluster.port, "postgres", cluster.password, cluster.bin_dir, True
        )
    url = urlsplit(dsn)
    host = url.hostname or LOOPBACK
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise BenchError(f"--dsn must point at this machine's loopback, not {host!r}")
    if not url.username:
        raise BenchError("--dsn must name a superuser: postgresql://postgres:PASSWORD@127.0.0.1")
    return Postgres(
        host="127.0.0.1" if host == "localhost" else host,
        port=url.port or 5432,
        superuser=unquote(url.username),
        password=unquote(url.password or ""),
        bin_dir=None,
        embedded=False,
    )


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


async def _execute(dsn: str, *statements: str) -> list[Any]:
    import asyncpg

    conn = await asyncpg.connect(dsn, ssl=False, timeout=30)
    try:
        out: list[Any] = []
        for statement in statements:
            out.append(await conn.fetch(statement))
        return out
    finally:
        await conn.close()


def sql(dsn: str, *statements: str) -> list[Any]:
    """Run statements one by one on one connection; each result's records."""
    return asyncio.run(_execute(dsn, *statements))


@dataclass
class Users:
    unrestricted_password: str
    restricted_password: str

    def password(self, user: str) -> str:
        return self.unrestricted_password if user == UNRESTRICTED_USER else self.restricted_password


def prepare_database(pg: Postgres, customers: int, log: Callable[[str], None]) -> Users:
    """A fresh bench database: pgbench tables (scale 10), the sample bank, the bench users."""
    admin = pg.dsn(pg.superuser, pg.password, "postgres")
    sql(
        admin,
        f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)",
        f"CREATE DATABASE {DATABASE}",
    )
    # pgbench tables first, in schema public: the sample data then sets the database's
    # search_path to `bank, public`, which would put them in bank.
    log("pgbench -i -s 10 ...")
    started = time.monotonic()
    result = subprocess.run(
        [pg.pgbench(), "-i", "-s", "10", "-q", "-h", pg.host, "-p", str(pg.port),
         "-U", pg.superuser, DATABASE],
        capture_output=True,
        text=True,
        env=clean_env(PGPASSWORD=pg.password, PGSSLMODE="disable"),
        timeout=600,
        check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise BenchError(f"pgbench -i failed: {result.stderr.strip()}")
    log(f"pgbench tables ready in {time.monotonic() - started:.1f} s")
    log(f"sample bank data, {customers:,} customers ...")
    started = time.monotonic()
    from proxy.sampledata import load_sample_sync

    load_sample_sync(pg.superuser_dsn, customers=customers)
    log(f"sample data ready in {time.monotonic() - started:.1f} s")
    users = Users(secrets.token_urlsafe(12), secrets.token_urlsafe(12))
    statements = ["SET password_encryption = 'scram-sha-256'"]
    for user in (UNRESTRICTED_USER, RESTRICTED_USER):
        statements.append(
            f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {_literal(user)}) "
            f"THEN CREATE ROLE {user} LOGIN; END IF; END $$"
        )
        statements.append(f"ALTER ROLE {user} LOGIN PASSWORD {_literal(users.password(user))}")
    statements += [
        f"GRANT USAGE ON SCHEMA bank, public TO {UNRESTRICTED_USER}, {RESTRICTED_USER}",
        f"GRANT SELECT ON ALL TABLES IN SCHEMA bank, public "
        f"TO {UNRESTRICTED_USER}, {RESTRICTED_USER}",
        "VACUUM ANALYZE",
    ]
    sql(pg.superuser_dsn, *statements)
    return users


def server_setting(pg: Postgres, name: str) -> str:
    rows = sql(pg.superuser_dsn, f"SELECT current_setting({_literal(name)})")
    return str(rows[0][0][0])


# -- pgbouncer ---------------------------------------------------------------------------------


def find_pgbouncer(log: Callable[[str], None]) -> str:
    """pgbouncer's binary; installs the Debian package when missing and we are root."""
    for candidate in (shutil.which("pgbouncer"), "/usr/sbin/pgbouncer"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise BenchError(
            "pgbouncer is not installed: `sudo apt-get install pgbouncer` (Debian/Ubuntu), then "
            "run the bench again"
        )
    log("pgbouncer is missing: apt-get install pgbouncer ...")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for args in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "pgbouncer"],
    ):
        done = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            raise BenchError(f"{' '.join(args)} failed: {done.stderr.strip()}")
    if os.access("/usr/sbin/pgbouncer", os.X_OK):
        return "/usr/sbin/pgbouncer"
    raise BenchError("apt-get installed pgbouncer, but there is no /usr/sbin/pgbouncer")


def _unprivileged_ids() -> tuple[int, int] | None:
    """The uid/gid pgbouncer runs as: None when we are not root."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
             SYSTEM_USER],
            capture_output=True,
            check=False,
        )  # fmt: skip
        try:
            entry = pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            raise BenchError(
                f"running as root, pgbouncer needs an unprivileged user; `useradd {SYSTEM_USER}` "
                "failed"
            ) from None
    return entry.pw_uid, entry.pw_gid


def start_pgbouncer(
    binary: str, pg: Postgres, users: Users, workdir: Path, stack: ExitStack
) -> Process:
    directory = Path(tempfile.mkdtemp(prefix="pgbouncer-", dir=workdir))
    port = free_port()
    userlist = "".join(
        f'"{user}" "{users.password(user)}"\n' for user in (UNRESTRICTED_USER, RESTRICTED_USER)
    )
    (directory / "userlist.txt").write_text(userlist)
    (directory / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"* = host={pg.host} port={pg.port}\n"
        "[pgbouncer]\n"
        f"listen_addr = {LOOPBACK}\n"
        f"listen_port = {port}\n"
        "unix_socket_dir =\n"
        "auth_type = scram-sha-256\n"
        f"auth_file = {directory / 'userlist.txt'}\n"
        "pool_mode = session\n"
        "max_client_conn = 500\n"
        "default_pool_size = 64\n"
        "ignore_startup_parameters = extra_float_digits\n"
        "log_connections = 0\n"
        "log_disconnections = 0\n"
    )
    ids = _unprivileged_ids()
    for path in (directory, directory / "userlist.txt", directory / "pgbouncer.ini"):
        path.chmod(0o700 if path.is_dir() else 0o600)
        if ids is not None:
            os.chown(path, *ids)
    return _spawn(
        "pgbouncer",
        [binary, str(directory / "pgbouncer.ini")],
        port,
        workdir / "pgbouncer.log",
        stack,
        cwd=directory,
        ids=ids,
        stop_signal=signal.SIGINT,  # pgbouncer: SIGINT = shut down now
    )


def pgbouncer_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    return (out.stdout or out.stderr).splitlines()[0].strip() if out.stdout or out.stderr else "?"


# -- Topeng ------------------------------------------------------------------------------------


#: `--rated`: statement and row rates the runs never exhaust, for the restricted role: its
#: gated sessions then spend budgets held ahead (docs/operations.md), as the bank's agent does.
RATED = "    max_queries_per_minute: 100000000\n    max_rows_per_minute: 1000000000\n"


def write_rules(workdir: Path, *, rated: bool = False) -> Path:
    """A rules directory: the bench's roles first, then rules/bank.yaml unchanged. `rated`:
    the restricted role has rates too (RATED)."""
    directory = workdir / "rules"
    directory.mkdir()
    rules = BENCH_RULES
    if rated:
        limit = "    max_rows_per_query: 10000000\n"
        rules = rules.replace(limit, limit + RATED, 1)
    (directory / "00-bench.yaml").write_text(rules)
    shutil.copyfile(REPO_ROOT / "rules" / "bank.yaml", directory / "10-bank.yaml")
    return directory


def start_topeng(
    pg: Postgres, rules: Path, workdir: Path, stack: ExitStack, *extra: str, name: str = "topeng"
) -> Process:
    port = free_port()
    args = [
        sys.executable, "-m", "proxy", "serve",
        "--listen", f"{LOOPBACK}:{port}",
        "--upstream", f"postgresql://{pg.host}:{pg.port}",
        "--rules", str(rules),
        "--metrics-listen", "off",
        "--log-level", "warning",
        *extra,
    ]  # fmt: skip
    return _spawn(
        name,
        args,
        port,
        workdir / f"{name}-{port}.log",
        stack,
        env=clean_env(PYTHONUNBUFFERED="1"),
        cwd=REPO_ROOT,
        stop_signal=signal.SIGINT,  # Topeng: SIGINT = stop now (SIGTERM waits for sessions)
    )


def _family(pid: int) -> list[int]:
    """`pid` and all its descendants (a --workers parent has children)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    family, todo = [], [pid]
    while todo:
        current = todo.pop()
        family.append(current)
        todo.extend(children.get(current, []))
    return family


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time `pid` and its descendants have used so far; None if gone."""
    total = None
    for member in _family(pid):
        try:
            stat = Path(f"/proc/{member}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        total = (total or 0.0) + (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def rss_kb(pid: int) -> int:
    """VmRSS of `pid` and all its descendants, in kB."""
    total = 0
    for member in _family(pid):
        try:
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total
