"""The audit log and `topeng audit` without sockets: event fields, constants never written,
keyed hashes, statement kinds, rotation, reopening, and the questions answered from a log."""

from __future__ import annotations

import gzip
import json
import os
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from proxy import cli
from proxy.auditcli import (
    log_files,
    parse_when,
    read_events,
    readers,
    refused,
    top_readers,
    who_saw,
)
from proxy.observe.audit import (
    AuditLog,
    SessionContext,
    constant_hashes,
    constant_text,
    hash_constant,
    normalize,
    statement_kinds,
)
from proxy.session import StatementRecord

KEY = b"k" * 32
NIK = "3171014509900007"
CTX = SessionContext("s1", "10.0.0.5:51234", "agent_citra", "bank", role="agent")


def record(sql: str, **kw: Any) -> StatementRecord:
    fields: dict[str, Any] = {"decision": "allowed", "started": 1.0, "finished": 1.25}
    fields.update(kw)
    return StatementRecord(sql=sql, **fields)


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_normalize_drops_constants() -> None:
    fp, text = normalize(f"SELECT id FROM bank.customers WHERE nik = '{NIK}' AND id > 3")
    assert text == "SELECT id FROM bank.customers WHERE nik = $1 AND id > $2"
    assert fp and NIK not in fp
    fp2, text2 = normalize(f"SELECT id FROM bank.customers WHERE nik = '{NIK[:-1]}' AND id > 9")
    assert fp2 == fp and text2 == text  # same shape, same fingerprint
    bad_fp, bad_text = normalize(f"SELEC nik = '{NIK}'")
    assert bad_text is None and bad_fp is not None and bad_fp.startswith("sha256:")


@pytest.mark.parametrize(
    ("sql", "kinds"),
    [
        ("SELECT 1", ["select"]),
        ("  (select 1) union (select 2)", ["select"]),
        ("WITH a AS (SELECT 1) INSERT INTO t SELECT * FROM a", ["insert"]),
        ("with recursive r as (select 1) select * from r", ["select"]),
        ("DELETE FROM t WHERE x = $1", ["delete"]),
        ("BEGIN; UPDATE t SET a = $1; COMMIT", ["begin", "update", "commit"]),
        ("SET search_path = bank", ["set"]),
        ("COPY t TO STDOUT", ["copy"]),
    ],
)
def test_statement_kinds(sql: str, kinds: list[str]) -> None:
    assert statement_kinds(sql) == kinds


def test_constant_text_and_hashes() -> None:
    assert constant_text("SCONST", "'it''s'") == "it's"
    assert constant_text("SCONST", "E'abc'") == "abc"
    assert constant_text("SCONST", "$x$abc$x$") == "abc"
    assert constant_text("ICONST", "42") == "42"
    assert constant_text("IDENT", "nik") is None
    quoted = constant_hashes(KEY, f"SELECT 1 FROM c WHERE nik = '{NIK}'")
    number = constant_hashes(KEY, f"SELECT 1 FROM c WHERE nik = {NIK}")
    assert hash_constant(KEY, NIK) in quoted and hash_constant(KEY, NIK) in number
    assert hash_constant(KEY, f" {NIK}\n") == hash_constant(KEY, NIK)
    assert hash_constant(b"x" * 32, NIK) != hash_constant(KEY, NIK)  # keyed
    many = constant_hashes(KEY, "SELECT " + ", ".join(str(i) for i in range(100)))
    assert len(many) == 32


def test_statement_event_fields(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path), key=KEY)
    log.session_start(CTX)
    log.statement(
        CTX,
        record(f"select nik from bank.customers where nik = '{NIK}'", decision="masked",
               labels=("nik",), rows=1),
    )  # fmt: skip
    log.statement(
        CTX,
        record("select nama_ibu_kandung from bank.customers", decision="refused",
               reason="column", message="topeng: column denied", error="42501"),
    )  # fmt: skip
    log.session_end(CTX, reason="ok", rows=1, bytes_in=100, bytes_out=200, duration=2.0)
    log.auth_failure(CTX, "28P01", "password authentication failed")
    log.rules_reload(False, "rules.yaml:3: bad")
    log.close()
    text = path.read_text()
    assert NIK not in text
    events = lines(path)
    assert [e["event"] for e in events] == [
        "session_start", "statement", "statement", "session_end", "auth_failure", "rules_reload",
    ]  # fmt: skip
    masked = events[1]
    assert masked["statement"] == "select nik from bank.customers where nik = $1"
    assert masked["kind"] == "select" and masked["decision"] == "masked"
    assert masked["labels_masked"] == ["nik"] and masked["rows"] == 1
    assert masked["duration_ms"] == 250.0
    assert masked["lookups"] == [hash_constant(KEY, NIK)]
    assert (masked["user"], masked["role"], masked["database"], masked["client"]) == (
        "agent_citra", "agent", "bank", "10.0.0.5:51234",
    )  # fmt: skip
    assert masked["time"].endswith("Z")
    assert events[2]["reason"] == "column" and events[2]["rule"] == "topeng: column denied"
    assert events[3]["bytes_in"] == 100 and events[3]["duration_ms"] == 2000.0
    assert events[5] == {**events[5], "result": "error", "detail": "rules.yaml:3: bad"}


def test_no_key_no_lookups(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path))
    log.statement(CTX, record(f"select 1 where '{NIK}' = '{NIK}'"))
    log.close()
    (event,) = lines(path)
    assert "lookups" not in event and NIK not in path.read_text()


def test_rotation_by_size(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path), max_bytes=1000, keep=3)
    for i in range(100):
        log.statement(CTX, record(f"select {i}"))
    log.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2", "audit.jsonl.3"]
    for name in names[1:]:
        size = (tmp_path / name).stat().st_size
        assert 1000 <= size < 1400
    # The files kept hold the newest statements, oldest first, none lost between them.
    sizes = [e["statement"] for e in read_events(log_files(str(path)))]
    assert 0 < len(sizes) < 100
    assert all(s == "select $1" for s in sizes)


def test_two_writers_rotate_once(tmp_path: Path) -> None:
    """Two workers' logs on one file: each rotation moves the file once."""
    path = tmp_path / "audit.jsonl"
    a = AuditLog(str(path), max_bytes=2000, keep=50)
    b = AuditLog(str(path), max_bytes=2000, keep=50)
    for i in range(60):
        (a if i % 2 else b).statement(CTX, record(f"select {i}"))
    a.close()
    b.close()
    total = sum(1 for _ in read_events(log_files(str(path))))
    assert total == 60  # nothing lost
    for p in tmp_path.glob("audit.jsonl.*"):
        assert p.stat().st_size >= 2000, p.name  # no half-empty files from double rotation


def test_reopen(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path))
    log.statement(CTX, record("select 1"))
    os.rename(path, tmp_path / "old.jsonl")
    log.statement(CTX, record("select 2"))  # still the old file until reopened
    log.reopen()
    log.statement(CTX, record("select 3"))
    log.close()
    assert len(lines(tmp_path / "old.jsonl")) == 2
    assert len(lines(path)) == 1


# -- topeng audit ---------------------------------------------------------------------------------


def event(kind: str, **fields: Any) -> dict[str, Any]:
    return {"time": "2024-05-01T10:00:00.000Z", "event": kind, **fields}


EVENTS = [
    event("statement", session="a", user="agent_citra", role="agent", decision="masked",
          labels_masked=["nik"], rows=3, lookups=[hash_constant(KEY, NIK)]),
    event("statement", session="a", user="agent_citra", role="agent", decision="refused",
          reason="row_limit", rows=0),
    event("statement", session="b", user="ai_helper", role="agent", decision="allowed",
          labels_masked=[], rows=40),
    event("statement", session="b", user="ai_helper", role="agent", decision="refused",
          reason="column", rows=0, lookups=[hash_constant(KEY, NIK)]),
    event("session_end", session="c", user="dba_ani", role="dba", rows=1000),
    event("session_end", session="a", user="agent_citra", role="agent", rows=3),
    event("auth_failure", user="x", client="10.0.0.9:1"),
]  # fmt: skip


def test_questions() -> None:
    digest = hash_constant(KEY, NIK)
    assert [e["user"] for e in who_saw(EVENTS, digest)] == ["agent_citra", "ai_helper"]
    assert [e["reason"] for e in refused(EVENTS)] == ["row_limit", "column"]
    assert [e["user"] for e in refused(EVENTS, user="ai_helper")] == ["ai_helper"]
    assert refused(EVENTS, reason="column")[0]["user"] == "ai_helper"
    top = top_readers(EVENTS)
    # dba_ani's rows come from its session_end (no statement events); agent_citra's from its
    # statements only (its session_end is not counted twice).
    assert [(t.user, t.rows) for t in top] == [("dba_ani", 1000), ("ai_helper", 40),
                                                ("agent_citra", 3)]  # fmt: skip
    assert [(t.user, t.rows) for t in readers(EVENTS, "nik")] == [("agent_citra", 3)]


def test_parse_when() -> None:
    now = datetime(2024, 5, 1, 15, 30, tzinfo=timezone(timedelta(hours=7)))
    assert parse_when("today", now=now) == datetime(2024, 5, 1, tzinfo=now.tzinfo)
    assert parse_when("yesterday", now=now) == datetime(2024, 4, 30, tzinfo=now.tzinfo)
    assert parse_when("2h", now=now) == now - timedelta(hours=2)
    assert parse_when("30min", now=now) == now - timedelta(minutes=30)
    assert parse_when("7d", now=now) == now - timedelta(days=7)
    assert parse_when("2024-05-01T03:00:00Z") == datetime(2024, 5, 1, 3, tzinfo=UTC)
    assert parse_when("2024-05-01").tzinfo is not None
    with pytest.raises(ValueError, match="cannot read the time"):
        parse_when("last tuesday")


def test_log_files_oldest_first_and_gzip(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with gzip.open(tmp_path / "audit.jsonl.2.gz", "wt") as fh:
        fh.write(json.dumps(event("statement", user="old", rows=1)) + "\n")
    (tmp_path / "audit.jsonl.1").write_text(
        json.dumps(event("statement", user="mid", rows=1)) + "\n" + '{"torn": '
    )
    path.write_text(json.dumps(event("statement", user="new", rows=1)) + "\n")
    (tmp_path / "audit.jsonl.bak").write_text("not ours\n")
    files = log_files(str(path))
    assert [f.name for f in files] == ["audit.jsonl.2.gz", "audit.jsonl.1", "audit.jsonl"]
    assert [e["user"] for e in read_events(files)] == ["old", "mid", "new"]


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in EVENTS))
    key = tmp_path / "key"
    key.write_bytes(KEY)
    assert cli.main(["audit", "--log", str(path), "who-saw", NIK, "--key-file", str(key)]) == 0
    out = capsys.readouterr().out
    assert "user=agent_citra" in out and "user=ai_helper" in out and NIK not in out
    assert cli.main(["audit", "--log", str(path), "top-readers", "--json", "--limit", "1"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line)["user"] == "dba_ani"
    assert cli.main(["audit", "--log", str(path), "refused", "--since", "2024-05-02"]) == 0
    assert capsys.readouterr().out == ""
    assert cli.main(["audit", "--log", str(path), "auth-failures", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["client"] == "10.0.0.9"
    assert cli.main(["audit", "--log", str(tmp_path / "none"), "refused"]) == 2
    assert cli.main(["audit", "--log", str(path), "who-saw", NIK]) == 2
    short = tmp_path / "short"
    short.write_bytes(b"short")
    assert cli.main(["audit", "--log", str(path), "who-saw", NIK, "--key-file", str(short)]) == 2
    err = capsys.readouterr().err
    assert "audit key" in err and "at least 16 bytes" in err
