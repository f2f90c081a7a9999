"""The integration-test harness: a PostgreSQL server with the sample bank, and Topeng processes.

Strategy: by default a throwaway cluster (proxy.embedded) is started once per test session,
with SCRAM on TCP plus one md5 and one cleartext-password user, and the sample bank loaded
into database `bank`. With TOPENG_TEST_DSN (a superuser URL of an existing server) the bank is
loaded into a fresh database there instead and dropped afterwards; tests that need our own
pg_hba.conf (`PgServer.own_cluster`) skip. Topeng itself always runs as a separate process
(`python -m proxy serve`), as users run it, on free loopback ports.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn
from urllib.parse import quote, urlsplit, urlunsplit

import pytest

from proxy.embedded import Cluster, find_bin_dir, free_port
from proxy.sampledata import load_sample_sync

__all__ = [
    "BANK_RULES",
    "REPO_ROOT",
    "TEST_CUSTOMERS",
    "TEST_USERS",
    "HarnessError",
    "PgServer",
    "TopengProcess",
    "free_port",
    "start_pg",
    "start_topeng",
    "stop_pg",
    "wait_for_port",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
BANK_RULES = REPO_ROOT / "rules" / "bank.yaml"
TEST_DATABASE = "bank"
TEST_CUSTOMERS = 2_000
TEST_MAX_CONNECTIONS = 600
TOPENG_START_TIMEOUT = 15.0
TOPENG_STOP_TIMEOUT = 10.0

#: Users the tests log in as, beyond the demo users: user -> password.
TEST_USERS: dict[str, str] = {
    "alice": "alice-secret",  # SCRAM; CREATEDB, reads everything, may create in public
    "md5user": "md5user-secret",  # pg_hba method md5, password stored as MD5
    "plainuser": "plainuser-secret",  # pg_hba method password (cleartext on the wire)
}
#: pg_hba methods of the embedded cluster, before the catch-all scram-sha-256 lines.
TEST_HBA: tuple[tuple[str, str], ...] = (("md5user", "md5"), ("plainuser", "password"))


class HarnessError(RuntimeError):
    """The test environment could not be set up."""


# -- PostgreSQL ----------------------------------------------------------------------------------


@dataclass
class PgServer:
    """The upstream PostgreSQL of a test session."""

    host: str
    port: int
    superuser: str
    superuser_password: str | None
    database: str  # holds schema bank; its search_path is `bank, public`
    cluster: Cluster | None = None  # None with TOPENG_TEST_DSN
    bin_dir: Path | None = None  # psql, pgbench, pg_dump (None if none were found)
    _created_database: bool = field(default=False, repr=False)

    @property
    def own_cluster(self) -> bool:
        """True if we control pg_hba.conf (md5 and cleartext users exist and work)."""
        return self.cluster is not None

    @property
    def upstream(self) -> str:
        """Topeng's --upstream: address only, no credentials."""
        return f"postgresql://{self.host}:{self.port}"

    @property
    def superuser_dsn(self) -> str:
        return self.dsn(self.superuser, self.superuser_password, self.database)

    def dsn(self, user: str, password: str | None = None, database: str | None = None) -> str:
        """A TCP URL straight to PostgreSQL (database: the test database `bank`)."""
        return _url(self.host, self.port, user, password, database or self.database)

    def execute(self, sql: str, *, dbname: str | None = None) -> str:
        """Run SQL as superuser with psql (ON_ERROR_STOP); returns unaligned tuples."""
        if self.cluster is not None:
            return self.cluster.execute(sql, dbname=dbname or self.database)
        psql = _psql(self.bin_dir)
        result = subprocess.run(
            [psql, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-f", "-",
             "-d", self.dsn(self.superuser, self.superuser_password, dbname)],
            input=sql, capture_output=True, text=True, check=False, timeout=600,
            env=_without_pg_env(),
        )  # fmt: skip
        if result.returncode != 0:
            raise HarnessError(f"psql failed: {result.stderr.strip()}")
        return result.stdout


def start_pg(
    *,
    customers: int = TEST_CUSTOMERS,
    max_connections: int = TEST_MAX_CONNECTIONS,
    environ: Mapping[str, str] | None = None,
) -> PgServer:
    """A PostgreSQL with the sample bank and the test users: ours, or TOPENG_TEST_DSN's."""
    env = os.environ if environ is None else environ
    external = env.get("TOPENG_TEST_DSN")
    if external:
        return _start_external(external, customers)
    cluster = Cluster(max_connections=max_connections, hba=TEST_HBA)
    cluster.start()
    try:
        cluster.create_database(TEST_DATABASE)
        server = PgServer(
            host=cluster.host,
            port=cluster.port,
            superuser="postgres",
            superuser_password=cluster.password,
            database=TEST_DATABASE,
            cluster=cluster,
            bin_dir=cluster.bin_dir,
        )
        load_sample_sync(server.superuser_dsn, customers=customers)
        server.execute(_test_users_sql(TEST_DATABASE))
    except BaseException:
        cluster.stop()
        raise
    return server


def stop_pg(server: PgServer) -> None:
    if server.cluster is not None:
        server.cluster.stop()
    elif server._created_database:
        server.execute(
            f'DROP DATABASE IF EXISTS "{server.database}" WITH (FORCE);', dbname="postgres"
        )


def _start_external(dsn: str, customers: int) -> PgServer:
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgresql", "postgres") or not parts.hostname:
        raise HarnessError("TOPENG_TEST_DSN must be a postgresql://USER:PASSWORD@HOST:PORT/ URL")
    try:
        bin_dir: Path | None = find_bin_dir()
    except RuntimeError:
        bin_dir = None
    database = f"topeng_test_{os.getpid()}_{secrets.token_hex(3)}"
    server = PgServer(
        host=parts.hostname,
        port=parts.port or 5432,
        superuser=parts.username or "postgres",
        superuser_password=parts.password,
        database=database,
        bin_dir=bin_dir,
    )
    server.execute(f'CREATE DATABASE "{database}";', dbname=parts.path.lstrip("/") or "postgres")
    server._created_database = True
    try:
        load_sample_sync(server.superuser_dsn, customers=customers)
        server.execute(_test_users_sql(database))
    except BaseException:
        stop_pg(server)
        raise
    return server


def _test_users_sql(database: str) -> str:
    """Roles are cluster-wide: create if missing, then (re)set passwords and grants."""
    lines = []
    for user in TEST_USERS:
        lines.append(
            f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{user}') "
            f"THEN CREATE ROLE {user} LOGIN; END IF; END $$;"
        )
    for user, password in TEST_USERS.items():
        encryption = "md5" if user == "md5user" else "scram-sha-256"
        lines.append(f"SET password_encryption = '{encryption}';")
        lines.append(f"ALTER ROLE {user} LOGIN PASSWORD '{password}';")
    lines += [
        "RESET password_encryption;",
        "ALTER ROLE alice CREATEDB;",
        "GRANT pg_read_all_data TO alice;",
        f'GRANT ALL ON DATABASE "{database}" TO alice;',
        "GRANT CREATE ON SCHEMA public TO alice;",
        "GRANT USAGE ON SCHEMA bank TO alice, md5user, plainuser;",
        "GRANT SELECT ON ALL TABLES IN SCHEMA bank TO md5user, plainuser;",
    ]
    return "\n".join(lines) + "\n"


def _url(host: str, port: int, user: str, password: str | None, database: str) -> str:
    auth = quote(user, safe="")
    if password is not None:
        auth += ":" + quote(password, safe="")
    return urlunsplit(("postgresql", f"{auth}@{host}:{port}", "/" + quote(database), "", ""))


def _psql(bin_dir: Path | None) -> str:
    if bin_dir is not None and (bin_dir / "psql").is_file():
        return str(bin_dir / "psql")
    return "psql"


def _without_pg_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


# -- Topeng --------------------------------------------------------------------------------------


def wait_for_port(
    host: str, port: int, *, timeout: float, proc: subprocess.Popen[bytes] | None = None
) -> bool:
    """True once host:port accepts TCP; False on timeout or if `proc` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


class TopengProcess:
    """A running `python -m proxy serve` on 127.0.0.1, stderr captured to a file."""

    host = "127.0.0.1"

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        *,
        args: Sequence[str],
        port: int,
        metrics_port: int | None,
        stderr_path: Path,
        pg: PgServer,
    ) -> None:
        self.proc = proc
        self.args = tuple(args)
        self.port = port
        self.metrics_port = metrics_port
        self.stderr_path = stderr_path
        self.pg = pg

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    @property
    def metrics_url(self) -> str:
        if self.metrics_port is None:
            raise HarnessError("this Topeng was started with its own --metrics-listen")
        return f"http://{self.host}:{self.metrics_port}"

    def dsn(self, user: str, password: str | None = None, database: str | None = None) -> str:
        """A URL to PostgreSQL through this Topeng (database: the test database `bank`)."""
        return _url(self.host, self.port, user, password, database or self.pg.database)

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout)

    def stop(self, timeout: float = TOPENG_STOP_TIMEOUT) -> int:
        """SIGTERM, then SIGKILL after `timeout` seconds. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __repr__(self) -> str:
        return f"<TopengProcess pid={self.pid} port={self.port} rc={self.returncode}>"


def start_topeng(
    pg: PgServer,
    *extra_args: str,
    rules: Path | str | None = BANK_RULES,
    log_dir: Path,
    env: Mapping[str, str] | None = None,
    timeout: float = TOPENG_START_TIMEOUT,
) -> TopengProcess:
    """Start `python -m proxy serve` in front of `pg` and wait until it accepts connections.

    Adds --listen on a free port and, unless `extra_args` has its own, --metrics-listen on
    another. `rules=None` omits --rules. TOPENG_* variables of our environment are not passed
    on (they would change the configuration); `env` adds variables.
    """
    port = free_port()
    args = [
        sys.executable, "-m", "proxy", "serve",
        "--listen", f"127.0.0.1:{port}",
        "--upstream", pg.upstream,
    ]  # fmt: skip
    if rules is not None:
        if not Path(rules).exists():
            raise HarnessError(f"rules not found: {rules}")
        args += ["--rules", str(rules)]
    metrics_port: int | None = None
    if "--metrics-listen" not in extra_args:
        metrics_port = free_port()
        args += ["--metrics-listen", f"127.0.0.1:{metrics_port}"]
    args += extra_args
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("TOPENG_")}
    child_env["PYTHONUNBUFFERED"] = "1"
    child_env.update(env or {})
    log_dir.mkdir(parents=True, exist_ok=True)
    stderr_path = log_dir / f"topeng-{port}.stderr"
    with stderr_path.open("wb") as stderr:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env=child_env,
        )
    topeng = TopengProcess(
        proc, args=args, port=port, metrics_port=metrics_port, stderr_path=stderr_path, pg=pg
    )
    if not wait_for_port("127.0.0.1", port, timeout=timeout, proc=proc):
        early = proc.poll()
        topeng.stop()
        state = f"exited with code {early}" if early is not None else "was stopped"
        raise HarnessError(
            f"topeng {state}: not accepting connections on 127.0.0.1:{port} "
            f"within {timeout:.0f} s\n$ {' '.join(args)}\n--- output ---\n{topeng.stderr_text()}"
        )
    return topeng


def wait_until(check: Callable[[], object], what: str, timeout: float = 15.0) -> None:
    """Poll `check` until it returns something true; fail the test naming `what` after
    `timeout` seconds (for what Topeng does in the background: metrics, cancels, Redis)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def needs_tool(reason: str) -> NoReturn:
    """A test that needs a program this machine lacks: skipped on a laptop, failed on CI (where
    .ci/run installs everything, so a missing tool is a broken install step)."""
    if os.environ.get("CI"):
        pytest.fail(f"CI: {reason}")
    pytest.skip(reason)


#: The `start_topeng` fixture: start a Topeng in front of the test server.
StartTopeng = Callable[..., "TopengProcess"]
