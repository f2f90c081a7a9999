"""The audit log: one JSON line per event (statement, session start and end, authentication
failure, rules reload), to a file or standard output.

Strategy: statements are logged by their normalized text (pglast replaces every constant with a
placeholder), never as typed, so a NIK in a WHERE clause never reaches the log; a statement that
does not parse is logged by its fingerprint alone. With an audit key (`audit_key_file`) the
constants are also logged as keyed hashes (HMAC-SHA256, truncated to 128 bits): a DBA who holds
the key can answer "who looked up NIK X" by hashing X the same way (`topeng audit who-saw X`),
while the log alone reveals nothing (a NIK has ~10^9 likely values: brute force needs the key).

Each event is one `write()` of one whole line to a file opened with O_APPEND, so the worker
processes of `--workers N` can share one file and a reader (jq, a log shipper) never sees half
an event. The file is reopened on SIGHUP (logrotate's `postrotate`), or rotated by size here
(`audit_max_bytes`): PATH -> PATH.1 -> ... -> PATH.N (`audit_keep`), under an flock on the
log's directory so that concurrent workers rotate once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import hmac
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from proxy.config import Config
    from proxy.session import StatementRecord

log = logging.getLogger("topeng.audit")

#: Domain separation for the constant hashes, so they never equal another use of the same key.
HMAC_CONTEXT = b"topeng-audit-constant-v1\0"
MAX_HASHED_CONSTANTS = 32
MIN_KEY_BYTES = 16


@dataclass(frozen=True, slots=True)
class SessionContext:
    """Who a session is, for every event it logs."""

    session_id: str
    client: str
    user: str
    database: str
    role: str = ""
    tls: bool = False


@dataclass(frozen=True, slots=True)
class AuditSettings:
    """What `open_audit_log` does beyond the target; set from the configuration at startup."""

    max_bytes: int = 0
    keep: int = 5
    key: bytes | None = None


_settings = AuditSettings()


def read_key(path: str) -> bytes:
    """The audit key in a file (surrounding whitespace ignored); at least 16 bytes."""
    with open(path, "rb") as fh:
        key = fh.read().strip()
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"{path}: an audit key needs at least {MIN_KEY_BYTES} bytes")
    return key


def configure_audit(config: Config) -> None:
    """Take rotation and the audit key from the configuration (raises OSError, ValueError)."""
    global _settings
    key = read_key(config.audit_key_file) if config.audit_key_file else None
    _settings = AuditSettings(max_bytes=config.audit_max_bytes, keep=config.audit_keep, key=key)


def normalize(sql: str) -> tuple[str | None, str | None]:
    """(fingerprint, normalized text) of a statement; constants replaced by $n placeholders.

    A statement pglast cannot parse gets no text (it might hold anything), only a hash.
    """
    from pglast import parser  # imported lazily: pglast loads libpg_query

    try:
        fingerprint = str(parser.fingerprint(sql))
    except Exception:  # pglast raises its own ParseError; any failure means "no text"
        return "sha256:" + hashlib.sha256(sql.encode("utf-8", "replace")).hexdigest()[:16], None
    try:
        text = str(parser.normalize(sql))
    except Exception:
        return fingerprint, None
    return fingerprint, text


_MAIN_VERBS = frozenset({"select", "insert", "update", "delete", "merge", "values", "table"})


def statement_kinds(text: str) -> list[str]:
    """The kind of each statement (its first keyword; for WITH, the main statement's verb)."""
    from pglast import parser

    try:
        tokens = parser.scan(text)
    except Exception:
        return []
    kinds: list[str] = []
    depth = 0
    expecting = True
    in_with = False
    for token in tokens:
        name = token.name
        word = text[token.start : token.end + 1].lower()
        if name == "ASCII_59" and depth == 0:  # ;
            expecting, in_with = True, False
        elif name == "ASCII_40":  # (
            depth += 1
        elif name == "ASCII_41":  # )
            depth -= 1
        elif expecting and token.kind != "NO_KEYWORD":
            expecting = False
            if word == "with":
                in_with = True
            else:
                kinds.append(word)
        elif in_with and depth == 0 and word in _MAIN_VERBS:
            kinds.append(word)
            in_with = False
    return kinds


def constant_text(token_name: str, raw: str) -> str | None:
    """The value a literal token stands for, as a user would type it to `topeng audit who-saw`."""
    if token_name in ("ICONST", "FCONST"):
        return raw
    if token_name != "SCONST":
        return None
    if raw.startswith("$"):  # dollar quoting: $tag$...$tag$
        end = raw.find("$", 1)
        tag = raw[: end + 1]
        return raw[len(tag) : len(raw) - len(tag)]
    if raw[:1] in ("E", "e"):
        raw = raw[1:]
    if len(raw) >= 2 and raw[0] == "'" and raw[-1] == "'":
        return raw[1:-1].replace("''", "'")
    return raw


def hash_constant(key: bytes, value: str) -> str:
    """The keyed hash of one constant as logged in `lookups` (value stripped of whitespace)."""
    digest = hmac.new(key, HMAC_CONTEXT + value.strip().encode("utf-8"), hashlib.sha256)
    return digest.hexdigest()[:32]


def constant_hashes(key: bytes, sql: str) -> list[str]:
    """Keyed hashes of the distinct constants written in a statement (at most 32)."""
    from pglast import parser

    try:
        tokens = parser.scan(sql)
    except Exception:
        return []
    out: list[str] = []
    for token in tokens:
        value = constant_text(token.name, sql[token.start : token.end + 1])
        if value is None:
            continue
        digest = hash_constant(key, value)
        if digest not in out:
            out.append(digest)
            if len(out) >= MAX_HASHED_CONSTANTS:
                break
    return out


class AuditLog:
    """Writes audit events as JSON lines."""

    def __init__(
        self, target: str, *, max_bytes: int = 0, keep: int = 5, key: bytes | None = None
    ) -> None:
        self.target = target
        self.max_bytes = max_bytes if target != "-" else 0
        self.keep = max(1, keep)
        self.key = key
        self.failed = False
        self._fd = self._open()

    def _open(self) -> int:
        if self.target == "-":
            return sys.stdout.fileno()
        return os.open(self.target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def reopen(self) -> None:
        """Reopen the file (after logrotate moved it away)."""
        if self.target == "-":
            return
        old = self._fd
        self._fd = self._open()
        os.close(old)

    def close(self) -> None:
        if self.target != "-":
            with contextlib.suppress(OSError):
                os.close(self._fd)

    # -- writing

    def _write(self, event: str, fields: dict[str, Any]) -> None:
        line = {"time": _now(), "event": event, **fields}
        data = (json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        try:
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            if self.max_bytes:
                self._maybe_rotate()
        except OSError as exc:
            if not self.failed:
                log.error("cannot write the audit log %s: %s", self.target, exc)
            self.failed = True
        else:
            self.failed = False

    def _maybe_rotate(self) -> None:
        mine = os.fstat(self._fd)
        if mine.st_size < self.max_bytes:
            return
        with _locked_directory(os.path.dirname(os.path.abspath(self.target))):
            try:
                current = os.stat(self.target)
            except FileNotFoundError:
                current = None
            same = current is not None and (current.st_dev, current.st_ino) == (
                mine.st_dev,
                mine.st_ino,
            )
            if same and current is not None and current.st_size >= self.max_bytes:
                self._shift()
            # Rotated by us or by another worker: write to the file now at the path.
            self.reopen()

    def _shift(self) -> None:
        base = self.target
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{base}.{self.keep}")
        for n in range(self.keep - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.rename(f"{base}.{n}", f"{base}.{n + 1}")
        os.rename(base, f"{base}.1")

    # -- events

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
        kinds = statement_kinds(text) if text is not None else []
        fields: dict[str, Any] = {
            **self._ctx(ctx),
            "kind": ",".join(dict.fromkeys(kinds)) or None,
            "fingerprint": fingerprint,
            "statement": text,
            "decision": record.decision,
            "reason": record.reason,
            "rule": record.message,
            "labels_masked": list(record.labels),
            "rows": record.rows,
            "error": record.error,
            "duration_ms": round(max(0.0, record.finished - record.started) * 1000, 3),
        }
        if self.key is not None:
            fields["lookups"] = constant_hashes(self.key, record.sql)
        self._write("statement", fields)

    def rules_reload(self, ok: bool, detail: str) -> None:
        self._write("rules_reload", {"result": "ok" if ok else "error", "detail": detail})


@contextlib.contextmanager
def _locked_directory(path: str) -> Iterator[None]:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                break
            except OSError as exc:
                if exc.errno != errno.EINTR:
                    raise
        yield
    finally:
        os.close(fd)  # releases the lock


def _now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def open_audit_log(target: str, settings: AuditSettings | None = None) -> AuditLog | None:
    """The audit log for `--audit-log` ("" = none, "-" = standard output, else a file)."""
    if not target:
        return None
    if target != "-":
        parent = os.path.dirname(os.path.abspath(target))
        if not os.path.isdir(parent):
            raise OSError(f"audit log directory {parent} does not exist")
    s = settings or _settings
    return AuditLog(target, max_bytes=s.max_bytes, keep=s.keep, key=s.key)
