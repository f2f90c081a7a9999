"""The audit log of a running Topeng: what one statement, session, failed login and reload
write; that constants (a NIK typed in a WHERE clause) never reach it; reopening on SIGHUP;
rotation by size; and `topeng audit` answering questions from it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from harness import REPO_ROOT, PgServer, TopengProcess

from proxy.observe.audit import hash_constant
from proxy.sampledata import DEMO_USERS

StartTopeng = Callable[..., TopengProcess]
AUDIT_KEY = b"0123456789abcdef-test-audit-key"


def events(path: Path, *, rotated: bool = False) -> list[dict[str, Any]]:
    """The events of the file (with `rotated`, of PATH.N .. PATH.1 first)."""
    paths = [path]
    if rotated:
        siblings = [p for p in path.parent.glob(path.name + ".*") if p.suffix[1:].isdigit()]
        paths = sorted(siblings, key=lambda p: -int(p.suffix[1:])) + paths
    return [json.loads(line) for p in paths for line in _lines(p)]


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:  # absent, or rotated away between the listing and the read
        return []


def wait_for_event(
    path: Path, check: Callable[[dict[str, Any]], bool], what: str, *, rotated: bool = False
) -> None:
    deadline = time.monotonic() + 15
    while not any(check(e) for e in events(path, rotated=rotated)):
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} in the audit log:\n{path.read_text() if path.exists() else ''}")
        time.sleep(0.1)


def connect(proxy: TopengProcess, user: str) -> psycopg.Connection[tuple[Any, ...]]:
    return psycopg.connect(proxy.dsn(user, DEMO_USERS[user]), autocommit=True)


def audit_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "audit", *args],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=60, check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("TOPENG_")},
    )  # fmt: skip


@pytest.fixture(scope="module")
def a_nik(pg: PgServer) -> str:
    with psycopg.connect(pg.superuser_dsn) as conn:
        row = conn.execute("SELECT nik FROM bank.customers WHERE id = 7").fetchone()
    assert row is not None and len(row[0]) == 16
    return str(row[0])


def test_statement_with_a_nik_is_logged_without_it(
    start_topeng: StartTopeng, tmp_path: Path, a_nik: str
) -> None:
    log = tmp_path / "audit.jsonl"
    key = tmp_path / "audit.key"
    key.write_bytes(AUDIT_KEY + b"\n")
    proxy = start_topeng("--audit-log", str(log), "--audit-key-file", str(key))
    with connect(proxy, "agent_citra") as conn:
        row = conn.execute(f"select id from bank.customers where nik = '{a_nik}'").fetchone()
        assert row == (7,)
        masked = conn.execute(f"select nik, full_name from bank.customers where nik = '{a_nik}'")
        assert masked.fetchone()[0] == a_nik[:6] + "*" * 10
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(
                f"select nama_ibu_kandung from bank.customers where nik = '{a_nik}'"
            ).fetchall()
    wait_for_event(log, lambda e: e["event"] == "session_end", "session_end")
    text = log.read_text()
    assert a_nik not in text
    assert a_nik[-4:] + "'" not in text and a_nik[6:] not in text  # no tail of it either
    statements = [e for e in events(log) if e["event"] == "statement"]
    assert len(statements) == 3
    first, second, third = statements
    assert first["statement"] == "select id from bank.customers where nik = $1"
    assert first["kind"] == "select"
    assert first["decision"] == "allowed"
    assert (first["user"], first["role"], first["database"]) == ("agent_citra", "agent", "bank")
    assert first["client"].startswith("127.0.0.1:")
    assert first["rows"] == 1 and first["labels_masked"] == []
    assert first["fingerprint"] and first["duration_ms"] >= 0
    assert first["session"] == second["session"] == third["session"]
    assert hash_constant(AUDIT_KEY, a_nik) in first["lookups"]
    assert second["decision"] == "masked" and second["labels_masked"] == ["nik"]
    assert third["decision"] == "refused" and third["error"] == "42501"
    assert third["reason"] and "topeng:" in third["rule"]
    # who-saw: the DBA hashes the NIK with the same key and finds the lookups.
    found = audit_cli("--log", str(log), "who-saw", a_nik, "--key-file", str(key), "--json")
    assert found.returncode == 0, found.stderr
    hits = [json.loads(line) for line in found.stdout.splitlines()]
    assert [h["decision"] for h in hits] == ["allowed", "masked", "refused"]
    assert {h["user"] for h in hits} == {"agent_citra"}
    other = audit_cli("--log", str(log), "who-saw", "3171000000000000", "--key-file", str(key))
    assert other.returncode == 0 and other.stdout == ""
    nokey = audit_cli("--log", str(log), "who-saw", a_nik)
    assert nokey.returncode == 2 and "audit key" in nokey.stderr


def test_sessions_auth_failures_and_reloads(start_topeng: StartTopeng, tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    proxy = start_topeng("--audit-log", str(log))
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(proxy.dsn("agent_citra", "wrong-password"))
    with connect(proxy, "dba_ani") as conn:
        conn.execute("SELECT id FROM bank.customers WHERE id <= 5").fetchall()
    proxy.send_signal(signal.SIGHUP)
    wait_for_event(log, lambda e: e["event"] == "rules_reload", "rules_reload")
    wait_for_event(log, lambda e: e["event"] == "session_end", "session_end")
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for e in events(log):
        by_kind.setdefault(e["event"], []).append(e)
    (failure,) = by_kind["auth_failure"]
    assert failure["user"] == "agent_citra" and failure["sqlstate"] == "28P01"
    assert failure["client"].startswith("127.0.0.1:")
    (start,) = by_kind["session_start"]
    (end,) = by_kind["session_end"]
    assert start["session"] == end["session"]
    assert (start["user"], start["role"], start["tls"]) == ("dba_ani", "dba", False)
    assert end["reason"] == "ok" and end["rows"] == 5
    assert end["bytes_in"] > 0 and end["bytes_out"] > 0 and end["duration_ms"] > 0
    (reload,) = by_kind["rules_reload"]
    assert reload["result"] == "ok"
    # Unrestricted sessions run on the fast path: their statements are not logged one by one.
    assert "statement" not in by_kind
    top = audit_cli("--log", str(log), "top-readers", "--since", "today", "--json")
    assert top.returncode == 0, top.stderr
    assert json.loads(top.stdout.splitlines()[0])["user"] == "dba_ani"
    failures = audit_cli("--log", str(log), "auth-failures", "--json")
    assert json.loads(failures.stdout)["user"] == "agent_citra"


def test_reopened_on_sighup(start_topeng: StartTopeng, tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    moved = tmp_path / "audit.jsonl.old"
    proxy = start_topeng("--audit-log", str(log))
    with connect(proxy, "agent_citra") as conn:
        conn.execute("SELECT 1").fetchall()
    wait_for_event(log, lambda e: e["event"] == "session_end", "the first session's end")
    log.rename(moved)  # what logrotate does
    proxy.send_signal(signal.SIGHUP)
    wait_for_event(log, lambda e: e["event"] == "rules_reload", "the reload, in the new file")
    with connect(proxy, "agent_citra") as conn:
        conn.execute("SELECT 2").fetchall()
    wait_for_event(log, lambda e: e["event"] == "session_end", "the second session's end")
    old = [e for e in events(moved) if e["event"] == "statement"]
    new = [e for e in events(log) if e["event"] == "statement"]
    assert [e["statement"] for e in old] == ["SELECT $1"]
    assert [e["statement"] for e in new] == ["SELECT $1"]
    assert old[0]["session"] != new[0]["session"]
    assert not [e for e in events(moved) if e["event"] == "rules_reload"]


def test_rotated_by_size(start_topeng: StartTopeng, tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    proxy = start_topeng("--audit-log", str(log), "--audit-max-bytes", "2kB", "--audit-keep", "2")
    with connect(proxy, "agent_citra") as conn:
        for i in range(40):
            conn.execute(f"SELECT id, city FROM bank.customers WHERE id = {i + 1}").fetchall()
    wait_for_event(log, lambda e: e["event"] == "session_end", "session_end", rotated=True)
    expected = ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    # The last line may have started a rotation (renames, then a new file): let it finish.
    deadline = time.monotonic() + 10
    while True:
        names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("audit.jsonl"))
        if names == expected or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert names == expected
    for name in names[1:]:
        path = tmp_path / name
        assert events(path)  # whole JSON lines only
        # Rotated once it reached 2kB: past it by less than one line.
        assert 2048 <= path.stat().st_size < 2048 + 1024
    events(log)  # the current one may have just been started: whole lines, if any
    # `topeng audit` reads the rotated files too: the last 3 files hold the newest statements.
    top = audit_cli("--log", str(log), "top-readers", "--json")
    assert top.returncode == 0, top.stderr
    (reader,) = [json.loads(line) for line in top.stdout.splitlines()]
    assert reader["user"] == "agent_citra" and 0 < reader["statements"] < 40


def test_refused_report(start_topeng: StartTopeng, tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    proxy = start_topeng("--audit-log", str(log))
    with connect(proxy, "ai_helper") as conn:
        with pytest.raises(psycopg.errors.ProgramLimitExceeded):
            conn.execute("SELECT id FROM bank.customers").fetchall()
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DELETE FROM bank.customers WHERE id = 1")
    with connect(proxy, "agent_citra") as conn:
        conn.execute("SELECT id FROM bank.customers WHERE id = 1").fetchall()
    wait_for_event(
        log, lambda e: e["event"] == "session_end" and e["user"] == "agent_citra", "session_end"
    )
    out = audit_cli("--log", str(log), "refused", "--user", "ai_helper", "--json")
    assert out.returncode == 0, out.stderr
    refused = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(r["kind"], r["reason"]) for r in refused][0] == ("select", "row_limit")
    assert refused[1]["kind"] == "delete" and refused[1]["error"] == "42501"
    plain = audit_cli("--log", str(log), "refused")
    assert plain.stdout.count("user=ai_helper") == 2 and "agent_citra" not in plain.stdout


def test_audit_to_stdout(start_topeng: StartTopeng) -> None:
    proxy = start_topeng("--audit-log", "-")
    with connect(proxy, "agent_citra") as conn:
        conn.execute("SELECT id FROM bank.customers WHERE id = 3").fetchall()
    deadline = time.monotonic() + 15
    while '"event":"session_end"' not in proxy.stderr_text():
        assert time.monotonic() < deadline, proxy.stderr_text()
        time.sleep(0.1)
    lines = [json.loads(x) for x in proxy.stderr_text().splitlines() if x.startswith("{")]
    assert [e["event"] for e in lines] == ["session_start", "statement", "session_end"]
