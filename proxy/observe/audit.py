"""The audit log: one JSON line per event (statement, session start and end, authentication
failure, rules reload), to a file or standard output.

Strategy: statements are logged by their normalized text (pglast replaces every constant with a
placeholder), never as typed, so a NIK in a WHERE clause never reaches the log; a statement that
does not parse is logged by its fingerprint alone. Writes are line-buffered appends of whole
lines, so a reader (jq, a log shipper) never sees half an event.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

from proxy.session import StatementRecord


@dataclass(frozen=True, slots=True)
class SessionContext:
    """Who a session is, for every event it logs."""

    session_id: str
    client: str
    user: str
    database: str
    role: str = ""
    tls: bool = False


def normalize(sql: str) -> tuple[str | None, str | None]:
    """(fingerprint, normalized text) of a statement; constants replaced by $n placeholders.

    A statement pglast cannot parse gets no text (it might hold anything), only a hash.
    """
    from pglast import parser  # imported lazily: pglast loads libpg_query

    try:
        fingerprint = str(parser.fingerprint(sql))
    except Exception:  # pglast raises its own ParseError; any failure means "no text"
        import hashlib

        return "sha256:" + hashlib.sha256(sql.encode("utf-8", "replace")).hexdigest()[:16], None
    try:
        text = str(parser.normalize(sql))
    except Exception:
        return fingerprint, None
    return fingerprint, text


class AuditLog:
    """Writes audit events as JSON lines."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._out: TextIO = self._open()

    def _open(self) -> TextIO:
        if self.target == "-":
            return sys.stdout
        return open(self.target, "a", encoding="utf-8", buffering=1)  # noqa: SIM115

    def reopen(self) -> None:
        """Reopen the file (after logrotate moved it away)."""
        if self.target == "-":
            return
        old = self._out
        self._out = self._open()
        old.close()

    def close(self) -> None:
        if self.target != "-":
            self._out.close()

    def _write(self, event: str, fields: dict[str, Any]) -> None:
        line = {"time": _now(), "event": event, **fields}
        self._out.write(json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n")

    def _ctx(self, ctx: SessionContext) -> dict[str, Any]:
        return {
            "session": ctx.session_id,
            "client": ctx.client,
            "user": ctx.user,
            "database": ctx.database,
            "role": ctx.role,
        }

    def session_start(self, ctx: SessionContext) -> None:
        self._write("session_start", {**self._ctx(ctx), "tls": ctx.tls})

    def session_end(
        self,
        ctx: SessionContext,
        *,
        reason: str,
        rows: int,
        bytes_in: int,
        bytes_out: int,
        duration: float,
    ) -> None:
        self._write(
            "session_end",
            {
                **self._ctx(ctx),
                "reason": reason,
                "rows": rows,
                "bytes_in": bytes_in,
                "bytes_out": bytes_out,
                "duration_ms": round(duration * 1000, 3),
            },
        )

    def auth_failure(self, ctx: SessionContext, sqlstate: str, message: str) -> None:
        self._write("auth_failure", {**self._ctx(ctx), "sqlstate": sqlstate, "message": message})

    def statement(self, ctx: SessionContext, record: StatementRecord) -> None:
        fingerprint, text = normalize(record.sql)
        self._write(
            "statement",
            {
                **self._ctx(ctx),
                "fingerprint": fingerprint,
                "statement": text,
                "decision": record.decision,
                "reason": record.reason,
                "rule": record.message,
                "labels_masked": list(record.labels),
                "rows": record.rows,
                "error": record.error,
                "duration_ms": round((record.finished - record.started) * 1000, 3),
            },
        )

    def rules_reload(self, ok: bool, detail: str) -> None:
        self._write("rules_reload", {"result": "ok" if ok else "error", "detail": detail})


def _now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def open_audit_log(target: str) -> AuditLog | None:
    """The audit log for `--audit-log` ("" = none, "-" = standard output, else a file)."""
    if not target:
        return None
    if target != "-":
        parent = os.path.dirname(os.path.abspath(target))
        if not os.path.isdir(parent):
            raise OSError(f"audit log directory {parent} does not exist")
    return AuditLog(target)
