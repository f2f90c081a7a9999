"""deploy/prometheus and the Grafana dashboard, checked by the real tools.

`promtool check rules` / `check config` on the files, then a real Prometheus server (Debian's
`prometheus` package: its own temp dir and port, never the system service) scrapes a running
Topeng that has served traffic: unrestricted and restricted statements, masked values, a
policy refusal, a row-limit refusal and a rules reload. Every PromQL expression of the
dashboard and of the alert rules is then evaluated through Prometheus's HTTP API:

- dashboard expressions must return data (a non-empty result);
- alert expressions are `signal <comparison> threshold`. Under this traffic most alerts must
  stay quiet, so the test evaluates the signal (the expression with its top-level comparison
  removed), which must return data, and the whole expression, which must be a valid query
  returning a vector (it may be empty).

Grafana's `$__rate_interval` is replaced by `1m` (4 scrape intervals and more, as Grafana does).
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from harness import BANK_RULES, REPO_ROOT, TopengProcess, free_port, needs_tool, wait_for_port

from proxy.sampledata import DEMO_USERS

StartTopeng = Callable[..., TopengProcess]
PROM_DIR = REPO_ROOT / "deploy" / "prometheus"
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "topeng-dashboard.json"
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")


@pytest.fixture(autouse=True)
def _prometheus_installed() -> None:
    if PROMTOOL is None or PROMETHEUS is None:
        needs_tool("needs Debian's prometheus package (promtool and prometheus)")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_promtool_checks_the_alert_rules() -> None:
    result = promtool("check", "rules", str(PROM_DIR / "alerts.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    rules = len(alert_rules())
    assert f"SUCCESS: {rules} rules found" in result.stdout


def adapted_config(directory: Path, metrics_port: int) -> Path:
    """deploy/prometheus/prometheus.yml aimed at our Topeng, scraping every second."""
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    config["global"]["evaluation_interval"] = "1s"
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
    for rule_file in config["rule_files"]:
        shutil.copy(PROM_DIR / rule_file, directory / rule_file)
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_promtool_checks_the_config(tmp_path: Path) -> None:
    result = promtool("check", "config", str(adapted_config(tmp_path, 9187)))
    assert result.returncode == 0, result.stdout + result.stderr
    # And the file as shipped (its target host only resolves inside docker-compose).
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    shutil.copy(PROM_DIR / "prometheus.yml", shipped)
    shutil.copy(PROM_DIR / "alerts.yml", shipped)
    result = promtool("check", "config", str(shipped / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


# -- the expressions ------------------------------------------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    return [
        t["expr"].replace("$__rate_interval", "1m")
        for p in doc["panels"]
        for t in p.get("targets", [])
    ]


_COMPARISON = re.compile(r"\s(==|!=|>=|<=|>|<)\s")


def split_comparison(expr: str) -> tuple[str, str]:
    """(signal, `op threshold`) of `signal op threshold`, split at the last top-level operator."""
    depth = 0
    last: re.Match[str] | None = None
    positions = {m.start(): m for m in _COMPARISON.finditer(expr)}
    for i, ch in enumerate(expr):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif depth == 0 and i in positions:
            last = positions[i]
    assert last is not None, f"no top-level comparison in {expr!r}"
    return expr[: last.start()].strip(), expr[last.start() :].strip()


def test_split_comparison() -> None:
    assert split_comparison('up{job="topeng"} == 0') == ('up{job="topeng"}', "== 0")
    assert split_comparison("sum by (a) (rate(x[5m])) / (y + 0.1) > 0.25") == (
        "sum by (a) (rate(x[5m])) / (y + 0.1)",
        "> 0.25",
    )


# -- a real Prometheus ----------------------------------------------------------------------------


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, path: str, **params: str) -> dict[str, Any]:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as resp:
            body: dict[str, Any] = json.loads(resp.read())
        return body

    def query(self, expr: str) -> dict[str, Any]:
        try:
            answer = self.get("/api/v1/query", query=expr)
        except urllib.error.HTTPError as exc:  # 400: a bad expression
            raise AssertionError(f"{expr}: {exc.read().decode()}") from exc
        assert answer["status"] == "success", answer
        data: dict[str, Any] = answer["data"]
        return data


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Callable[[TopengProcess], Prometheus]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(topeng: TopengProcess) -> Prometheus:
        assert PROMETHEUS is not None and topeng.metrics_port is not None
        directory = tmp_path / "prometheus"
        directory.mkdir()
        config = adapted_config(directory, topeng.metrics_port)
        port = free_port()
        log = (directory / "prometheus.log").open("wb")
        proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={directory / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=directory,
        )  # fmt: skip
        procs.append(proc)
        if not wait_for_port("127.0.0.1", port, timeout=30, proc=proc):
            pytest.fail("prometheus did not start:\n" + (directory / "prometheus.log").read_text())
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:  # 503 until the TSDB is open
            try:
                with urllib.request.urlopen(url + "/-/ready", timeout=5) as resp:
                    return resp.status == 200
            except (urllib.error.URLError, ConnectionError):
                return False

        wait(ready, "Prometheus ready", detail=lambda: (directory / "prometheus.log").read_text())
        return Prometheus(url)

    yield start
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def traffic(topeng: TopengProcess) -> psycopg.Connection[tuple[Any, ...]]:
    def connect(user: str) -> psycopg.Connection[tuple[Any, ...]]:
        return psycopg.connect(topeng.dsn(user, DEMO_USERS[user]), autocommit=True)

    with connect("dba_ani") as conn:
        conn.execute("SELECT count(*) FROM bank.customers").fetchall()
    with connect("agent_citra") as conn:
        conn.execute("SELECT id, nik, no_hp FROM bank.customers WHERE id <= 5").fetchall()
        conn.execute("SELECT id, city FROM bank.customers WHERE id <= 5").fetchall()
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT nama_ibu_kandung FROM bank.customers WHERE id = 1")
        with pytest.raises(psycopg.errors.ProgramLimitExceeded):
            conn.execute("SELECT id FROM bank.customers").fetchall()
    held = connect("spv_budi")  # one open session: the connection gauges have a value
    held.execute("SELECT penghasilan FROM bank.customers WHERE id = 1").fetchall()
    topeng.send_signal(signal.SIGHUP)  # a rules reload
    return held


def test_every_dashboard_and_alert_expression_returns_data(
    start_topeng: StartTopeng, prometheus_for: Callable[[TopengProcess], Prometheus], tmp_path: Path
) -> None:
    rules = tmp_path / "rules.yaml"
    shutil.copy(BANK_RULES, rules)
    topeng = start_topeng(rules=rules)
    prom = prometheus_for(topeng)

    def scraped() -> bool:
        result = prom.query('up{job="topeng"}')["result"]
        return bool(result) and result[0]["value"][1] == "1"

    wait(scraped, "Prometheus scraping Topeng")
    held = traffic(topeng)
    try:
        check_expressions(prom)
    finally:
        held.close()


def check_expressions(prom: Prometheus) -> None:
    wait(
        lambda: bool(prom.query('topeng_rules_reloads_total{result="ok"} > 0')["result"]),
        "the reload and the traffic scraped",
    )
    signals = {rule["alert"]: split_comparison(rule["expr"])[0] for rule in alert_rules()}
    must_have_data = dashboard_exprs() + list(signals.values())
    assert len(must_have_data) >= 30

    def empty() -> list[str]:
        return [e for e in must_have_data if not prom.query(e)["result"]]

    wait(lambda: not empty(), "data for every expression", detail=empty)
    for expr in must_have_data:
        data = prom.query(expr)
        assert data["resultType"] == "vector" and data["result"], expr
    # The whole alert expressions are valid, return vectors; under this traffic the ones that
    # mean trouble are quiet.
    for rule in alert_rules():
        data = prom.query(rule["expr"])
        assert data["resultType"] == "vector", rule["alert"]
        if rule["alert"] in ("TopengDown", "TopengRulesReloadFailing", "TopengUpstreamUnreachable"):
            assert data["result"] == [], rule["alert"]
    # A refusal share of 2 in 5 statements per second floor: the spike signal has a value.
    spike = prom.query(signals["TopengRefusalSpike"])["result"]
    assert {s["metric"]["role"] for s in spike} >= {"agent"}
    # Prometheus loaded the same rules promtool checked.
    groups = prom.get("/api/v1/rules")["data"]["groups"]
    loaded = {r["name"] for g in groups for r in g["rules"]}
    assert loaded == set(signals)


def wait(
    check: Callable[[], bool],
    what: str,
    timeout: float = 60.0,
    detail: Callable[[], object] | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}" + (f": {detail()}" if detail else ""))
        time.sleep(0.5)
