"""Static checks of deploy/: there is no Docker engine in CI, so everything that can be proven without one is.

The compose file must parse under Debian's docker-compose and describe what the issue asks for; Prometheus'
own tool checks the scrape config and the alert rules and runs their unit tests; the dashboard may only query
metrics a live node really exports; chaos.sh must pass bash -n and shellcheck and refuse bad flags cleanly.
A missing tool fails the test, naming the script that installs it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from starlette.routing import Route

from loadtest.chaos import FAULTS
from loadtest.collector import make_app
from loadtest.servers import free_port
from node.config import Settings, env_name, load

ROOT = Path(__file__).resolve().parent.parent
#: One worker runs this file (``--dist loadgroup``): compose resolved, a node's metrics read once, for all.
pytestmark = pytest.mark.xdist_group("test_deploy")
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
SECRETS = ("BATON_ADMIN_TOKEN", "POSTGRES_PASSWORD", "GRAFANA_ADMIN_PASSWORD")
PUBLISHERS_ALLOWED = {"node-1", "node-2", "node-3", "prometheus", "grafana"}
#: Series Prometheus makes itself for every target; every other name must come from a node.
PROMETHEUS_SERIES = {"up"}
PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
                "group_right", "inf", "nan", "atan2"}


def need(binary: str) -> str:
    """The binary's path, or a test failure that says how to install it (never a skip)."""
    path = shutil.which(binary)
    if path is None:
        pytest.fail(f"{binary} not found on PATH; install it with `bash scripts/install-test-deps.sh`")
    return path


def run(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)


def clean_env() -> dict[str, str]:
    """No BATON_* or secrets leaking in from the developer's shell: only the env file may supply them."""
    return {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}


def compose_config(env_file: Path) -> subprocess.CompletedProcess[str]:
    return run([need("docker-compose"), "--env-file", str(env_file), "-f", str(COMPOSE), "config"], clean_env())


@pytest.fixture(scope="module")
def example_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The committed .env.example, as KEY=VALUE pairs."""
    pairs = {}
    for line in (DEPLOY / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


@pytest.fixture(scope="module")
def resolved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`docker-compose config` output with a copy of .env.example as the env file (as a user would do)."""
    env_file = tmp_path_factory.mktemp("compose") / "env"
    shutil.copy(DEPLOY / ".env.example", env_file)
    done = compose_config(env_file)
    assert done.returncode == 0, done.stderr
    config: dict[str, Any] = yaml.safe_load(done.stdout)
    return config


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    """The committed compose file itself (anchors resolved by YAML, variables not interpolated)."""
    return yaml.safe_load(COMPOSE.read_text())


def nodes(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in config["services"].items() if name.startswith("node-")}


# -- docker compose ---------------------------------------------------------------------------------------


def test_compose_needs_the_secrets_from_the_env_file(tmp_path: Path) -> None:
    empty = tmp_path / "env"
    empty.write_text("")
    done = compose_config(empty)
    assert done.returncode != 0
    assert "BATON_ADMIN_TOKEN" in done.stderr or "POSTGRES_PASSWORD" in done.stderr, done.stderr


def test_three_identical_nodes_with_distinct_ids(resolved: dict[str, Any], example_env: dict[str, str]) -> None:
    members = nodes(resolved)
    assert sorted(members) == ["node-1", "node-2", "node-3"]
    ids = {name: svc["environment"]["BATON_NODE_ID"] for name, svc in members.items()}
    assert ids == {name: name for name in members}, "node ids must be distinct and equal the service names"
    for name, svc in members.items():
        env = svc["environment"]
        assert env["BATON_ADVERTISE_URL"] == f"http://{name}:8000"
        assert env["BATON_LOCK_URL"] == "etcd://etcd-1:2379,etcd-2:2379,etcd-3:2379"
        assert env["BATON_ADMIN_TOKEN"] == example_env["BATON_ADMIN_TOKEN"], "the token comes from the env file"
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile"
        assert Path(svc["build"]["context"]) == ROOT
    # the same service apart from who it is and where a person reaches it
    shapes = []
    for svc in members.values():
        shape = {k: v for k, v in svc.items() if k != "ports"}
        shape["environment"] = {k: v for k, v in svc["environment"].items()
                                if k not in ("BATON_NODE_ID", "BATON_ADVERTISE_URL")}
        shapes.append(shape)
    assert shapes[0] == shapes[1] == shapes[2]


def test_node_environment_is_a_valid_node_configuration(resolved: dict[str, Any],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    known = {env_name(field) for field in Settings.model_fields}
    for name, svc in nodes(resolved).items():
        env = {k: str(v) for k, v in svc["environment"].items()}
        unknown = sorted(k for k in env if k.startswith("BATON_") and k not in known)
        assert not unknown, f"{name} sets variables node/config.py does not know: {unknown}"
        assert all(k.startswith("BATON_") for k in env), f"{name}: only BATON_* settings belong to a node"
        with monkeypatch.context() as m:
            for key in [k for k in os.environ if k.startswith("BATON_")]:
                m.delenv(key)
            for key, value in env.items():
                m.setenv(key, value)
            settings = load()
        assert settings.node_id == name
        assert settings.backend_kind == "etcd"
        assert settings.probe_jobs > 0


def test_nodes_report_probes_to_the_collector_on_a_bind_mount(resolved: dict[str, Any], tmp_path: Path) -> None:
    """The checker reads deploy/data/probes.jsonl: the nodes must post to the collector's real route and port."""
    collector = resolved["services"]["collector"]
    command = collector["command"]
    port, out = command[command.index("--port") + 1], command[command.index("--out") + 1]
    posts = {route.path for route in make_app(tmp_path / "probes.jsonl").routes
             if isinstance(route, Route) and "POST" in (route.methods or ())}
    for name, svc in nodes(resolved).items():
        url = urlsplit(svc["environment"]["BATON_PROBE_URL"])
        assert (url.hostname, url.port) == ("collector", int(port)), name
        assert url.path in posts, f"{name} posts probes to {url.path}, the collector serves {posts}"
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1)[::-1] for v in collector["volumes"])
    assert Path(mounts[str(Path(out).parent)]) == DEPLOY / "data"


def test_env_example_names_known_settings_and_working_lock_urls(resolved: dict[str, Any],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The backends .env.example offers are URLs a node accepts, on hosts the compose file runs."""
    text = (DEPLOY / ".env.example").read_text()
    known = {env_name(field) for field in Settings.model_fields}
    mentioned = set(re.findall(r"^#?\s*(BATON_[A-Z_]+)=", text, re.M))
    assert mentioned and mentioned <= known, sorted(mentioned - known)
    urls = re.findall(r"^#?\s*BATON_LOCK_URL=(\S+)", text, re.M)
    assert {u.split("://")[0] for u in urls} == {"etcd", "redis", "postgresql"}
    for key in [k for k in os.environ if k.startswith("BATON_")]:
        monkeypatch.delenv(key)
    for url in urls:
        monkeypatch.setenv("BATON_LOCK_URL", url)
        assert load().lock_url == url
        hosts = {urlsplit(f"x://{part}").hostname for part in urlsplit(url).netloc.split("@")[-1].split(",")}
        assert hosts <= set(resolved["services"]), f"{url} names hosts the compose file does not run"


def test_every_service_has_a_health_check_restart_policy_and_healthy_dependencies(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    for name, svc in services.items():
        assert svc.get("healthcheck", {}).get("test"), f"{name} has no health check"
        assert svc.get("restart") in ("always", "unless-stopped", "on-failure"), f"{name} has no restart policy"
        for dep, how in (svc.get("depends_on") or {}).items():
            assert dep in services
            assert how == {"condition": "service_healthy"}, f"{name} -> {dep}: {how}"
    backing = {"etcd-1", "etcd-2", "etcd-3", "redis", "postgres", "collector"}
    for name, svc in nodes(resolved).items():
        assert set(svc["depends_on"]) == backing, name
    assert "prometheus" in services["grafana"]["depends_on"]


def test_ports_published_only_where_a_person_needs_them(resolved: dict[str, Any]) -> None:
    published = {name for name, svc in resolved["services"].items() if svc.get("ports")}
    assert published == PUBLISHERS_ALLOWED
    host_ports = [p["published"] for svc in resolved["services"].values() for p in svc.get("ports", [])]
    assert len(host_ports) == len(set(host_ports)), host_ports


def test_named_volumes_for_postgres_and_prometheus_data(raw: dict[str, Any]) -> None:
    declared = set(raw["volumes"])

    def named(service: str, target: str) -> bool:
        for volume in raw["services"][service].get("volumes", []):
            source, _, rest = volume.partition(":")
            if rest.split(":")[0] == target and source in declared:
                return True
        return False

    assert named("postgres", "/var/lib/postgresql/data")
    assert named("prometheus", "/prometheus")


def test_no_secrets_in_the_committed_file(raw: dict[str, Any], example_env: dict[str, str]) -> None:
    text = COMPOSE.read_text()
    for secret in SECRETS:
        assert example_env.get(secret), f".env.example must name {secret}"
        assert example_env[secret] not in text
    values = {
        "BATON_ADMIN_TOKEN": [svc["environment"]["BATON_ADMIN_TOKEN"] for svc in nodes(raw).values()],
        "POSTGRES_PASSWORD": [raw["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"]],
        "GRAFANA_ADMIN_PASSWORD": [raw["services"]["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]],
    }
    for secret, found in values.items():
        for value in found:  # required from the env file, never a default written here
            assert re.fullmatch(r"\$\{" + secret + r":\?[^}]*\}", value), f"{secret} = {value!r}"
    tracked = run(["git", "ls-files", "deploy/.env", "deploy/data"])
    assert tracked.stdout.split() in ([], ["deploy/data/.gitignore"]), tracked.stdout
    assert run(["git", "check-ignore", "-q", "deploy/.env"]).returncode == 0, "deploy/.env must be git-ignored"


def test_dockerfile_shape() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert lines[0].startswith("FROM python:3.11-slim")
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"
    copies = [line for line in lines if line.startswith("COPY ")]
    assert copies[0].split()[1] == "pyproject.toml", "dependencies are installed before the source is copied"
    assert "/healthz" in text and "HEALTHCHECK" in text
    assert lines[-1] == 'CMD ["python", "-m", "node"]'
    # exec-form instructions must be valid JSON, or Docker silently runs them through a shell (absent: none)
    health = re.search(r"^\s*CMD (\[.*\])$", text, re.M)
    assert health is not None and json.loads(health.group(1))[0] == "python"
    assert "BATON_HOST=0.0.0.0" in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "deploy/.env"} <= set(ignored)


# -- Prometheus -------------------------------------------------------------------------------------------


def test_promtool_checks_config_and_rules() -> None:
    promtool = need("promtool")
    done = run([promtool, "check", "config", str(DEPLOY / "prometheus.yml")])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "alerts.yml" in done.stdout + done.stderr, "the config must load the alert rules"
    done = run([promtool, "check", "rules", str(DEPLOY / "alerts.yml")])
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_fires_and_stays_quiet_in_promtool_unit_tests() -> None:
    promtool = need("promtool")
    alerts = {rule["alert"] for group in yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"]
              for rule in group["rules"] if "alert" in rule}
    assert {"BatonNoLeader", "BatonSplitBrain", "BatonFencedOrDuplicateRuns", "BatonFireLagHigh"} <= alerts
    fires, quiet = set[str](), set[str]()
    for case in yaml.safe_load((DEPLOY / "alerts.test.yml").read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert fires == alerts and quiet == alerts, f"fires: {fires}, quiet: {quiet}"
    done = run([promtool, "test", "rules", str(DEPLOY / "alerts.test.yml")])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_prometheus_scrapes_every_node(resolved: dict[str, Any]) -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]}
    assert {f"{name}:8000" for name in nodes(resolved)} <= targets
    mounted = " ".join(resolved["services"]["prometheus"]["volumes"])
    assert "prometheus.yml" in mounted and "alerts.yml" in mounted


# -- Grafana and the metric names -------------------------------------------------------------------------


def metric_names(expr: str) -> set[str]:
    """Series names a PromQL expression selects: identifiers that are not functions, keywords or labels."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", text):
        if text[match.end():].lstrip().startswith("(") or match.group(0).lower() in PROMQL_WORDS:
            continue
        names.add(match.group(0))
    return names


def test_metric_name_extraction() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, job) (rate(a_bucket{job="x",le!="1"}[$__rate_interval])))'
            ' > 5 and on (job) b_total offset 5m or vector(0) unless count(c == 1)')
    assert metric_names(expr) == {"a_bucket", "b_total", "c"}


def dashboard_queries() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "baton.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert exprs and all(exprs)
    return exprs


@pytest.fixture(scope="module")
def node_metrics(tmp_path_factory: pytest.TempPathFactory) -> Iterator[set[str]]:
    """Every series name a real node exports, by its /metrics (families with the suffixes their samples get)."""
    work = tmp_path_factory.mktemp("node")
    port = free_port()
    env = {**clean_env(), "BATON_PORT": str(port), "BATON_LOCK_URL": f"file://{work}/locks",
           "BATON_NODE_ID": "deploy-test", "BATON_DEMO_JOBS": "true", "BATON_LOG_FORMAT": "text"}
    with open(work / "node.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "node"], cwd=ROOT, env=env, stdout=log, stderr=log)
    try:
        text = ""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, (work / "node.log").read_text()[-2000:]
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
            except httpx.HTTPError:
                text = ""
            if re.search(r"^baton_is_leader 1", text, re.M):
                break
            time.sleep(0.2)
        else:
            pytest.fail("the node did not become leader within 60s")
        yield exported_names(text)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def exported_names(text: str) -> set[str]:
    names: set[str] = set()
    suffixes = {"counter": ("", "_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "summary": ("", "_sum", "_count", "_created")}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            base = name.removesuffix("_total") if kind == "counter" else name
            names.update(base + s for s in suffixes.get(kind, ("",)))
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_dashboard_queries_only_metrics_a_node_exports(node_metrics: set[str]) -> None:
    used = set().union(*(metric_names(e) for e in dashboard_queries()))
    assert {"baton_is_leader", "baton_job_runs_total", "baton_job_fire_lag_seconds_bucket", "baton_lock_ops_total",
            "baton_lock_op_seconds_bucket", "baton_leader_transitions_total"} <= used
    assert used <= node_metrics, f"not exported by a node: {sorted(used - node_metrics)}"


def test_alerts_use_only_metrics_a_node_exports(node_metrics: set[str]) -> None:
    rules = yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"]
    used = set().union(*(metric_names(r["expr"]) for g in rules for r in g["rules"]))
    assert used <= node_metrics | PROMETHEUS_SERIES, f"not exported by a node: {sorted(used - node_metrics)}"


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses every dashboard query, as recording rules, with Grafana's interval variable filled in."""
    promtool = need("promtool")
    rules = [{"record": f"dashboard:query_{i}", "expr": expr.replace("$__rate_interval", "1m")}
             for i, expr in enumerate(dashboard_queries())]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = run([promtool, "check", "rules", str(path)])
    assert done.returncode == 0, done.stdout + done.stderr


def test_grafana_provisioning_matches_the_compose_mounts(resolved: dict[str, Any]) -> None:
    grafana = DEPLOY / "grafana"
    sources = yaml.safe_load((grafana / "provisioning" / "datasources" / "prometheus.yml").read_text())
    source = sources["datasources"][0]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    dashboard = json.loads((grafana / "dashboards" / "baton.json").read_text())
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]}
    assert uids == {source["uid"]}
    provider = yaml.safe_load((grafana / "provisioning" / "dashboards" / "baton.yml").read_text())["providers"][0]
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1)[::-1] for v in resolved["services"]["grafana"]["volumes"])
    assert Path(mounts[provider["options"]["path"]]) == grafana / "dashboards"
    assert Path(mounts["/etc/grafana/provisioning"]) == grafana / "provisioning"


# -- chaos.sh ---------------------------------------------------------------------------------------------


def test_chaos_script_passes_bash_n_and_shellcheck() -> None:
    script = str(DEPLOY / "chaos.sh")
    done = run([need("bash"), "-n", script])
    assert done.returncode == 0, done.stderr
    done = run([need("shellcheck"), script])
    assert done.returncode == 0, done.stdout
    assert os.access(script, os.X_OK)


@pytest.mark.parametrize("argv", [["--rounds", "0"], ["--faults", "kill,explode"], ["--interval", "soon"],
                                  ["--bogus"], ["--rounds"], ["--backend", "zookeeper"], ["--ports", "80,x"]])
def test_chaos_script_usage_errors_exit_2_with_one_line(argv: list[str]) -> None:
    done = run([need("bash"), str(DEPLOY / "chaos.sh"), *argv], clean_env())
    assert done.returncode == 2
    assert done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith("chaos.sh: "), done.stderr


def test_chaos_script_speaks_the_loadtest_fault_names() -> None:
    text = (DEPLOY / "chaos.sh").read_text()
    match = re.search(r'^KNOWN_FAULTS="([^"]+)"', text, re.M)
    assert match is not None
    assert set(match.group(1).split()) <= set(FAULTS)
    assert {"kill", "pause", "partition", "restart-backend"} <= set(match.group(1).split())
