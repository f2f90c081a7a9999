"""The files under deploy/ agree with the code: they parse, and the ports, paths, flags,
environment variables, probes and metric names they use exist in Topeng.

No Docker engine or Kubernetes cluster runs here, so these tests read the files; the real
Prometheus test (tests/integration/test_prometheus.py) runs the PromQL.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy import cli
from proxy.config import OPTIONS, Config, env_name, flag_name
from proxy.observe.http import PATHS
from proxy.observe.metrics import metric_names
from proxy.policy.rules import load_rules
from proxy.policy.store import RulesStore
from proxy.sampledata import DEMO_USERS

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
DOCS = ROOT / "docs" / "operations.md"

LISTEN_PORT = Config().listen[0].port
METRICS_ADDRESS = Config().metrics_listen
assert METRICS_ADDRESS is not None
METRICS_PORT = METRICS_ADDRESS.port
FLAGS = {flag_name(o.name) for o in OPTIONS} | {"--config"}
ENV_VARS = {env_name(o.name) for o in OPTIONS} | {"TOPENG_CONFIG"}


def serve_flags() -> set[str]:
    """The option strings `topeng serve --help` lists."""
    parser = cli._parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            serve = action.choices["serve"]
            return {s for a in serve._actions for s in a.option_strings}
    raise AssertionError("no serve subcommand")


def flags_of(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("--")]


def k8s(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def deployment() -> dict[str, Any]:
    (doc,) = k8s("deployment.yaml")
    return doc


def container() -> dict[str, Any]:
    (c,) = deployment()["spec"]["template"]["spec"]["containers"]
    return c


# -- everything parses ----------------------------------------------------------------------------


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml"))


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)


def test_json_parses() -> None:
    files = sorted(DEPLOY.rglob("*.json"))
    assert files
    for path in files:
        assert isinstance(json.loads(path.read_text()), dict), path


def test_serve_help_lists_every_option() -> None:
    assert FLAGS <= serve_flags()


# -- Dockerfile -----------------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile() -> None:
    instructions = dockerfile()
    get = lambda word: [rest for w, rest in instructions if w == word]  # noqa: E731
    assert get("FROM")[0].startswith("python:") and "slim" in get("FROM")[0]
    assert get("EXPOSE") == [f"{LISTEN_PORT} {METRICS_PORT}"]
    (entrypoint,) = get("ENTRYPOINT")
    assert json.loads(entrypoint) == ["topeng", "serve"]
    assert 'topeng = "proxy.cli:main"' in (ROOT / "pyproject.toml").read_text()
    (user,) = get("USER")
    assert user.split(":")[0] not in ("0", "root")
    (health,) = get("HEALTHCHECK")
    url = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", health)
    assert url is not None and int(url.group(1)) == METRICS_PORT and url.group(2) == "/healthz"
    assert url.group(2) in PATHS
    env = " ".join(get("ENV"))
    for name, _value in re.findall(r"(TOPENG_\w+)=(\S+)", env):
        assert name in ENV_VARS, name
    assert f"TOPENG_LISTEN=0.0.0.0:{LISTEN_PORT}" in env
    assert f"TOPENG_METRICS_LISTEN=0.0.0.0:{METRICS_PORT}" in env
    stages = [rest.split()[-1] for rest in get("FROM") if " AS " in rest.upper()]
    for rest in get("COPY"):
        *sources, _ = rest.split()
        if sources[0].startswith("--from="):
            assert sources[0].removeprefix("--from=") in stages, rest
            continue
        for source in sources:
            assert (ROOT / source).exists(), source
    # the runtime stage checks that both C modules were built
    assert any("fastmask.AVAILABLE" in rest for rest in get("RUN"))
    assert any("relay.AVAILABLE" in rest for rest in get("RUN"))


# -- docker-compose -------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    doc = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert isinstance(doc, dict)
    return doc


def documented_compose_services() -> set[str]:
    """The services in docs/operations.md's compose table: rows `| `name` | ... |`."""
    text = DOCS.read_text()
    section = text.split("<!-- compose-services -->", 2)[1]
    return set(re.findall(r"^\| `([\w-]+)` \|", section, re.M))


def test_compose_services_agree_with_the_docs() -> None:
    services = set(compose()["services"])
    assert services == {"postgres", "sampledata", "topeng", "prometheus", "grafana"}
    assert documented_compose_services() == services


def test_compose_topeng_service() -> None:
    services = compose()["services"]
    topeng = services["topeng"]
    assert set(flags_of(topeng["command"])) <= FLAGS
    for name in topeng["environment"]:
        assert name in ENV_VARS, name
    ports = {int(p.split(":")[-1]) for p in topeng["ports"]}
    assert ports == {LISTEN_PORT, METRICS_PORT}
    assert topeng["environment"]["TOPENG_METRICS_LISTEN"] == f"0.0.0.0:{METRICS_PORT}"
    # Every bind-mounted source exists (paths are relative to deploy/).
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), source
        build = service.get("build")
        if build:
            assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
    # The one-shot loader calls a function that exists, on the compose's database.
    loader = " ".join(services["sampledata"]["command"])
    assert "from proxy.sampledata import load_sample_sync" in loader
    db = services["postgres"]["environment"]
    assert f"postgres:{db['POSTGRES_PASSWORD']}@postgres:5432/{db['POSTGRES_DB']}" in loader
    assert "--upstream" in topeng["command"]
    assert "postgresql://postgres:5432" in topeng["command"]
    # The psql line in the file's header uses a real demo user and password.
    header = (DEPLOY / "docker-compose.yml").read_text()
    for user, password in re.findall(r"postgresql://(\w+):([\w-]+)@localhost:6432", header):
        assert DEMO_USERS[user] == password
    # Grafana gets the dashboards where the provider looks for them.
    grafana = services["grafana"]
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/topeng.yml").read_text())[
        "providers"
    ][0]
    targets = [v.split(":")[1] for v in grafana["volumes"]]
    assert any(t.startswith(provider["options"]["path"]) and t.endswith(".json") for t in targets)


# -- Kubernetes -----------------------------------------------------------------------------------


def test_kustomization_lists_every_manifest() -> None:
    kustom = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustom["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def test_deployment_probes_ports_and_flags() -> None:
    spec = deployment()["spec"]
    assert spec["replicas"] >= 2
    c = container()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"postgres": LISTEN_PORT, "metrics": METRICS_PORT}
    ready, live = c["readinessProbe"]["httpGet"], c["livenessProbe"]["httpGet"]
    assert ready["path"] == "/readyz" and live["path"] == "/healthz"
    assert {ready["path"], live["path"]} <= set(PATHS)
    assert ready["port"] == live["port"] == "metrics"
    assert set(flags_of(c["args"])) <= FLAGS
    args = dict(a.removeprefix("--").split("=", 1) for a in c["args"])
    assert args["listen"] == f"0.0.0.0:{LISTEN_PORT}"
    assert args["metrics-listen"] == f"0.0.0.0:{METRICS_PORT}"
    # Files the flags name are mounted.
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    for flag in ("rules", "tls-cert", "tls-key", "audit-key-file"):
        assert any(args[flag].startswith(path) for path in mounts.values()), flag
    annotations = deployment()["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)
    # Graceful shutdown fits in the pod's grace period.
    env = {e["name"]: e for e in c["env"]}
    grace = int(env["TOPENG_SHUTDOWN_GRACE"]["value"].removesuffix("s"))
    assert deployment()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > grace
    for name in env:
        assert name in ENV_VARS or name == "TOPENG_HASH_KEY", name


def test_secrets_and_configmap_agree(tmp_path: Path) -> None:
    (secret,) = k8s("secret.yaml")
    keys = set(secret["stringData"])
    volumes = deployment()["spec"]["template"]["spec"]["volumes"]
    for volume in volumes:
        if "secret" in volume:
            assert volume["secret"]["secretName"] == secret["metadata"]["name"]
            assert {i["key"] for i in volume["secret"]["items"]} <= keys
    for env in container()["env"]:
        ref = env.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["name"] == secret["metadata"]["name"] and ref["key"] in keys
    (configmap,) = k8s("configmap-rules.yaml")
    (rules_volume,) = [v for v in volumes if "configMap" in v]
    assert rules_volume["configMap"]["name"] == configmap["metadata"]["name"]
    # The ConfigMap's rules validate, and name the hash key variable the Deployment sets.
    for name, text in configmap["data"].items():
        (tmp_path / name).write_text(text)
    rules = load_rules(tmp_path)
    assert rules.hash_key is not None and rules.hash_key.env == "TOPENG_HASH_KEY"
    assert "TOPENG_HASH_KEY" in {e["name"] for e in container()["env"]}


def test_service_hpa_pdb_select_the_pods() -> None:
    pod_labels = deployment()["spec"]["template"]["metadata"]["labels"]
    name = deployment()["metadata"]["name"]
    (service,) = k8s("service.yaml")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    container_ports = {p["name"] for p in container()["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports
    assert {p["port"] for p in service["spec"]["ports"]} == {LISTEN_PORT, METRICS_PORT}
    (hpa,) = k8s("hpa.yaml")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": name,
    }
    assert hpa["spec"]["minReplicas"] >= 2
    (pdb,) = k8s("pdb.yaml")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["minAvailable"] < deployment()["spec"]["replicas"]


def test_configmap_update_is_seen_by_the_rules_poller(tmp_path: Path) -> None:
    """A ConfigMap volume: `bank.yaml -> ..data/bank.yaml`, `..data -> ..<timestamp>`; an
    update writes a new timestamped directory and swaps the `..data` symlink."""
    (configmap,) = k8s("configmap-rules.yaml")
    text = configmap["data"]["bank.yaml"]
    volume = tmp_path / "rules"
    volume.mkdir()
    first = volume / "..2024_01_01_00_00_00.000000001"
    first.mkdir()
    (first / "bank.yaml").write_text(text)
    os.symlink(first.name, volume / "..data")
    os.symlink("..data/bank.yaml", volume / "bank.yaml")
    os.environ.setdefault("TOPENG_HASH_KEY", "test-key-for-the-configmap-rules")
    store = RulesStore(volume)
    assert not store.changed_on_disk()
    second = volume / "..2024_01_01_00_01_00.000000002"
    second.mkdir()
    (second / "bank.yaml").write_text(
        text.replace("max_rows_per_query: 50", "max_rows_per_query: 5")
    )
    os.symlink(second.name, volume / "..data_tmp")
    os.replace(volume / "..data_tmp", volume / "..data")  # the kubelet's atomic swap
    assert store.changed_on_disk()
    assert store.reload()
    agent = next(r for r in store.current.roles if r.name == "agent")
    assert agent.max_rows_per_query == 5


# -- systemd --------------------------------------------------------------------------------------


def systemd_unit() -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in (DEPLOY / "systemd" / "topeng.service").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def test_systemd_unit() -> None:
    unit = systemd_unit()
    (start,) = unit["ExecStart"]
    argv = shlex.split(start)
    assert argv[0].endswith("/topeng") and argv[1] == "serve"
    assert set(flags_of(argv)) <= FLAGS
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["Restart"] == ["on-failure"]
    assert unit["User"][0] not in ("root", "0")
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices"):
        assert unit[key] == ["yes"], key
    assert unit["ProtectSystem"] == ["strict"]
    # The audit log is written where the unit allows writing.
    audit = argv[argv.index("--audit-log") + 1]
    assert any(audit.startswith(p + "/") for p in unit["ReadWritePaths"][0].split())
    assert f"/var/log/{unit['LogsDirectory'][0]}/" in audit
    for env in unit["Environment"]:
        assert env.split("=", 1)[0] in ENV_VARS
    assert int(unit["TimeoutStopSec"][0]) > 30  # shutdown_grace


# -- Prometheus and Grafana -----------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    doc = json.loads((DEPLOY / "grafana" / "topeng-dashboard.json").read_text())
    assert isinstance(doc, dict)
    return doc


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def test_every_metric_used_exists() -> None:
    known = metric_names()
    used: set[str] = set()
    for expr in dashboard_exprs() + [r["expr"] for r in alert_rules()]:
        used.update(re.findall(r"\btopeng_[a-z_]+", expr))
    assert used, "no metrics used?"
    assert used <= known, sorted(used - known)
    # Every metric of DESIGN.md is on the dashboard.
    for name in (
        "topeng_client_connections",
        "topeng_connections_total",
        "topeng_queries_total",
        "topeng_refusals_total",
        "topeng_masked_values_total",
        "topeng_rows_total",
        "topeng_query_duration_seconds_bucket",
        "topeng_analysis_duration_seconds_bucket",
        "topeng_analysis_cache_total",
        "topeng_rules_reloads_total",
        "topeng_rules_last_reload_success",
        "topeng_upstream_errors_total",
    ):
        assert any(name in e for e in dashboard_exprs()), name


def test_dashboard_panels() -> None:
    titles = " | ".join(p["title"].lower() for p in dashboard()["panels"])
    for topic in (
        "traffic",
        "decisions by role",
        "refusals by reason",
        "masked values by label",
        "rows served",
        "latency percentiles",
        "cache hit rate",
        "reload",
        "upstream errors",
        "connections",
    ):
        assert topic in titles, topic
    ids = [p["id"] for p in dashboard()["panels"]]
    assert len(ids) == len(set(ids))
    datasource = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"][0]
    (variable,) = dashboard()["templating"]["list"]
    assert variable["current"]["value"] == datasource["uid"]
    assert datasource["url"].endswith(":9090")


def test_alerts_are_documented() -> None:
    rules = alert_rules()
    names = {r["alert"] for r in rules}
    assert names == {
        "TopengDown",
        "TopengRulesReloadFailing",
        "TopengUpstreamUnreachable",
        "TopengRefusalSpike",
        "TopengRowLimitHits",
    }
    docs = DOCS.read_text()
    for rule in rules:
        assert f"### {rule['alert']}" in docs, rule["alert"]
        assert f"docs/operations.md#{rule['alert'].lower()}" in rule["annotations"]["description"]
        assert rule["labels"]["severity"] in ("page", "ticket")


def test_prometheus_config() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    for rule_file in config["rule_files"]:
        assert (DEPLOY / "prometheus" / rule_file).is_file()
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "topeng"
    assert job["metrics_path"] in PATHS
    (target,) = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host in compose()["services"] and int(port) == METRICS_PORT
    assert all('job="topeng"' in r["expr"] for r in alert_rules() if "up{" in r["expr"])
