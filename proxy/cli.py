"""The `topeng` command: serve, check, explain, demo, audit."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

from proxy import __version__
from proxy.config import Config, ConfigError, add_serve_arguments, load_config

log = logging.getLogger("topeng")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="topeng",
        description="A PostgreSQL wire-protocol proxy that masks customer data in transit.",
    )
    parser.add_argument("--version", action="version", version=f"topeng {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the proxy")
    add_serve_arguments(serve)

    check = sub.add_parser("check", help="validate rules (with --dsn also against a live schema)")
    check.add_argument("rules", metavar="RULES", help="rules file or directory")
    check.add_argument("--dsn", help="connect here to check labels and masks against the schema")

    explain = sub.add_parser("explain", help="show the role, decision and masks for a statement")
    explain.add_argument("--rules", required=True, help="rules file or directory")
    explain.add_argument("--user", required=True, help="the PostgreSQL user to judge as")
    explain.add_argument("--dsn", help="database to read memberships and the schema from")
    explain.add_argument("--json", action="store_true", help="machine-readable output")
    explain.add_argument("sql", metavar="SQL", help="the statement(s)")

    demo = sub.add_parser("demo", help="embedded PostgreSQL + sample bank data + proxy")
    demo.add_argument("--listen", default="127.0.0.1:6432", help="where the demo proxy listens")
    demo.add_argument("--customers", type=int, default=100_000, help="sample customers to load")
    demo.add_argument(
        "--metrics-listen", default="127.0.0.1:9187", help="where the demo serves /metrics"
    )

    from proxy.auditcli import add_audit_arguments

    add_audit_arguments(sub.add_parser("audit", help="answer questions from an audit log"))
    return parser


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
        stream=sys.stderr,
    )


def _serve(args: argparse.Namespace) -> int:
    try:
        config = load_config(args)
    except ConfigError as exc:
        print(f"topeng: configuration error:\n{exc}", file=sys.stderr)
        return 2
    _setup_logging(config.log_level)
    from proxy.observe import multiproc

    # Before anything imports prometheus_client: the workers' metrics go to shared files.
    metrics_dir = multiproc.prepare() if config.workers > 1 else None
    try:
        return _serve_config(config)
    finally:
        if metrics_dir is not None:
            metrics_dir.cleanup()


def _serve_config(config: Config) -> int:
    from proxy.observe.audit import configure_audit
    from proxy.policy.rules import RulesError
    from proxy.policy.store import RulesStore

    try:
        store = RulesStore(config.rules)
    except RulesError as exc:
        print(f"topeng: the rules do not validate:\n{exc}", file=sys.stderr)
        return 2
    except (LookupError, OSError) as exc:
        print(f"topeng: cannot read the rules' hash_key: {exc}", file=sys.stderr)
        return 2
    try:
        configure_audit(config)
    except (OSError, ValueError) as exc:
        print(f"topeng: cannot read the audit key: {exc}", file=sys.stderr)
        return 2
    if config.workers == 1:
        return _run_worker(config, store)
    return _run_workers(config, store)


def _run_worker(config: Config, store: object) -> int:
    import uvloop

    from proxy.policy.store import RulesStore
    from proxy.server import serve

    assert isinstance(store, RulesStore)
    try:
        uvloop.run(serve(config, store))
    except OSError as exc:
        print(f"topeng: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


def _run_workers(config: Config, store: object) -> int:
    """Fork one process per worker; all listen on the same port (SO_REUSEPORT)."""
    children: list[int] = []
    for _ in range(config.workers):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                from proxy.observe.multiproc import worker_started

                worker_started()
                code = _run_worker(config, store)
            finally:
                os._exit(code)
        children.append(pid)

    def forward(signum: int, _frame: object) -> None:
        for pid in children:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    status = 0
    for pid in children:
        code = 0
        while True:
            try:
                _, code = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
        from proxy.observe.multiproc import worker_exited

        worker_exited(pid)
        if os.waitstatus_to_exitcode(code) not in (0, -signal.SIGTERM, -signal.SIGINT):
            status = 1
    return status


def _check(args: argparse.Namespace) -> int:
    from proxy.policy.checkcli import run_check

    return run_check(args.rules, dsn=args.dsn)


def _explain(args: argparse.Namespace) -> int:
    from proxy.policy.explain import run_explain

    return asyncio.run(
        run_explain(args.rules, user=args.user, dsn=args.dsn, sql=args.sql, as_json=args.json)
    )


def _demo(args: argparse.Namespace) -> int:
    from proxy.demo import run_demo

    return run_demo(
        listen=args.listen, customers=args.customers, metrics_listen=args.metrics_listen
    )


def _audit(args: argparse.Namespace) -> int:
    from proxy.auditcli import run_audit

    return run_audit(args)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    commands = {
        "serve": _serve,
        "check": _check,
        "explain": _explain,
        "demo": _demo,
        "audit": _audit,
    }
    return commands[args.command](args)
