"""A throwaway PostgreSQL cluster for the test harness and `topeng demo`.

Strategy: run the PostgreSQL binaries ourselves (`initdb`, then `postgres` as a child process),
from the `pgserver` wheel or from the directory in `TOPENG_TEST_PGBIN`. Everything lives in one
short temporary directory (`/tmp/tpg-XXXX`: the Unix socket path must stay under ~107 bytes), the
server listens on 127.0.0.1 only, on a port we found free, and TCP logins use SCRAM.

PostgreSQL refuses to run as root. When we are root (CI containers are), a dedicated system user
(`topeng-pg`) is created if missing, owns the directory, and runs `initdb` and `postgres`; the
binaries are made readable by it. The postmaster is started in its own session (Ctrl-C in a
terminal reaches only us) and, on Linux, is told to shut down fast if we die without cleaning up.
`stop()` always runs: explicitly, from a `with` block, or at interpreter exit.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import importlib.util
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO
from urllib.parse import quote

__all__ = [
    "HBA_METHODS",
    "SYSTEM_USER",
    "Cluster",
    "ClusterError",
    "find_bin_dir",
    "free_port",
]

SYSTEM_USER = "topeng-pg"
HBA_METHODS = frozenset({"scram-sha-256", "md5", "password", "trust", "reject"})

_LOOPBACK = "127.0.0.1"
_START_TIMEOUT = 60.0
_PR_SET_PDEATHSIG = 1


class ClusterError(RuntimeError):
    """The embedded cluster could not be set up, started or used."""


def find_bin_dir() -> Path:
    """The directory holding `initdb`, `postgres` and `psql`.

    `TOPENG_TEST_PGBIN` wins; otherwise the binaries bundled in the `pgserver` wheel.
    """
    override = os.environ.get("TOPENG_TEST_PGBIN")
    if override:
        path = Path(override)
        if not (path / "postgres").is_file():
            raise ClusterError(f"TOPENG_TEST_PGBIN={override}: no `postgres` binary there")
        return path
    # find_spec locates the package without importing it (its import has side effects).
    spec = importlib.util.find_spec("pgserver")
    if spec is None or spec.origin is None:
        raise ClusterError(
            "no PostgreSQL binaries: install the `pgserver` package (pip install 'topeng[demo]') "
            "or point TOPENG_TEST_PGBIN at a PostgreSQL bin directory"
        )
    path = Path(spec.origin).parent / "pginstall" / "bin"
    if not (path / "postgres").is_file():
        raise ClusterError(f"the pgserver package has no PostgreSQL binaries in {path}")
    return path


def free_port(host: str = _LOOPBACK) -> int:
    """A TCP port that was free a moment ago (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _clean_env() -> dict[str, str]:
    """Our environment without libpq's PG* variables, which would redirect psql and friends."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    env["LANG"] = "C"
    return env


def _ensure_system_user(name: str) -> tuple[int, int]:
    import pwd

    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        result = subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            capture_output=True,
            text=True,
            check=False,
        )
        try:  # a concurrent run may have created it first; that is fine too
            entry = pwd.getpwnam(name)
        except KeyError:
            raise ClusterError(
                f"running as root, PostgreSQL needs an unprivileged user and `useradd {name}` "
                f"failed: {result.stderr.strip()}"
            ) from None
    return entry.pw_uid, entry.pw_gid


def _ensure_readable(roots: Iterable[Path]) -> None:
    """Let every user traverse to and read the PostgreSQL installation (chmod only if needed)."""
    traverse = stat.S_IXOTH
    read_dir = stat.S_IROTH | stat.S_IXOTH
    for root in roots:
        if not root.exists():
            continue
        for parent in root.resolve().parents:
            mode = parent.stat().st_mode
            if mode & traverse != traverse:
                parent.chmod(mode | traverse)
        for dirpath, _dirnames, filenames in os.walk(root):
            directory = Path(dirpath)
            mode = directory.stat().st_mode
            if mode & read_dir != read_dir:
                directory.chmod(mode | read_dir)
            for filename in filenames:
                file = directory / filename
                if file.is_symlink():
                    continue
                mode = file.stat().st_mode
                wanted = stat.S_IROTH | (stat.S_IXOTH if mode & stat.S_IXUSR else 0)
                if mode & wanted != wanted:
                    file.chmod(mode | wanted)


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    os.chown(path, uid, gid)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in [*dirnames, *filenames]:
            os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to send SIGINT (fast shutdown) to the postmaster if we die.

    The kernel ties this to the thread that forked, so only use it from the main thread.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not (
        threading.main_thread()
    ):
        return None
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return None
    libc = ctypes.CDLL(libc_name, use_errno=True)
    prctl = libc.prctl

    def set_pdeathsig() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGINT, 0, 0, 0)

    return set_pdeathsig


def _remove_stale_runtime_dirs(base: Path, min_age: float = 3600.0) -> None:
    """Delete what clusters of killed processes left behind (their postmaster stopped itself).

    A directory is stale if nothing has touched it for an hour and it has neither a socket
    lock file nor a postmaster.pid, both of which a running postmaster keeps.
    """
    now = time.time()
    for path in base.glob("tpg-*"):
        try:
            if now - path.stat().st_mtime < min_age:
                continue
            if any(path.glob(".s.PGSQL.*")) or (path / "data" / "postmaster.pid").exists():
                continue
        except OSError:
            continue
        shutil.rmtree(path, ignore_errors=True)


def _quote_hba(name: str) -> str:
    if '"' in name or "\n" in name:
        raise ClusterError(f"unsupported user name in pg_hba entry: {name!r}")
    return f'"{name}"'


def _conf_value(value: str | int) -> str:
    if isinstance(value, int):
        return str(value)
    return "'" + value.replace("'", "''") + "'"


class Cluster:
    """A temporary PostgreSQL cluster on 127.0.0.1, deleted by `stop()`.

    `hba` lists `(user, method)` pairs (method: md5, password, scram-sha-256, trust, reject)
    placed before the catch-all SCRAM lines, for tests of other authentication methods. A user
    authenticating with `md5` needs an MD5-encrypted password: see `create_user`.
    """

    def __init__(
        self,
        *,
        password: str | None = None,
        max_connections: int = 100,
        hba: Sequence[tuple[str, str]] = (),
        bin_dir: Path | str | None = None,
        data_dir: Path | str | None = None,
        settings: Mapping[str, str | int] | None = None,
        system_user: str = SYSTEM_USER,
    ) -> None:
        for user, method in hba:
            if method not in HBA_METHODS:
                raise ClusterError(
                    f"pg_hba method for {user!r} must be one of {sorted(HBA_METHODS)}"
                )
            _quote_hba(user)
        self.password = password if password is not None else secrets.token_urlsafe(18)
        self.max_connections = max_connections
        self.hba: tuple[tuple[str, str], ...] = tuple(hba)
        self.bin_dir = Path(bin_dir) if bin_dir is not None else find_bin_dir()
        self._data_dir_arg = Path(data_dir) if data_dir is not None else None
        self._settings = dict(settings or {})
        self._system_user = system_user
        self.host = _LOOPBACK
        self._port: int | None = None
        self._runtime: Path | None = None
        self._data_dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._ids: tuple[int, int] | None = None
        self._lock = threading.Lock()

    # -- addresses ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise ClusterError("the cluster is not running")
        return self._port

    @property
    def data_dir(self) -> Path:
        if self._data_dir is None:
            raise ClusterError("the cluster is not running")
        return self._data_dir

    @property
    def socket_dir(self) -> Path:
        if self._runtime is None:
            raise ClusterError("the cluster is not running")
        return self._runtime

    @property
    def log_path(self) -> Path:
        return self.data_dir / "postgresql.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def superuser_dsn(self) -> str:
        return self.dsn("postgres", self.password, "postgres")

    def dsn(self, user: str, password: str | None = None, database: str = "postgres") -> str:
        """A TCP `postgresql://` URL for this cluster."""
        auth = quote(user, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        return f"postgresql://{auth}@{self.host}:{self.port}/{quote(database, safe='')}"

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Cluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> Cluster:
        with self._lock:
            if self._proc is not None:
                return self
            atexit.register(self.stop)
            try:
                self._setup()
                self._launch()
            except BaseException as exc:
                tail = self.log_tail()
                self._teardown()
                if isinstance(exc, ClusterError):
                    raise ClusterError(f"{exc}\n--- server log ---\n{tail}") from None
                if isinstance(exc, Exception):
                    raise ClusterError(f"{exc}\n--- server log ---\n{tail}") from exc
                raise
            return self

    def stop(self) -> None:
        """Fast shutdown, then delete the temporary files. Safe to call more than once."""
        with self._lock:
            self._teardown()

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except (OSError, ClusterError):
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])

    # -- SQL ---------------------------------------------------------------------------------

    def execute(self, sql: str, *, dbname: str = "postgres") -> str:
        """Run SQL as superuser with psql over the Unix socket; returns unaligned tuples.

        Statements run one by one in autocommit mode (so CREATE DATABASE works); the first
        error stops the script and raises ClusterError.
        """
        psql = self.bin_dir / "psql"
        if not psql.is_file():
            found = shutil.which("psql")
            if found is None:
                raise ClusterError(f"no psql in {self.bin_dir} or on PATH")
            psql = Path(found)
        result = subprocess.run(
            [
                str(psql), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                "-h", str(self.socket_dir), "-p", str(self.port), "-U", "postgres",
                "-d", dbname, "-f", "-",
            ],
            input=sql,
            capture_output=True,
            text=True,
            env=_clean_env(),
            check=False,
            timeout=600,
        )  # fmt: skip
        if result.returncode != 0:
            raise ClusterError(f"psql failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout

    def create_database(self, name: str, *, owner: str = "postgres") -> None:
        self.execute(f"CREATE DATABASE {_ident(name)} OWNER {_ident(owner)};")

    def create_user(
        self,
        name: str,
        password: str,
        *,
        encryption: str = "scram-sha-256",
        attributes: str = "LOGIN",
    ) -> None:
        """CREATE ROLE with a password stored as `encryption` (scram-sha-256 or md5).

        With `md5` in pg_hba, PostgreSQL falls back to SCRAM unless the stored password is MD5.
        """
        if encryption not in ("scram-sha-256", "md5"):
            raise ClusterError(
                f"password encryption must be scram-sha-256 or md5, not {encryption}"
            )
        self.execute(
            f"SET password_encryption = {_conf_value(encryption)};\n"
            f"CREATE ROLE {_ident(name)} {attributes} PASSWORD {_literal(password)};\n"
        )

    # -- internals ---------------------------------------------------------------------------

    def _run_as_owner(self, args: Sequence[str]) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, object] = {}
        if self._ids is not None:
            kwargs = {"user": self._ids[0], "group": self._ids[1], "extra_groups": []}
        return subprocess.run(  # type: ignore[call-overload, no-any-return]
            list(args),
            capture_output=True,
            text=True,
            env=self._owner_env(),
            cwd=self._runtime,
            check=False,
            timeout=300,
            **kwargs,
        )

    def _owner_env(self) -> dict[str, str]:
        env = _clean_env()
        if self._runtime is not None:
            env["HOME"] = str(self._runtime)
        return env

    def _setup(self) -> None:
        base = "/tmp" if os.path.isdir("/tmp") else None
        _remove_stale_runtime_dirs(Path(base or tempfile.gettempdir()))
        self._runtime = Path(tempfile.mkdtemp(prefix="tpg-", dir=base))
        if self._data_dir_arg is not None:
            if self._data_dir_arg.exists() and any(self._data_dir_arg.iterdir()):
                raise ClusterError(f"data directory {self._data_dir_arg} is not empty")
            self._data_dir_arg.mkdir(parents=True, exist_ok=True)
            self._data_dir = self._data_dir_arg.resolve()
        else:
            self._data_dir = self._runtime / "data"
        if os.geteuid() == 0:
            self._ids = _ensure_system_user(self._system_user)
            install = self.bin_dir.resolve().parent
            _ensure_readable([install, install.parent.parent / "pgserver.libs"])
            os.chown(self._runtime, *self._ids)
            if self._data_dir_arg is not None:
                _chown_tree(self._data_dir, *self._ids)
        pwfile = self._runtime / "pwfile"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        if self._ids is not None:
            os.chown(pwfile, *self._ids)
        try:
            result = self._run_as_owner(
                [
                    str(self.bin_dir / "initdb"), "-D", str(self._data_dir), "-U", "postgres",
                    f"--pwfile={pwfile}", "--auth-local=trust", "--auth-host=scram-sha-256",
                    "--encoding=UTF8", "--locale=C", "--no-sync", "--no-instructions",
                ]
            )  # fmt: skip
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            raise ClusterError(f"initdb failed: {result.stderr.strip() or result.stdout.strip()}")
        self._write_hba()
        self._write_conf()

    def _write_hba(self) -> None:
        lines = ["# written by proxy.embedded", "local all all trust"]
        for user, method in self.hba:
            for net in ("127.0.0.1/32", "::1/128"):
                lines.append(f"host all {_quote_hba(user)} {net} {method}")
        lines.append("host all all 127.0.0.1/32 scram-sha-256")
        lines.append("host all all ::1/128 scram-sha-256")
        (self.data_dir / "pg_hba.conf").write_text("\n".join(lines) + "\n")

    def _write_conf(self) -> None:
        settings: dict[str, str | int] = {
            "listen_addresses": _LOOPBACK,
            "unix_socket_directories": str(self.socket_dir),
            "max_connections": self.max_connections,
            "shared_buffers": "32MB",
            "dynamic_shared_memory_type": "mmap",  # containers often have a tiny /dev/shm
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "password_encryption": "scram-sha-256",
            "logging_collector": "off",
            "log_destination": "stderr",
            "log_line_prefix": "%m [%p] %q%u@%d ",
            "lc_messages": "C",
            "timezone": "Asia/Jakarta",
        }
        settings.update(self._settings)
        block = "\n# written by proxy.embedded\n" + "".join(
            f"{key} = {_conf_value(value)}\n" for key, value in settings.items()
        )
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write(block)

    def _launch(self) -> None:
        """Start the postmaster; if another process grabbed our port meanwhile, pick another."""
        for _attempt in range(5):
            port = free_port()
            if self._log_file is not None:
                self._log_file.close()
            self._log_file = self.log_path.open("ab")
            kwargs: dict[str, object] = {}
            if self._ids is not None:
                kwargs = {"user": self._ids[0], "group": self._ids[1], "extra_groups": []}
            self._proc = subprocess.Popen(  # type: ignore[call-overload]
                [str(self.bin_dir / "postgres"), "-D", str(self.data_dir), "-p", str(port)],
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                env=self._owner_env(),
                cwd=self._runtime,
                start_new_session=True,
                preexec_fn=_die_with_parent(),
                **kwargs,
            )
            self._port = port
            if self._wait_ready():
                return
            text = self.log_tail()
            if "could not bind" not in text and "already in use" not in text:
                raise ClusterError(f"postgres exited with code {self._proc.returncode}")
        raise ClusterError("postgres could not bind a free port after 5 attempts")

    def _wait_ready(self) -> bool:
        """True once postmaster.pid says `ready`; False if the process exited."""
        assert self._proc is not None
        pidfile = self.data_dir / "postmaster.pid"
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            try:
                lines = pidfile.read_text().splitlines()
            except OSError:
                lines = []
            if len(lines) >= 8 and lines[7].strip() == "ready":
                return True
            time.sleep(0.02)
        raise ClusterError(f"postgres did not become ready within {_START_TIMEOUT:.0f} s")

    def _teardown(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            for sig, wait in (
                (signal.SIGINT, 30.0),
                (signal.SIGQUIT, 10.0),
                (signal.SIGKILL, 10.0),
            ):
                try:
                    proc.send_signal(sig)
                    proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
                except ProcessLookupError:
                    break
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._runtime is not None:
            shutil.rmtree(self._runtime, ignore_errors=True)
            self._runtime = None
        if self._data_dir_arg is not None and self._ids is not None and self._data_dir is not None:
            # hand a caller-supplied data directory back to us
            _chown_tree(self._data_dir, os.getuid(), os.getgid())
        self._data_dir = None
        self._port = None
        atexit.unregister(self.stop)


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"
