"""`topeng demo`: embedded PostgreSQL, a sample bank, and Topeng in front of it.

Strategy: everything the demo starts is a child process (PostgreSQL, then `python -m proxy
serve`) in its own session, so Ctrl-C reaches only us and we stop them in order: proxy first,
then the cluster. The cluster lives in a fresh temporary directory and is deleted at the end.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, Protocol, TextIO

from proxy.embedded import Cluster, ClusterError
from proxy.sampledata import DEMO_USER_ROLES, DEMO_USERS, load_sample_sync

__all__ = ["find_rules", "run_demo"]

_READY_TIMEOUT = 30.0


class _Say(Protocol):
    def __call__(self, line: str = "") -> None: ...


def find_rules() -> Path | None:
    """The bank rules: `rules/bank.yaml` of the source tree, else the copy in the package."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[1] / "rules" / "bank.yaml", here.parent / "data" / "bank.yaml"):
        if candidate.is_file():
            return candidate
    return None


def _split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--listen must be HOST:PORT, not {listen!r}")
    return (host.strip("[]") or "127.0.0.1"), int(port)


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _stop_proxy(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_demo(
    *,
    listen: str = "127.0.0.1:6432",
    customers: int = 100_000,
    metrics_listen: str = "127.0.0.1:9187",
    out: TextIO | None = None,
) -> int:
    """Run the demo until Ctrl-C or SIGTERM. Returns the process exit code."""
    stream = out if out is not None else sys.stdout

    def say(line: str = "") -> None:
        print(line, file=stream, flush=True)

    try:
        host, port = _split_listen(listen)
    except ValueError as exc:
        say(f"topeng demo: {exc}")
        return 2
    rules = find_rules()
    if rules is None:
        say("topeng demo: cannot find rules/bank.yaml (neither in the source tree nor packaged)")
        return 2
    if _accepts(host, port):
        say(f"topeng demo: {host}:{port} is already in use; pick another with --listen")
        return 2

    stop = threading.Event()
    serving = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()
        if not serving:  # still setting up: abandon whatever step this is
            raise _Interrupted

    previous = _handle_signals(on_signal)
    cluster = Cluster(max_connections=200)
    proxy: subprocess.Popen[bytes] | None = None
    workdir = tempfile.TemporaryDirectory(prefix="topeng-demo-")
    try:
        say("Starting PostgreSQL ...")
        cluster.start()
        cluster.create_database("bank")
        say(f"Loading {customers:,} sample customers into database `bank` ...")
        started = time.monotonic()
        counts = load_sample_sync(
            cluster.dsn("postgres", cluster.password, "bank"), customers=customers
        )
        say(
            f"  {counts['customers']:,} customers, {counts['accounts']:,} accounts, "
            f"{counts['transactions']:,} transactions in {time.monotonic() - started:.1f} s"
        )
        stderr_path = Path(workdir.name) / "topeng.log"
        with stderr_path.open("wb") as stderr_file:
            proxy = subprocess.Popen(
                [
                    sys.executable, "-m", "proxy", "serve",
                    "--listen", listen,
                    "--upstream", f"postgresql://{cluster.host}:{cluster.port}",
                    "--rules", str(rules),
                    "--metrics-listen", metrics_listen,
                ],
                stdin=subprocess.DEVNULL,
                stdout=stderr_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        serving = True
        deadline = time.monotonic() + _READY_TIMEOUT
        while not stop.is_set() and proxy.poll() is None and time.monotonic() < deadline:
            if _accepts(host, port):
                _print_banner(say, host, port, cluster, rules, metrics_listen, stderr_path)
                while not stop.wait(0.5) and proxy.poll() is None:
                    pass
                break
            time.sleep(0.1)
        if stop.is_set():
            say("\nStopping ...")
            return 0
        if proxy.poll() is None:
            say(f"topeng demo: the proxy did not accept connections within {_READY_TIMEOUT:.0f} s")
        else:
            say(f"topeng demo: the proxy exited with code {proxy.returncode}")
        say(stderr_path.read_text(errors="replace").rstrip())
        return 1
    except _Interrupted:
        say("\nStopping ...")
        return 0
    except ClusterError as exc:
        say(f"topeng demo: {exc}")
        return 1
    finally:
        serving = True  # a second Ctrl-C must not interrupt the cleanup
        if proxy is not None:
            _stop_proxy(proxy)
        cluster.stop()
        workdir.cleanup()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _Interrupted(BaseException):
    """Ctrl-C or SIGTERM while the demo was still setting up."""


_Handler = Callable[[int, FrameType | None], None]


def _handle_signals(handler: _Handler) -> dict[signal.Signals, Any]:
    """Install `handler` for SIGINT and SIGTERM; returns the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}  # only the main thread may set handlers; the caller handles signals then
    return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}


def _print_banner(
    say: _Say,
    host: str,
    port: int,
    cluster: Cluster,
    rules: Path,
    metrics_listen: str,
    log: Path,
) -> None:
    say()
    say(f"Topeng is listening on {host}:{port} with rules {rules}")
    say("Connect as one of the demo users (the role each gets is on the right):")
    say()
    commands = {
        user: f'  psql "postgresql://{user}:{password}@{host}:{port}/bank"'
        for user, password in DEMO_USERS.items()
    }
    width = max(len(c) for c in commands.values())
    for user, command in commands.items():
        say(f"{command.ljust(width)}  # {DEMO_USER_ROLES.get(user, '')}")
    say()
    say("Try:  SELECT full_name, nik, no_hp, penghasilan FROM customers LIMIT 5;")
    say()
    say(f'PostgreSQL itself, unmasked:  psql "{cluster.dsn("postgres", cluster.password, "bank")}"')
    say(f"Metrics:  http://{metrics_listen}/metrics      Proxy log:  {log}")
    say("Press Ctrl-C to stop.")


def main() -> int:  # `python -m proxy.demo [CUSTOMERS]`, before the CLI wires `topeng demo`
    return run_demo(customers=int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)


if __name__ == "__main__":
    raise SystemExit(main())
