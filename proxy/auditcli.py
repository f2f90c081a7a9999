"""`topeng audit`: the questions a DBA is asked after an incident, answered from the audit log.

    topeng audit [--log PATH] who-saw VALUE [--key-file F]   # who looked up this NIK / id
    topeng audit [--log PATH] readers LABEL                  # who received values of a label
    topeng audit [--log PATH] refused [--user U] [--role R]  # who was refused what
    topeng audit [--log PATH] top-readers                    # who read the most rows
    topeng audit [--log PATH] auth-failures                  # failed logins, by user and client

Every command takes --since / --until (`today`, `yesterday`, `2h`, `30min`, `7d`, an ISO date
or time; times without a zone are local) and --json (one JSON object per line). `--log PATH`
(default: $TOPENG_AUDIT_LOG) also reads the rotated files PATH.N .. PATH.1 (and .gz), oldest
first. The log holds no constants, so "who saw customer X" is answered by the keyed hashes of
the constants a statement was written with (needs the audit key, and misses values sent as
bind parameters of the extended protocol); see docs/operations.md.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

Event = dict[str, Any]


def add_audit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log",
        action="append",
        metavar="PATH",
        help="audit log file (repeatable; rotated PATH.N files are read too) [TOPENG_AUDIT_LOG]",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--since", help="from this time: today, yesterday, 2h, 7d, ISO date/time")
    common.add_argument("--until", help="up to this time (same forms)")
    common.add_argument("--json", action="store_true", help="one JSON object per line")
    sub = parser.add_subparsers(dest="audit_command", required=True, metavar="QUESTION")

    who = sub.add_parser(
        "who-saw",
        parents=[common],
        help="who ran statements written with this constant (a NIK, a customer id)",
    )
    who.add_argument("value", metavar="VALUE", help="the value as it would be typed in SQL")
    who.add_argument(
        "--key-file", help="the audit key the proxy used [TOPENG_AUDIT_KEY_FILE]", metavar="FILE"
    )

    readers = sub.add_parser(
        "readers", parents=[common], help="who received (masked) values of a label, by user"
    )
    readers.add_argument("label", metavar="LABEL", help="a label of the rules, e.g. nik")

    refused = sub.add_parser("refused", parents=[common], help="refused statements")
    refused.add_argument("--user", help="only this user")
    refused.add_argument("--role", help="only this role")
    refused.add_argument("--reason", help="only this reason (column, row_limit, ...)")

    top = sub.add_parser("top-readers", parents=[common], help="users by rows read")
    top.add_argument("--limit", type=int, default=10, help="how many users (default 10)")

    sub.add_parser("auth-failures", parents=[common], help="failed logins by user and client")


# -- reading


def log_files(path: str) -> list[Path]:
    """PATH's rotated siblings, oldest first (PATH.N[.gz] .. PATH.1[.gz]), then PATH itself."""
    base = Path(path)
    rotated: list[tuple[int, Path]] = []
    if base.parent.is_dir():
        pattern = re.compile(re.escape(base.name) + r"\.(\d+)(\.gz)?")
        for p in base.parent.iterdir():
            match = pattern.fullmatch(p.name)
            if match:
                rotated.append((int(match.group(1)), p))
    out = [p for _, p in sorted(rotated, key=lambda t: -t[0])]
    if base.exists():
        out.append(base)
    return out


def _open(path: Path) -> TextIO:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")  # noqa: SIM115


def read_events(paths: Iterable[Path]) -> Iterator[Event]:
    """Every event of the files; lines that are not JSON objects (a torn tail) are skipped."""
    for path in paths:
        with _open(path) as fh:
            for line in fh:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if isinstance(event, dict):
                    yield event


def parse_when(text: str, *, now: datetime | None = None) -> datetime:
    """`today`, `yesterday`, `now`, `2h` / `30min` / `7d` / `45s` ago, or an ISO date or time."""
    now = now or datetime.now().astimezone()
    low = text.strip().lower()
    if low == "now":
        return now
    if low in ("today", "yesterday"):
        midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
        return midnight - timedelta(days=1) if low == "yesterday" else midnight
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|min|m|h|d|w)", low)
    if match:
        unit = {"s": 1, "min": 60, "m": 60, "h": 3600, "d": 86400, "w": 604800}[match.group(2)]
        return now - timedelta(seconds=float(match.group(1)) * unit)
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        try:
            day = date.fromisoformat(text.strip())
        except ValueError:
            raise ValueError(
                f"cannot read the time {text!r}: use today, yesterday, 2h, 7d or an ISO date/time"
            ) from None
        when = datetime(day.year, day.month, day.day)
    if when.tzinfo is None:
        when = when.astimezone()  # local time
    return when


def event_time(event: Event) -> datetime | None:
    text = event.get("time")
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


@dataclass
class Window:
    since: datetime | None = None
    until: datetime | None = None

    def __contains__(self, event: Event) -> bool:
        if self.since is None and self.until is None:
            return True
        when = event_time(event)
        if when is None:
            return False
        if self.since is not None and when < self.since:
            return False
        return self.until is None or when < self.until


# -- the questions


def who_saw(events: Iterable[Event], digest: str) -> list[Event]:
    """Statements whose constants included the value with this keyed hash."""
    return [
        e for e in events if e.get("event") == "statement" and digest in (e.get("lookups") or ())
    ]


def refused(
    events: Iterable[Event],
    *,
    user: str | None = None,
    role: str | None = None,
    reason: str | None = None,
) -> list[Event]:
    out = []
    for e in events:
        if e.get("event") != "statement" or e.get("decision") != "refused":
            continue
        if user is not None and e.get("user") != user:
            continue
        if role is not None and e.get("role") != role:
            continue
        if reason is not None and e.get("reason") != reason:
            continue
        out.append(e)
    return out


@dataclass
class ReaderTotals:
    user: str
    roles: set[str] = field(default_factory=set)
    rows: int = 0
    statements: int = 0
    sessions: set[str] = field(default_factory=set)

    def as_json(self) -> dict[str, Any]:
        return {
            "user": self.user,
            "roles": sorted(self.roles),
            "rows": self.rows,
            "statements": self.statements,
            "sessions": len(self.sessions),
        }


def top_readers(events: Iterable[Event]) -> list[ReaderTotals]:
    """Rows read per user, most first.

    Statement events count their rows; a session without statement events (an unrestricted
    session on the fast path, whose statements are not logged) counts the rows of its
    session_end.
    """
    totals: dict[str, ReaderTotals] = {}
    with_statements: set[str] = set()
    ends: list[Event] = []

    def entry(e: Event) -> ReaderTotals:
        user = str(e.get("user") or "")
        found = totals.get(user)
        if found is None:
            found = totals[user] = ReaderTotals(user)
        if e.get("role"):
            found.roles.add(str(e["role"]))
        if e.get("session"):
            found.sessions.add(str(e["session"]))
        return found

    for e in events:
        kind = e.get("event")
        if kind == "statement":
            with_statements.add(str(e.get("session")))
            t = entry(e)
            t.statements += 1
            t.rows += int(e.get("rows") or 0)
        elif kind == "session_end":
            ends.append(e)
    for e in ends:
        if str(e.get("session")) not in with_statements:
            entry(e).rows += int(e.get("rows") or 0)
    return sorted(totals.values(), key=lambda t: (-t.rows, t.user))


def readers(events: Iterable[Event], label: str) -> list[ReaderTotals]:
    """Per user, the statements that returned values of `label` (masked) and their rows."""
    chosen = [
        e
        for e in events
        if e.get("event") == "statement" and label in (e.get("labels_masked") or ())
    ]
    return top_readers(chosen)


def auth_failures(events: Iterable[Event]) -> list[dict[str, Any]]:
    counts: dict[tuple[str, str], dict[str, Any]] = {}
    for e in events:
        if e.get("event") != "auth_failure":
            continue
        client = str(e.get("client") or "").rsplit(":", 1)[0]
        key = (str(e.get("user") or ""), client)
        row = counts.setdefault(
            key, {"user": key[0], "client": client, "failures": 0, "first": None, "last": None}
        )
        row["failures"] += 1
        row["first"] = row["first"] or e.get("time")
        row["last"] = e.get("time")
    return sorted(counts.values(), key=lambda r: (-r["failures"], r["user"]))


# -- output


def _statement_line(e: Event) -> str:
    parts = [
        str(e.get("time", "")),
        f"user={e.get('user', '')}",
        f"role={e.get('role', '')}",
        f"client={e.get('client', '')}",
        f"decision={e.get('decision', '')}",
    ]
    if e.get("decision") == "refused":
        parts.append(f"reason={e.get('reason', '')}")
    else:
        parts.append(f"rows={e.get('rows', 0)}")
    if e.get("labels_masked"):
        parts.append("masked=" + ",".join(e["labels_masked"]))
    statement = e.get("statement") or f"(unparsed, fingerprint {e.get('fingerprint')})"
    parts.append(str(statement))
    return "  ".join(parts)


def _print(items: list[Any], as_json: bool, out: TextIO) -> None:
    for item in items:
        if as_json:
            print(json.dumps(item, ensure_ascii=False), file=out)
        elif isinstance(item, dict) and item.get("event") == "statement":
            print(_statement_line(item), file=out)
        elif isinstance(item, dict):
            print("  ".join(f"{k}={v}" for k, v in item.items()), file=out)
        else:
            print(item, file=out)


def _print_totals(totals: list[ReaderTotals], as_json: bool, out: TextIO) -> None:
    if as_json:
        for t in totals:
            print(json.dumps(t.as_json(), ensure_ascii=False), file=out)
        return
    print(f"{'user':<24} {'roles':<16} {'rows':>10} {'statements':>10} {'sessions':>8}", file=out)
    for t in totals:
        roles = ",".join(sorted(t.roles))
        print(
            f"{t.user:<24} {roles:<16} {t.rows:>10} {t.statements:>10} {len(t.sessions):>8}",
            file=out,
        )


def run_audit(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    env_log = os.environ.get("TOPENG_AUDIT_LOG")
    logs: list[str] = args.log or ([env_log] if env_log and env_log != "-" else [])
    if not logs:
        print("topeng audit: give --log PATH (or set TOPENG_AUDIT_LOG)", file=sys.stderr)
        return 2
    paths: list[Path] = []
    for log in logs:
        found = log_files(log)
        if not found:
            print(f"topeng audit: {log}: no such file", file=sys.stderr)
            return 2
        paths.extend(found)
    try:
        window = Window(
            parse_when(args.since) if args.since else None,
            parse_when(args.until) if args.until else None,
        )
    except ValueError as exc:
        print(f"topeng audit: {exc}", file=sys.stderr)
        return 2
    events = (e for e in read_events(paths) if e in window)
    command = args.audit_command
    if command == "who-saw":
        from proxy.observe.audit import hash_constant, read_key

        key_file = args.key_file or os.environ.get("TOPENG_AUDIT_KEY_FILE")
        if not key_file:
            print(
                "topeng audit who-saw: needs the audit key (--key-file or TOPENG_AUDIT_KEY_FILE):"
                " the log holds keyed hashes of constants, never the constants",
                file=sys.stderr,
            )
            return 2
        try:
            key = read_key(key_file)
        except (OSError, ValueError) as exc:
            print(f"topeng audit: cannot read the audit key: {exc}", file=sys.stderr)
            return 2
        _print(who_saw(events, hash_constant(key, args.value)), args.json, out)
    elif command == "refused":
        _print(refused(events, user=args.user, role=args.role, reason=args.reason), args.json, out)
    elif command == "top-readers":
        _print_totals(top_readers(events)[: max(0, args.limit)], args.json, out)
    elif command == "readers":
        _print_totals(readers(events, args.label), args.json, out)
    elif command == "auth-failures":
        _print(auth_failures(events), args.json, out)
    return 0


__all__ = [
    "add_audit_arguments",
    "auth_failures",
    "log_files",
    "parse_when",
    "read_events",
    "readers",
    "refused",
    "run_audit",
    "top_readers",
    "who_saw",
]
