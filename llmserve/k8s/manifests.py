"""The router's objects on Kubernetes, as plain dicts: RBAC, settings, Deployment, Service, PDB,
Redis, and monitoring. The Role grants exactly what ``llmserve.replicas.k8s_client.NEEDED`` lists,
the verbs the backend checks for at start, and nothing more."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from llmserve.k8s.values import Values
from llmserve.replicas.k8s_client import NEEDED

NAME = "llmserve-router"
LABELS = {"app.kubernetes.io/name": "llmserve", "app.kubernetes.io/component": "router"}
REDIS_LABELS = {"app.kubernetes.io/name": "llmserve", "app.kubernetes.io/component": "redis"}
PORT = 8000
_MONITORING = Path(__file__).resolve().parent.parent.parent / "monitoring"


def _meta(name: str, values: Values, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"name": name, "namespace": values.namespace, "labels": dict(labels or LABELS)}


def rules() -> list[dict[str, Any]]:
    """The Role's rules, one per API group and resource, from what the backend needs."""
    verbs: dict[tuple[str, str], list[str]] = defaultdict(list)
    for group, resource, verb in NEEDED:
        verbs[(group, resource)].append(verb)
    return [{"apiGroups": [group], "resources": [resource], "verbs": sorted(v)}
            for (group, resource), v in sorted(verbs.items())]


def settings_env(values: Values) -> dict[str, str]:
    """The router's settings as environment variables (llmserve.settings reads them)."""
    redis = values.redis.url or f"redis://llmserve-redis.{values.namespace}.svc:6379/0"
    env = {"LLMSERVE_BACKEND": "kubernetes", "LLMSERVE_KUBERNETES__NAMESPACE": values.namespace,
           "LLMSERVE_KUBERNETES__IMAGE": values.engine_image or values.router.image,
           "LLMSERVE_ROUTER__HOST": "0.0.0.0", "LLMSERVE_REDIS_URL": redis, "LLMSERVE_LOG_FORMAT": "json",
           "HF_HUB_OFFLINE": "1"}
    if values.models_pvc:
        env["LLMSERVE_KUBERNETES__MODELS_PVC"] = values.models_pvc
    return env


def router_deployment(values: Values) -> dict[str, Any]:
    probe = {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10, "timeoutSeconds": 3}
    container = {
        "name": "router", "image": values.router.image, "command": ["llmserve", "up"],
        "ports": [{"name": "http", "containerPort": PORT}],
        "envFrom": [{"configMapRef": {"name": "llmserve-settings"}}],
        # the admin key only ever from a Secret, never the ConfigMap
        "env": [{"name": "LLMSERVE_ADMIN_KEY", "valueFrom": {"secretKeyRef": {
            "name": values.router.admin_key_secret, "key": "admin-key"}}}],
        "readinessProbe": {**probe, "httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5},
        "livenessProbe": {**probe, "failureThreshold": 6},
        "resources": {"requests": {"cpu": values.router.cpu, "memory": values.router.memory},
                      "limits": {"memory": values.router.memory}},
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(NAME, values),
            "spec": {"replicas": values.router.replicas, "selector": {"matchLabels": LABELS},
                     "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
                     "template": {"metadata": {"labels": LABELS},
                                  "spec": {"serviceAccountName": NAME, "containers": [container],
                                           "terminationGracePeriodSeconds": 60}}}}


def redis_objects(values: Values) -> list[dict[str, Any]]:
    if not values.redis.enabled:
        return []
    container = {"name": "redis", "image": values.redis.image, "args": ["--appendonly", "yes"],
                 "ports": [{"name": "redis", "containerPort": 6379}],
                 "readinessProbe": {"tcpSocket": {"port": "redis"}, "periodSeconds": 5}}
    return [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta("llmserve-redis", values, REDIS_LABELS),
         "spec": {"replicas": 1, "selector": {"matchLabels": REDIS_LABELS}, "strategy": {"type": "Recreate"},
                  "template": {"metadata": {"labels": REDIS_LABELS}, "spec": {"containers": [container]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": _meta("llmserve-redis", values, REDIS_LABELS),
         "spec": {"selector": REDIS_LABELS, "ports": [{"name": "redis", "port": 6379, "targetPort": "redis"}]}},
    ]


def monitoring_objects(values: Values) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    if values.monitoring.service_monitor:
        found.append({"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
                      "metadata": _meta(NAME, values),
                      "spec": {"selector": {"matchLabels": LABELS},
                               "endpoints": [{"port": "http", "path": "/metrics", "interval": "15s"}]}})
    if values.monitoring.grafana_dashboard:
        dashboard = json.loads((_MONITORING / "grafana-dashboard.json").read_text())
        found.append({"apiVersion": "v1", "kind": "ConfigMap",
                      "metadata": _meta("llmserve-dashboard", values, {**LABELS, "grafana_dashboard": "1"}),
                      "data": {"llmserve.json": json.dumps(dashboard, indent=1)}})
    return found


def objects(values: Values) -> list[dict[str, Any]]:
    subject = [{"kind": "ServiceAccount", "name": NAME, "namespace": values.namespace}]
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(NAME, values)},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": _meta(NAME, values),
         "rules": rules()},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": _meta(NAME, values),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": NAME}, "subjects": subject},
        # the autoscaler's capacity check reads the nodes' allocatable resources (cluster-scoped)
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": f"{NAME}-{values.namespace}-nodes", "labels": LABELS},
         "rules": [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": f"{NAME}-{values.namespace}-nodes", "labels": LABELS},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": f"{NAME}-{values.namespace}-nodes"}, "subjects": subject},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta("llmserve-settings", values),
         "data": settings_env(values)},
        router_deployment(values),
        {"apiVersion": "v1", "kind": "Service", "metadata": _meta(NAME, values),
         "spec": {"selector": LABELS, "ports": [{"name": "http", "port": PORT, "targetPort": "http"}]}},
        {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": _meta(NAME, values),
         "spec": {"minAvailable": 1, "selector": {"matchLabels": LABELS}}},
        *redis_objects(values),
        *monitoring_objects(values),
    ]
