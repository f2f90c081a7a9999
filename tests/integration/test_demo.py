"""`make demo` (`topeng demo`): the printed psql lines work, the agent sees masked NIKs, the
supervisor more, the DBA everything, and Ctrl-C stops it all cleanly."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import REPO_ROOT, free_port, needs_tool


def _psql() -> str:
    found = shutil.which("psql")
    if found is None:
        needs_tool("psql is not installed (.ci/run installs postgresql-client)")
    return found


def _run(psql: str, url: str, sql: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    done = subprocess.run(
        [psql, url, "-XAtc", sql], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_demo_prints_lines_that_work_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    psql = _psql()
    port, metrics = free_port(), free_port()
    log = tmp_path / "demo.out"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "demo", "--customers", "300",
             "--listen", f"127.0.0.1:{port}", "--metrics-listen", f"127.0.0.1:{metrics}"],
            cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while "Press Ctrl-C" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        text = log.read_text()
        found = re.findall(r'psql "(postgresql://(\w+):[^"]+)"', text)
        lines = {user: url for url, user in found}
        assert set(lines) >= {"dba_ani", "spv_budi", "agent_citra", "ai_helper"}
        assert _run(psql, lines["agent_citra"], "select 1") == "1"
        sql = "select nik from customers order by id limit 1"
        raw = _run(psql, lines["dba_ani"], sql)
        assert re.fullmatch(r"\d{16}", raw)
        assert _run(psql, lines["agent_citra"], sql) == raw[:6] + "*" * 10
        assert _run(psql, lines["ai_helper"], sql) == raw[:6] + "*" * 10
        income = "select penghasilan from customers order by id limit 1"
        exact = _run(psql, lines["dba_ani"], income)
        assert _run(psql, lines["spv_budi"], income) == exact  # supervisors: income allowed
        assert _run(psql, lines["agent_citra"], income).endswith("000000.00")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("the demo did not stop on Ctrl-C")
    assert code == 0, log.read_text()
    assert "Traceback" not in log.read_text()
