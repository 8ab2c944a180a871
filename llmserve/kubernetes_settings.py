"""The Kubernetes replica backend's part of the settings tree (``Settings.kubernetes``,
``LLMSERVE_KUBERNETES__<FIELD>``); kept apart so the tree's root module stays small."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field


class KubernetesSettings(BaseModel):
    """Where and how the Kubernetes replica backend (``LLMSERVE_BACKEND=kubernetes``) runs engines:
    one Deployment and one Service per model version in ``namespace``."""

    namespace: str = Field("default", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63,
                           description="Namespace of the engines' Deployments and Services.")
    kubeconfig: Path | None = Field(
        None, description="A kubeconfig file; unset: in-cluster credentials inside a pod, else ~/.kube/config.")
    context: str | None = Field(None, description="The kubeconfig context; unset: its current one.")
    image: str = Field("llmserve:latest", description="The image the engine pods run (the Dockerfile's).")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    service_account: str | None = None  # the engine pods' (they need no API access)
    engine_port: int = Field(8000, ge=1, le=65535, description="The port the engine listens on in its pod.")
    models_path: str = Field(
        "/var/lib/llmserve/models", description="Where the model repository is inside an engine pod; a version's "
        "folder is found there by the same relative path as in the router's models_dir.")
    models_pvc: str | None = Field(
        None, description="A PersistentVolumeClaim holding the model repository, mounted read-only at "
        "models_path; unset: the models baked into the image.")
    cpus_per_replica: float = Field(2.0, gt=0, description="CPU request of an engine pod (no CPU limit).")
    prestop_s: int = Field(
        10, ge=0, le=300, description="An engine pod being deleted keeps serving this long before SIGTERM, so "
        "every router has seen it terminating and stopped sending to it.")
    shutdown_timeout_s: int = Field(
        30, ge=0, le=3600, description="After SIGTERM, vLLM finishes in-flight requests for up to this long "
        "(--shutdown-timeout); the pod's termination grace period is prestop_s + this + 5.")
    schedule_timeout_s: float = Field(
        120.0, gt=0, description="A pod the scheduler cannot place (no GPU of the kind, no room) fails its "
        "deployment after this long, with the scheduler's reason.")
    gpu_resource: str = "nvidia.com/gpu"  # the extended resource a GPU is requested as
    gpu_type: str | None = Field(
        None, description="The GPU kind a version with resources.gpu runs on: its pods select nodes whose "
        "gpu_type_label is this (e.g. NVIDIA-A100-SXM4-80GB); unset: any node with the GPUs.")
    placement_plan: Path | None = Field(
        None, description="A plan from `llmserve plan --json`: a version of a model it places gets the plan's "
        "node selector, co-location affinity and MPS limits on its pods.")
    gpu_type_label: str = Field(
        "nvidia.com/gpu.product", description="The node label a version's resources.gpu_type selects on (the "
        "GPU Operator's feature discovery sets it, e.g. NVIDIA-A100-SXM4-80GB).")
    leader_lease: str = Field(
        "llmserve-router-leader", description="The coordination.k8s.io Lease the routers elect the leader of "
        "the control loops with.")
    leader_lease_s: float = Field(10.0, gt=0, le=300, description="A silent leader is replaced after this.")
