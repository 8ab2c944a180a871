"""The Kubernetes objects of one model version: a Deployment and a Service, as plain dicts.

Pure functions of the ``EngineSpec``, what runs for it (``program``: vLLM's server, the same argv
the local backend runs) and the ``KubernetesSettings``, so they are tested without a cluster and
``llmserve k8s`` can print them. The drain recipe every anchor converged on is built in: a preStop
hook keeps a pod serving for ``prestop_s`` after it is marked for deletion (every router has seen it
terminating and stopped sending to it by then), SIGTERM makes vLLM finish in-flight requests for up to
``shutdown_timeout_s``, and the termination grace period is at least their sum.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from llmserve.replicas.capacity import weights_gib
from llmserve.replicas.process import ReplicaProgram
from llmserve.replicas.spec import EngineSpec
from llmserve.settings import KubernetesSettings

MANAGED_BY = "llmserve"
LABEL_INSTANCE = "llmserve.io/instance"  # one version: the Deployment's selector
LABEL_MODEL = "llmserve.io/model"
LABEL_VERSION = "llmserve.io/version"
LABEL_ROLE = "llmserve.io/role"
ANNOTATION_VERSIONED = "llmserve.io/versioned-name"  # the exact name:version (labels are sanitised)
CONTAINER = "engine"
_RUNTIME_GIB = 1.0
_GRACE_MARGIN_S = 5


def _label_value(text: str) -> str:
    """``text`` as a label value: [A-Za-z0-9._-], at most 63, alphanumeric at both ends."""
    value = re.sub(r"[^A-Za-z0-9._-]", "-", text)[:63]
    return value.strip("._-") or "x"


def object_name(spec: EngineSpec) -> str:
    """The Deployment's and Service's name: a DNS-1035 label, unique per ``model:version`` (a hash
    keeps ``a.b:v1`` and ``a-b:v1`` apart, which the readable part alone would merge)."""
    digest = hashlib.sha256(spec.versioned_name.encode()).hexdigest()[:8]
    readable = re.sub(r"[^a-z0-9-]+", "-", f"{spec.model_name}-{spec.version}".lower()).strip("-")
    return f"llm-{readable[:63 - 4 - 9]}".rstrip("-") + f"-{digest}"


def instance_label(spec: EngineSpec) -> str:
    return object_name(spec)


def labels(spec: EngineSpec) -> dict[str, str]:
    return {"app.kubernetes.io/managed-by": MANAGED_BY, "app.kubernetes.io/name": "llmserve-engine",
            LABEL_INSTANCE: instance_label(spec), LABEL_MODEL: _label_value(spec.model_name),
            LABEL_VERSION: _label_value(spec.version), LABEL_ROLE: "engine"}


def selector(spec: EngineSpec) -> str:
    return f"{LABEL_INSTANCE}={instance_label(spec)}"


def pod_model_dir(spec: EngineSpec, models_dir: Path, settings: KubernetesSettings) -> Path:
    """Where the version's folder is inside a pod: the same path below ``models_path`` as below the
    router's ``models_dir`` (a folder elsewhere is used as it is)."""
    try:
        relative = Path(spec.model_dir).resolve().relative_to(Path(models_dir).resolve())
    except ValueError:
        return Path(spec.model_dir)
    return Path(settings.models_path) / relative


def memory_request_gib(spec: EngineSpec, models_dir_on_router: Path | None = None) -> float:
    """Weights + KV cache + the runtime: what one engine holds in memory."""
    weights = weights_gib(Path(models_dir_on_router or spec.model_dir))
    return round(weights + spec.kv_cache_gib + _RUNTIME_GIB, 2)


def grace_period_s(settings: KubernetesSettings) -> int:
    return settings.prestop_s + settings.shutdown_timeout_s + _GRACE_MARGIN_S


def deployment(spec: EngineSpec, program: ReplicaProgram, settings: KubernetesSettings, replicas: int,
               memory_gib: float, gpus: int = 0, gpu_type: str | None = None) -> dict[str, Any]:
    argv = program.command("0.0.0.0", settings.engine_port)
    if isinstance(program, EngineSpec) and settings.shutdown_timeout_s:
        argv = [*argv, "--shutdown-timeout", str(settings.shutdown_timeout_s)]
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in sorted(program.environment().items())]
    env += [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]
    requests: dict[str, str] = {"cpu": _quantity(settings.cpus_per_replica), "memory": f"{int(memory_gib * 1024)}Mi"}
    limits: dict[str, str] = {"memory": f"{int(memory_gib * 1024 * 1.25)}Mi"}
    if gpus:
        requests[settings.gpu_resource] = limits[settings.gpu_resource] = str(gpus)
    container: dict[str, Any] = {
        "name": CONTAINER, "image": settings.image, "imagePullPolicy": settings.image_pull_policy,
        "command": argv[:1], "args": argv[1:], "env": env,
        "ports": [{"name": "http", "containerPort": settings.engine_port, "protocol": "TCP"}],
        "resources": {"requests": requests, "limits": limits},
        # vLLM answers /health only once the model is loaded; a warm-up is the first request's cost
        "readinessProbe": {"httpGet": {"path": "/health", "port": settings.engine_port}, "periodSeconds": 1,
                           "timeoutSeconds": 1, "failureThreshold": 3, "successThreshold": 1},
        "livenessProbe": {"httpGet": {"path": "/health", "port": settings.engine_port}, "periodSeconds": 10,
                          "timeoutSeconds": 5, "failureThreshold": 6, "initialDelaySeconds": 0},
        "startupProbe": {"httpGet": {"path": "/health", "port": settings.engine_port}, "periodSeconds": 5,
                         "failureThreshold": 120},
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(settings.prestop_s)]}}},
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if settings.models_pvc:
        container["volumeMounts"] = [{"name": "models", "mountPath": settings.models_path, "readOnly": True}]
    pod_spec: dict[str, Any] = {"containers": [container],
                                "terminationGracePeriodSeconds": grace_period_s(settings),
                                "enableServiceLinks": False}
    if settings.service_account:
        pod_spec["serviceAccountName"] = settings.service_account
    if settings.models_pvc:
        pod_spec["volumes"] = [{"name": "models", "persistentVolumeClaim": {"claimName": settings.models_pvc,
                                                                          "readOnly": True}}]
    if gpu_type:
        pod_spec["nodeSelector"] = {settings.gpu_type_label: gpu_type}
    if gpus:
        pod_spec["tolerations"] = [{"key": settings.gpu_resource, "operator": "Exists", "effect": "NoSchedule"}]
    meta = {"name": object_name(spec), "namespace": settings.namespace, "labels": labels(spec),
            "annotations": {ANNOTATION_VERSIONED: spec.versioned_name}}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {LABEL_INSTANCE: instance_label(spec)}},
            # a new pod is ready before an old one goes: the version never has fewer than asked
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {"metadata": {"labels": labels(spec), "annotations": meta["annotations"]},
                         "spec": pod_spec},
        },
    }


def service(spec: EngineSpec, settings: KubernetesSettings) -> dict[str, Any]:
    """A ClusterIP Service per version: for users and tools that address the version directly; the
    router itself routes to ready pods it watches (least outstanding), not through it."""
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": object_name(spec), "namespace": settings.namespace, "labels": labels(spec),
                         "annotations": {ANNOTATION_VERSIONED: spec.versioned_name}},
            "spec": {"selector": {LABEL_INSTANCE: instance_label(spec)},
                     "ports": [{"name": "http", "port": settings.engine_port, "targetPort": "http"}]}}


def _quantity(cpus: float) -> str:
    return str(int(cpus)) if float(cpus).is_integer() else f"{int(cpus * 1000)}m"


def apply_placement(body: dict[str, Any], placement: dict[str, Any]) -> dict[str, Any]:
    """``body`` (a Deployment from ``deployment``) placed as the GPU packing plan says
    (``llmserve.planner.placement_for``): its labels and node selector, the affinity that keeps
    co-located models on one node, and the MPS limits in the engine's environment."""
    template = body["spec"]["template"]
    hints = placement.get("kubernetes") or {}
    template["metadata"]["labels"].update((hints.get("metadata") or {}).get("labels") or {})
    spec = hints.get("spec") or {}
    if spec.get("nodeSelector"):
        template["spec"]["nodeSelector"] = {**template["spec"].get("nodeSelector", {}), **spec["nodeSelector"]}
    if spec.get("affinity"):
        template["spec"]["affinity"] = spec["affinity"]
    container = template["spec"]["containers"][0]
    container["env"] += [{"name": k, "value": str(v)} for k, v in sorted((placement.get("mps") or {}).items())]
    return body
