"""Hot reload of the rules: a change on disk or SIGHUP, with a file and with a directory.

What the code does (proxy/policy/store.py, proxy/server.py, proxy/policy/engine.py): the
RulesStore polls the files every 2 s (mtime and size) and reloads on SIGHUP; new rules replace
the old ones whole, and only if they validate. New sessions get the new rules, and an open
session's next statement is judged by them too (RestrictedPolicy follows the store; a prepared
statement is judged again at its next Execute).

Observed through Topeng: agent_citra's NIK shows 6 digits with the shipped rules and 2 after
the change `keep_first: 6` -> `keep_first: 2`.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest
from harness import BANK_RULES, PgServer, TopengProcess

from proxy.sampledata import DEMO_USERS

StartTopeng = Callable[..., TopengProcess]
BANK_TEXT = BANK_RULES.read_text()
KEEP_6 = "nik: {mask: partial, keep_first: 6}"
KEEP_2 = "nik: {mask: partial, keep_first: 2}"
RELOAD_WAIT = 15.0  # the poll interval is 2 s


def metric(proxy: TopengProcess, name: str, labels: str = "") -> float:
    with urllib.request.urlopen(proxy.metrics_url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    wanted = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    return 0.0


def reloads(proxy: TopengProcess, result: str) -> float:
    return metric(proxy, "topeng_rules_reloads_total", f'result="{result}"')


async def wait_for(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + RELOAD_WAIT
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {RELOAD_WAIT:.0f} s: {what}")
        await asyncio.sleep(0.2)


async def agent(proxy: TopengProcess) -> asyncpg.Connection:
    return await asyncpg.connect(proxy.dsn("agent_citra", DEMO_USERS["agent_citra"]))


async def kept(conn: asyncpg.Connection, raw: str) -> int:
    """Leading NIK digits shown to this session (16: unmasked)."""
    nik = await conn.fetchval("SELECT nik FROM customers WHERE id = 1")
    assert isinstance(nik, str) and len(nik) == 16
    shown = len(nik.rstrip("*"))
    assert nik[:shown] == raw[:shown], (nik, raw)
    return shown


@pytest.fixture(scope="module")
def raw_nik(pg: PgServer) -> str:
    return pg.execute("SELECT nik FROM bank.customers WHERE id = 1;").strip()


def rules_at(tmp_path: Path, layout: str) -> tuple[Path, Path]:
    """(what --rules names, the file to edit) for a single file or a directory."""
    if layout == "file":
        path = tmp_path / "rules.yaml"
        path.write_text(BANK_TEXT)
        return path, path
    directory = tmp_path / "rules.d"
    directory.mkdir()
    (directory / "10-bank.yaml").write_text(BANK_TEXT)
    (directory / "README.txt").write_text("not a rules file: ignored\n")
    return directory, directory / "10-bank.yaml"


def rewrite(path: Path, text: str) -> None:
    """Replace a rules file the way an editor does: a new file renamed over the old one."""
    tmp = path.with_name(".tmp-" + path.name)
    tmp.write_text(text)
    tmp.replace(path)


@pytest.mark.parametrize("layout", ["file", "directory"])
async def test_valid_change_reaches_new_sessions_without_dropping_open_ones(
    start_topeng: StartTopeng, tmp_path: Path, raw_nik: str, layout: str
) -> None:
    rules, edited = rules_at(tmp_path, layout)
    proxy = start_topeng(rules=rules)
    assert metric(proxy, "topeng_rules_last_reload_success") == 1
    ok_before = reloads(proxy, "ok")
    conn = await agent(proxy)
    try:
        assert await kept(conn, raw_nik) == 6
        rewrite(edited, BANK_TEXT.replace(KEEP_6, KEEP_2))
        await wait_for(lambda: reloads(proxy, "ok") > ok_before, "a successful reload")
        assert metric(proxy, "topeng_rules_last_reload_success") == 1
        fresh = await agent(proxy)
        try:
            assert await kept(fresh, raw_nik) == 2
        finally:
            await fresh.close()
        # the open session was not dropped, and it is still masked
        assert not conn.is_closed()
        assert await kept(conn, raw_nik) in (2, 6)
        assert await conn.fetchval("SELECT count(*) FROM customers WHERE id <= 3") == 3
    finally:
        await conn.close()
    assert f"rules reloaded from {rules}" in proxy.stderr_text()


async def test_valid_change_applies_to_the_next_statement_of_an_open_session(
    start_topeng: StartTopeng, tmp_path: Path, raw_nik: str
) -> None:
    rules, edited = rules_at(tmp_path, "file")
    proxy = start_topeng(rules=rules)
    ok_before = reloads(proxy, "ok")
    conn = await agent(proxy)
    try:
        assert await kept(conn, raw_nik) == 6
        rewrite(edited, BANK_TEXT.replace(KEEP_6, KEEP_2))
        await wait_for(lambda: reloads(proxy, "ok") > ok_before, "a successful reload")
        assert await kept(conn, raw_nik) == 2
    finally:
        await conn.close()


BROKEN = {
    # a YAML syntax error on line 3 of the file
    "syntax": (
        "version: 1\nroles:\n  agent: {users: ['agent_*'}\ndefault_role: agent\n",
        r":3:\d+: invalid YAML",
    ),
    # a policy naming a label that does not exist
    "unknown_label": (
        BANK_TEXT.replace(KEEP_6, "nikk: {mask: partial, keep_first: 2}"),
        r":\d+:\d+: policy of role '\*' names unknown label 'nikk'; did you mean 'nik'\?",
    ),
}

EXTRA_UNKNOWN_LABEL = "version: 1\npolicies:\n  '*':\n    nikk: {mask: redact}\n"


@pytest.mark.parametrize("layout", ["file", "directory"])
@pytest.mark.parametrize("broken", sorted(BROKEN))
async def test_invalid_change_is_rejected_and_the_old_rules_stay(
    start_topeng: StartTopeng, tmp_path: Path, raw_nik: str, layout: str, broken: str
) -> None:
    rules, edited = rules_at(tmp_path, layout)
    proxy = start_topeng(rules=rules)
    errors_before = reloads(proxy, "error")
    ok_before = reloads(proxy, "ok")
    conn = await agent(proxy)
    try:
        assert await kept(conn, raw_nik) == 6
        text, message = BROKEN[broken]
        if layout == "directory":
            # a second file in the directory, the first one unchanged
            bad = rules / "20-extra.yaml"
            bad.write_text(text if broken == "syntax" else EXTRA_UNKNOWN_LABEL)
        else:
            bad = edited
            rewrite(edited, text)
        await wait_for(lambda: reloads(proxy, "error") > errors_before, "a failed reload")
        assert metric(proxy, "topeng_rules_last_reload_success") == 0
        assert reloads(proxy, "ok") == ok_before
        log = proxy.stderr_text()
        assert "rules reload failed; the previous rules stay in force" in log
        assert re.search(re.escape(str(bad)) + message, log), log
        # the old rules are still enforced, for open and for new sessions
        assert await kept(conn, raw_nik) == 6
        fresh = await agent(proxy)
        try:
            assert await kept(fresh, raw_nik) == 6
        finally:
            await fresh.close()
        # fixed: accepted
        if layout == "directory":
            bad.unlink()
        rewrite(edited, BANK_TEXT.replace(KEEP_6, KEEP_2))
        await wait_for(lambda: reloads(proxy, "ok") > ok_before, "a successful reload")
        assert metric(proxy, "topeng_rules_last_reload_success") == 1
        fresh = await agent(proxy)
        try:
            assert await kept(fresh, raw_nik) == 2
        finally:
            await fresh.close()
        assert await conn.fetchval("SELECT 1") == 1  # never dropped
    finally:
        await conn.close()


async def test_sighup_reloads(start_topeng: StartTopeng, tmp_path: Path, raw_nik: str) -> None:
    rules, _ = rules_at(tmp_path, "file")
    proxy = start_topeng(rules=rules)
    ok_before = reloads(proxy, "ok")
    # nothing changed on disk, so the poll would not reload: only SIGHUP can
    proxy.send_signal(signal.SIGHUP)
    await wait_for(lambda: reloads(proxy, "ok") == ok_before + 1, "a reload after SIGHUP")
    assert proxy.returncode is None
    conn = await agent(proxy)
    try:
        assert await kept(conn, raw_nik) == 6
    finally:
        await conn.close()


async def test_sighup_with_invalid_rules_keeps_the_old_ones(
    start_topeng: StartTopeng, tmp_path: Path, raw_nik: str
) -> None:
    rules, edited = rules_at(tmp_path, "file")
    proxy = start_topeng(rules=rules)
    errors_before = reloads(proxy, "error")
    rewrite(edited, BANK_TEXT.replace("default_role: agent", "default_role: dba"))
    proxy.send_signal(signal.SIGHUP)
    await wait_for(lambda: reloads(proxy, "error") > errors_before, "a failed reload")
    assert "default_role 'dba' is unrestricted" in proxy.stderr_text()
    assert metric(proxy, "topeng_rules_last_reload_success") == 0
    conn = await agent(proxy)
    try:
        assert await kept(conn, raw_nik) == 6
    finally:
        await conn.close()
