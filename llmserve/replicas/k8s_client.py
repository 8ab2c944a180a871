"""Connecting to the Kubernetes API with the official client, and saying clearly why it fails.

The backend checks at start what it will need, so a broken kubeconfig or a missing RBAC rule is one
clear error when the router starts, not a 403 in the middle of a rollout: it asks the apiserver
(SelfSubjectAccessReview) for every verb it uses and names the ones refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from llmserve.errors import BackendUnavailable
from llmserve.settings import KubernetesSettings

# (API group, resource, verb): what KubernetesBackend does, and the chart's Role grants
NEEDED: tuple[tuple[str, str, str], ...] = (
    *(("apps", "deployments", v) for v in ("get", "list", "watch", "create", "patch", "update", "delete")),
    *(("apps", "deployments/scale", v) for v in ("get", "patch", "update")),
    *(("", "services", v) for v in ("get", "list", "create", "patch", "delete")),
    *(("", "pods", v) for v in ("get", "list", "watch", "delete")),
    *(("coordination.k8s.io", "leases", v) for v in ("get", "create", "update")),  # electing the leader
)


def api_client(settings: KubernetesSettings) -> client.ApiClient:
    """A client from the settings' kubeconfig, else in-cluster credentials in a pod, else ~/.kube/config."""
    try:
        if settings.kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            configuration = client.Configuration()
            config.load_incluster_config(client_configuration=configuration)
            return client.ApiClient(configuration)
        path = settings.kubeconfig or Path.home() / ".kube" / "config"
        if not Path(path).is_file():
            raise BackendUnavailable(f"kubernetes.kubeconfig: no kubeconfig file at {path}; set "
                                     "LLMSERVE_KUBERNETES__KUBECONFIG or run the router in a pod")
        return config.new_client_from_config(config_file=str(path), context=settings.context)
    except (ConfigException, ValueError, OSError, yaml.YAMLError) as exc:
        raise BackendUnavailable(f"kubernetes.kubeconfig {settings.kubeconfig or '~/.kube/config'} does not "
                                 f"work: {exc}") from None


def describe(exc: BaseException, doing: str) -> str:
    """An API failure in an operator's words: who was refused what, or why the cluster was not reached."""
    if isinstance(exc, ApiException):
        try:
            message = json.loads(exc.body or "{}").get("message") or exc.reason
        except (ValueError, AttributeError):
            message = exc.reason
        if exc.status == 401:
            return f"{doing}: the cluster rejected the kubeconfig's credentials (401 Unauthorized)"
        if exc.status == 403:
            return f"{doing}: forbidden by RBAC: {message}"
        return f"{doing}: {exc.status} {message}"
    return f"{doing}: cannot reach the Kubernetes API ({type(exc).__name__}: {exc})"


def check_access(api: client.ApiClient, namespace: str) -> None:
    """Raise ``BackendUnavailable`` unless every verb the backend uses is allowed in ``namespace``."""
    authz = client.AuthorizationV1Api(api)
    refused: list[str] = []
    try:
        for group, resource, verb in NEEDED:
            plural, _, sub = resource.partition("/")
            review: dict[str, Any] = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                      "spec": {"resourceAttributes": {"namespace": namespace, "group": group, "resource": plural,
                                                      "subresource": sub, "verb": verb}}}
            answer: Any = authz.create_self_subject_access_review(review, _preload_content=False,  # type: ignore[arg-type]
                                                                  _request_timeout=10)
            if not json.loads(answer.data).get("status", {}).get("allowed"):
                refused.append(f"{verb} {resource}" + (f".{group}" if group else ""))
    except Exception as exc:  # the client raises urllib3's and its own errors alike
        raise BackendUnavailable(describe(exc, f"checking access to namespace {namespace}")) from None
    if refused:
        raise BackendUnavailable(f"forbidden by RBAC in namespace {namespace}: this router may not "
                                 f"{', '.join(refused)}; grant them with the Role of deploy/helm/llmserve "
                                 "(or `llmserve k8s manifests`)")
