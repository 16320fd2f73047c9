"""Deployment artefacts: alert rules (promtool), docker-compose.yml, images, entrypoint, dashboard.

No Docker engine is needed: these tests read the files, run `promtool` on the alert rules, run
the container entrypoint against fake `hiedit` / `hiedit-bootstrap` programs, and run
`docker compose config` when the compose CLI is installed.

promtool is required (a missing promtool fails) when HIEDIT_REQUIRE_SERVICES is set, as in
.ci/run, which installs it from Debian's `prometheus` package; otherwise those tests skip.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
COMPOSE = ROOT / "docker-compose.yml"
ALERTS = DOCKER / "alerts.yml"
ALERT_TESTS = DOCKER / "alerts_test.yml"
DASHBOARD = DOCKER / "grafana-dashboard.json"
OPERATIONS = ROOT / "docs" / "operations.md"

# DESIGN.md §6, with the names prometheus_client exposes (counters end in _total; histograms add
# _bucket/_sum/_count).
COUNTERS = {"hiedit_edits_total", "hiedit_rollbacks_total", "hiedit_generated_tokens_total",
            "hiedit_layer_selections_total"}
HISTOGRAMS = {"hiedit_edit_duration_seconds", "hiedit_generate_duration_seconds"}
GAUGES = {"hiedit_active_edits", "hiedit_probe_specificity_ratio", "hiedit_edit_retention_ratio",
          "hiedit_replica_lag_edits", "hiedit_replica_fingerprint_mismatch"}
DESIGN_METRICS = COUNTERS | HISTOGRAMS | GAUGES
EXPOSED_NAMES = COUNTERS | GAUGES | {h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}
# series Prometheus itself writes for every scrape target
PROMETHEUS_BUILTINS = {"up"}

REQUIRED_ALERTS = {
    "HieditEditRetentionDrift": "hiedit_edit_retention_ratio",
    "HieditSpecificityDrift": "hiedit_probe_specificity_ratio",
    "HieditSpecificityDrop": "hiedit_probe_specificity_ratio",
    "HieditReplicaLag": "hiedit_replica_lag_edits",
    "HieditReplicaFingerprintMismatch": "hiedit_replica_fingerprint_mismatch",
    "HieditEditErrorRate": "hiedit_edits_total",
}

METRIC_RE = re.compile(r"\bhiedit_[a-z][a-z0-9_]*")


def _require_services() -> bool:
    return bool(os.environ.get("HIEDIT_REQUIRE_SERVICES"))


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if _require_services():
            pytest.fail("promtool is not on PATH and HIEDIT_REQUIRE_SERVICES is set "
                        "(install Debian's `prometheus` package; .ci/run does)")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return path


def _load_yaml(path: Path):
    with path.open() as f:
        return yaml.safe_load(f)


def _rules() -> list[dict]:
    return [r for g in _load_yaml(ALERTS)["groups"] for r in g["rules"]]


# ---------------------------------------------------------------------------------------- alerts

def test_promtool_check_rules():
    done = subprocess.run([_promtool(), "check", "rules", str(ALERTS)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout + done.stderr


def test_promtool_test_rules():
    # run from docker/ so `rule_files: [alerts.yml]` resolves whatever the cwd of pytest is
    done = subprocess.run([_promtool(), "test", "rules", ALERT_TESTS.name], cwd=DOCKER,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout + done.stderr


def test_promtool_check_prometheus_config():
    done = subprocess.run([_promtool(), "check", "config", str(DOCKER / "prometheus.yml")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_alert_rules_cover_the_required_conditions():
    rules = {r["alert"]: r for r in _rules() if "alert" in r}
    for name, metric in REQUIRED_ALERTS.items():
        assert name in rules, f"missing alert {name}"
        assert metric in rules[name]["expr"], f"{name} does not use {metric}"
        assert rules[name].get("for"), f"{name} needs a `for:` duration (a drift, not a blip)"
    # the error rate counts failed and error statuses over all edit attempts
    expr = rules["HieditEditErrorRate"]["expr"]
    assert 'status=~"failed|error"' in expr
    assert re.search(r"rate\(hiedit_edits_total\[", expr), "the denominator must be all edits"
    assert "offset 1h" in rules["HieditSpecificityDrop"]["expr"]


def test_every_alert_has_severity_annotations_and_a_runbook():
    runbook = OPERATIONS.read_text()
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
               for h in re.findall(r"^#+\s+(.*)$", runbook, flags=re.M)}
    for rule in _rules():
        name = rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        ann = rule["annotations"]
        for key in ("summary", "description", "runbook_url"):
            assert ann.get(key), f"{name} lacks the {key} annotation"
        anchor = ann["runbook_url"].split("#", 1)[1]
        assert anchor == name.lower(), f"{name}: runbook anchor {anchor}"
        assert anchor in anchors, f"docs/operations.md has no section `{name}` for the runbook link"


def test_alert_rules_use_only_design_metrics():
    for rule in _rules():
        for name in METRIC_RE.findall(rule["expr"]):
            assert name in EXPOSED_NAMES, f"{rule['alert']} uses {name}, not a DESIGN §6 metric"


def test_every_alert_has_a_firing_and_a_silent_test_case():
    suite = _load_yaml(ALERT_TESTS)
    assert suite["rule_files"] == ["alerts.yml"]
    firing: set[str] = set()
    silent: set[str] = set()
    for case in suite["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {r["alert"] for r in _rules()}
    assert names - firing == set(), f"alerts never tested firing: {names - firing}"
    assert names - silent == set(), f"alerts never tested silent: {names - silent}"


# ----------------------------------------------------------------------------------- prometheus

def test_prometheus_config_loads_rules_and_scrapes_writer_and_replica():
    conf = _load_yaml(DOCKER / "prometheus.yml")
    assert "alerts.yml" in conf["rule_files"]
    job = next(j for j in conf["scrape_configs"] if j["job_name"] == "hiedit")
    targets = {(t, sc.get("labels", {}).get("role")) for sc in job["static_configs"] for t in sc["targets"]}
    assert ("writer:8000", "writer") in targets
    assert ("replica:8000", "replica") in targets
    assert job.get("metrics_path", "/metrics") == "/metrics"


# -------------------------------------------------------------------------------------- compose

@pytest.fixture(scope="module")
def compose() -> dict:
    return _load_yaml(COMPOSE)


def test_compose_services_and_healthchecks(compose):
    services = compose["services"]
    for name in ("postgres", "redis", "prometheus", "writer", "replica"):
        assert name in services, f"docker-compose.yml lacks the {name} service"
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert "ping" in " ".join(services["redis"]["healthcheck"]["test"])


def test_compose_writer_and_replica_run_the_same_image_with_their_roles(compose):
    services = compose["services"]
    writer, replica = services["writer"], services["replica"]
    assert writer["image"] == replica["image"]
    assert writer["build"]["dockerfile"] == replica["build"]["dockerfile"] == "docker/Dockerfile"
    for svc, role in ((writer, "writer"), (replica, "replica")):
        cmd = svc["command"]
        assert cmd[0] == "serve", cmd
        assert cmd[cmd.index("--role") + 1] == role, cmd
        assert cmd[cmd.index("--host") + 1] == "0.0.0.0", cmd
        env = svc["environment"]
        assert env["HIEDIT_ROLE"] == role
        assert env["HIEDIT_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert "@postgres:5432/" in env["HIEDIT_DATABASE_URL"]
        assert env["HIEDIT_REDIS_URL"].startswith("redis://redis:6379")
        assert env["HIEDIT_API_KEYS"].startswith("${HIEDIT_API_KEYS"), "keys come from the environment / .env"
        assert "/readyz" in svc["healthcheck"]["test"]
        for dep in ("postgres", "redis"):
            assert svc["depends_on"][dep]["condition"] == "service_healthy"
    assert replica["depends_on"]["writer"]["condition"] == "service_healthy"


def test_compose_prometheus_mounts_config_and_rules(compose):
    mounts = compose["services"]["prometheus"]["volumes"]
    assert "./docker/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts
    assert "./docker/alerts.yml:/etc/prometheus/alerts.yml:ro" in mounts
    grafana = compose["services"].get("grafana")
    if grafana is not None:
        assert any("grafana-dashboard.json" in m for m in grafana["volumes"])
        for m in grafana["volumes"]:
            assert (ROOT / m.split(":", 1)[0]).is_file(), m


def test_env_example_sets_every_required_variable():
    text = COMPOSE.read_text()
    required = set(re.findall(r"\$\{([A-Z0-9_]+):\?", text))
    assert {"HIEDIT_API_KEYS", "POSTGRES_PASSWORD"} <= required
    example = dict(line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert required <= set(example), f".env.example lacks {required - set(example)}"
    scopes = set()
    for item in example["HIEDIT_API_KEYS"].split(","):
        scope, _, rest = item.partition(":")
        secret = rest.partition("=")[2] or rest
        assert scope in ("read", "edit", "admin") and len(secret) >= 8, item
        scopes.add(scope)
    assert scopes == {"read", "edit", "admin"}
    from service.api.security import parse_api_keys

    keys = parse_api_keys(example["HIEDIT_API_KEYS"])
    assert sorted(k.scope for k in keys) == ["admin", "edit", "read"]


def _docker_compose() -> list[str] | None:
    if shutil.which("docker") is None:
        return None
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    return ["docker", "compose"] if probe.returncode == 0 else None


def test_docker_compose_config_passes():
    cli = _docker_compose()
    if cli is None:
        pytest.skip("the docker compose v2 CLI is not installed")
    env = dict(os.environ, HIEDIT_API_KEYS="admin:test-admin,read:test-read", POSTGRES_PASSWORD="test")
    done = subprocess.run(cli + ["-f", str(COMPOSE), "--profile", "dashboards", "config", "--format", "json"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    rendered = json.loads(done.stdout)["services"]
    assert rendered["writer"]["environment"]["HIEDIT_API_KEYS"] == "admin:test-admin,read:test-read"
    assert rendered["replica"]["environment"]["HIEDIT_DATABASE_URL"] == \
        "postgresql+psycopg://hiedit:test@postgres:5432/hiedit"
    # without the secrets, config must refuse instead of starting an open server
    bare = {k: v for k, v in os.environ.items() if k not in ("HIEDIT_API_KEYS", "POSTGRES_PASSWORD")}
    done = subprocess.run(cli + ["-f", str(COMPOSE), "--env-file", os.devnull, "config", "-q"],
                          cwd=ROOT, env=bare, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "HIEDIT_API_KEYS" in done.stderr or "POSTGRES_PASSWORD" in done.stderr


# --------------------------------------------------------------------------------------- images

def _dockerfile(name: str) -> str:
    return (DOCKER / name).read_text()


def test_cpu_image():
    text = _dockerfile("Dockerfile")
    assert re.search(r"^FROM python:3\.11-slim\b", text, flags=re.M)
    assert "ARG TORCH_VERSION=2.13.0" in text
    assert "download.pytorch.org/whl/cpu" in text
    # torch is installed before the package, so the pin never pulls CUDA wheels
    assert text.index('pip install "torch==${TORCH_VERSION}"') < text.index("pip install /app")
    _common_image_checks(text)


def test_cuda_image():
    text = _dockerfile("Dockerfile.cuda")
    assert re.search(r"^ARG CUDA_BASE=nvidia/cuda:12\.[0-9.]+-runtime-", text, flags=re.M)
    assert re.search(r"^ARG CUDA_INDEX=cu12[0-9]$", text, flags=re.M)
    assert "ARG TORCH_VERSION=2.13.0" in text
    assert "download.pytorch.org/whl/${CUDA_INDEX}" in text
    assert text.index('pip install "torch==${TORCH_VERSION}"') < text.index("pip install /app")
    _common_image_checks(text)


def _common_image_checks(text: str) -> None:
    user = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert user and not user[-1].startswith(("root", "0")), "the server must not run as root"
    assert re.search(r"^HEALTHCHECK .*\n?.*/healthz", text, flags=re.M)
    assert "HIEDIT_HOME=/var/lib/hiedit" in text
    assert 'VOLUME ["/var/lib/hiedit"]' in text
    assert 'ENTRYPOINT ["hiedit-entrypoint"]' in text
    for script in ("entrypoint.sh", "bootstrap.py", "healthcheck.py"):
        assert f"/app/docker/{script}" in text
    for path in ("pyproject.toml", "README.md", "alembic.ini", "editor_core", "service", "migrations"):
        assert (ROOT / path).exists(), f"the image needs {path}"
    ignored = (ROOT / ".dockerignore").read_text().split()
    for needed in ("docker", "alembic.ini", "migrations", "service", "editor_core", "README.md", "pyproject.toml"):
        assert needed not in ignored, f".dockerignore drops {needed}, which the image needs"


def test_package_and_image_carry_the_served_editors_not_the_replicates():
    """The wheel and the image hold each catalogue model's served editors and the demo assets; the
    training-seed replicates and ZsRE editors (about 100 MB of evaluation inputs) stay in the checkout."""
    import fnmatch
    import tomllib

    from setuptools import find_namespace_packages

    from editor_core.catalog import KNOWN_MODELS

    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packaged = set(find_namespace_packages(str(ROOT), include=find["include"], exclude=find.get("exclude", ())))
    assets = ROOT / "editor_core" / "assets"
    served = [KNOWN_MODELS[name].assets / kind for name in KNOWN_MODELS for kind in ("hiedit", "rledit")]
    served += [p for p in (assets / "demo").iterdir() if p.is_dir()]
    replicates = [p for p in assets.glob("*/*") if p.is_dir() and (fnmatch.fnmatch(p.name, "seed*") or p.name == "zsre")]
    assert replicates, "no replicate editors found under editor_core/assets/<model>/"
    ignored = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]

    def package(path: Path) -> str:
        return ".".join(path.relative_to(ROOT).parts)

    for path in served:
        assert path.is_dir() and package(path) in packaged, f"{path} is served but not packaged"
        rel = str(path.relative_to(ROOT))
        assert not any(fnmatch.fnmatch(rel, pattern) for pattern in ignored), f".dockerignore drops {rel}"
    for path in replicates:
        inside = [p for p in packaged if p == package(path) or p.startswith(package(path) + ".")]
        assert not inside, f"the package carries the replicates {inside}"
        rel = str(path.relative_to(ROOT))
        assert any(fnmatch.fnmatch(rel, pattern) for pattern in ignored), f"the image carries {rel}"


# ----------------------------------------------------------------------------------- entrypoint

@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    """A PATH directory with fake `hiedit` and `hiedit-bootstrap` that log their calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    for name in ("hiedit", "hiedit-bootstrap"):
        exe = bin_dir / name
        exe.write_text(f'#!/bin/sh\necho "{name} $*" >> "{calls}"\nexit "${{FAKE_EXIT_{name.replace("-", "_")}:-0}}"\n')
        exe.chmod(0o755)
    return bin_dir


def _entrypoint(fake_bin: Path, *args: str, **env: str) -> tuple[int, list[str]]:
    full_env = dict(os.environ, PATH=f"{fake_bin}:{os.environ['PATH']}", **env)
    done = subprocess.run(["sh", str(DOCKER / "entrypoint.sh"), *args], env=full_env,
                          capture_output=True, text=True, timeout=60)
    calls = fake_bin.parent / "calls"
    return done.returncode, calls.read_text().splitlines() if calls.exists() else []


def test_entrypoint_syntax():
    assert subprocess.run(["sh", "-n", str(DOCKER / "entrypoint.sh")]).returncode == 0
    assert os.access(DOCKER / "entrypoint.sh", os.X_OK)


def test_entrypoint_migrates_then_serves(fake_bin):
    rc, calls = _entrypoint(fake_bin, "serve", "--role", "replica", "--port", "8000")
    assert rc == 0
    assert calls == ["hiedit-bootstrap migrate", "hiedit serve --role replica --port 8000"]


def test_entrypoint_defaults_and_flag_shorthand(fake_bin):
    rc, calls = _entrypoint(fake_bin)
    assert rc == 0 and calls == ["hiedit-bootstrap migrate", "hiedit serve"]
    (fake_bin.parent / "calls").unlink()
    rc, calls = _entrypoint(fake_bin, "--role", "writer")
    assert rc == 0 and calls == ["hiedit-bootstrap migrate", "hiedit serve --role writer"]


def test_entrypoint_skips_migrations_on_request_and_passes_other_commands(fake_bin):
    rc, calls = _entrypoint(fake_bin, "serve", HIEDIT_MIGRATE="0")
    assert rc == 0 and calls == ["hiedit-bootstrap wait", "hiedit serve"]
    (fake_bin.parent / "calls").unlink()
    rc, calls = _entrypoint(fake_bin, "hiedit", "eval", "--help")
    assert rc == 0 and calls == ["hiedit eval --help"]


def test_entrypoint_does_not_serve_when_migrations_fail(fake_bin):
    rc, calls = _entrypoint(fake_bin, "serve", FAKE_EXIT_hiedit_bootstrap="1")
    assert rc != 0
    assert calls == ["hiedit-bootstrap migrate"]


def test_bootstrap_migrates_sqlite(tmp_path):
    url = f"sqlite:///{tmp_path / 'home' / 'hiedit.db'}"
    env = dict(os.environ, HIEDIT_DATABASE_URL=url, HIEDIT_ALEMBIC_CONFIG=str(ROOT / "alembic.ini"))
    env.pop("HIEDIT_REDIS_URL", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, str(DOCKER / "bootstrap.py"), "migrate"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    import sqlite3
    with sqlite3.connect(tmp_path / "home" / "hiedit.db") as db:
        tables = {r[0] for r in db.execute("select name from sqlite_master where type='table'")}
        version = db.execute("select version_num from alembic_version").fetchall()
    assert "alembic_version" in tables and len(version) == 1


def test_bootstrap_gives_up_on_an_unreachable_database(tmp_path):
    env = dict(os.environ, HIEDIT_DATABASE_URL="postgresql+psycopg://nobody@127.0.0.1:1/none",
               HIEDIT_DB_WAIT_TIMEOUT="1")
    env.pop("HIEDIT_REDIS_URL", None)
    done = subprocess.run([sys.executable, str(DOCKER / "bootstrap.py"), "wait"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "gave up waiting for database" in done.stderr
    assert "nobody@127.0.0.1:1/none" in done.stderr


def test_healthcheck_script(tmp_path):
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200 if self.path == "/healthz" else 503)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = dict(os.environ, HIEDIT_PORT=str(server.server_address[1]))
        script = [sys.executable, str(DOCKER / "healthcheck.py")]
        assert subprocess.run(script, env=env, capture_output=True).returncode == 0
        assert subprocess.run(script + ["/readyz"], env=env, capture_output=True).returncode == 1
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------------------------ dashboard

def _dashboard_queries(node) -> list[str]:
    """Every PromQL string of the dashboard: panel targets and templating queries."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                found.append(value)
            elif key == "query" and isinstance(value, str):
                found.append(value)
            else:
                found.extend(_dashboard_queries(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(_dashboard_queries(item))
    return found


def test_dashboard_parses_and_uses_only_design_metrics():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["title"] and dash["uid"]
    panels = [p for p in dash["panels"] if p.get("type") != "row"]
    assert panels
    queries = _dashboard_queries(dash)
    used: set[str] = set()
    for q in queries:
        for name in METRIC_RE.findall(q):
            assert name in EXPOSED_NAMES, f"dashboard query uses {name}, not a DESIGN §6 metric: {q}"
            used.add(re.sub(r"_(bucket|sum|count)$", "", name))
        # every other selector must be a Prometheus built-in (up)
        for sel in re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{", q):
            assert sel.startswith("hiedit_") or sel in PROMETHEUS_BUILTINS, f"unexpected metric {sel} in {q}"
    missing = DESIGN_METRICS - used
    assert not missing, f"the dashboard shows no panel for {sorted(missing)}"
    for p in panels:
        if p["type"] in ("timeseries", "stat", "bargauge", "gauge"):
            assert p.get("targets"), f"panel {p['title']!r} has no query"


def test_service_registry_exports_the_metrics_alerts_and_dashboard_use():
    """Cross-check against the implementation: every DESIGN §6 name the rules and dashboard use
    is registered by service.metrics (replica lag comes with the scale-out code, which may
    register it elsewhere)."""
    from service.metrics import Metrics

    exposed: set[str] = set()
    for family in Metrics().registry.collect():
        if family.type == "counter":
            exposed.add(family.name + "_total")
        elif family.type == "histogram":
            exposed.update(family.name + s for s in ("_bucket", "_sum", "_count"))
        else:
            exposed.add(family.name)
    used = set(METRIC_RE.findall(ALERTS.read_text()))
    used |= {n for q in _dashboard_queries(json.loads(DASHBOARD.read_text())) for n in METRIC_RE.findall(q)}
    missing = used - exposed - {"hiedit_replica_lag_edits", "hiedit_replica_fingerprint_mismatch"}  # service.replica
    assert not missing, f"used by alerts/dashboard but not registered by service.metrics: {sorted(missing)}"
