"""How a plan is applied: MPS limits for each engine process and Kubernetes hints for its pod.

* ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``: the SM share the process may use, a *cap* (MPS lets the caps of
  co-located clients add up to more than 100; the packing's budget is what bounds the GPU's load). Sized
  as the smallest slice that both serves the model within its SLA by the cost model (a slice p serves
  requests in S/p, so the PS latency is S / (p - share): p >= share + S / SLA) and keeps its own load in
  the slice within the GPU's budget (p >= share / budget); rounded up to a whole percent.
* ``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT``: ``0=<MiB>M``, the memory the plan reserved for it (weights, KV
  cache and overhead), on device 0 as the container sees its one GPU. The limits on a GPU add up to at
  most its memory by construction.
* GPUs shared by time-slicing, and whole GPUs of a tensor-parallel model, get no MPS limits.
* Kubernetes: a pod template fragment: ``metadata.labels`` ``llmserve.io/gpu-group: gpu-<n>`` (its GPU),
  ``spec.nodeSelector`` on ``nvidia.com/gpu.product`` (its GPU type), and, for models that share a GPU, a
  required pod affinity to pods with the same group label on the same node (``kubernetes.io/hostname``).
  The scheduler's unit is the node: which physical GPU of that node a shared pod gets is the device
  plugin's choice, so the affinity co-locates the group on one node, not yet on one device.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from llmserve.planner.cost import Demand
from llmserve.planner.packing import mib_up
from llmserve.planner.plan import Plan

GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"  # = llmserve.settings.KubernetesSettings.gpu_type_label's default
GPU_GROUP_LABEL = "llmserve.io/gpu-group"
NODE_TOPOLOGY = "kubernetes.io/hostname"


def group_name(gpu_index: int) -> str:
    return f"gpu-{gpu_index}"


def thread_percentage(demand: Demand, budget: float) -> int:
    """CUDA_MPS_ACTIVE_THREAD_PERCENTAGE for a model on a shared GPU (the module docstring's rule)."""
    slice_needed = max(demand.share / budget, demand.share + demand.service_time_ms / demand.model.latency_sla_ms)
    return max(1, min(100, math.ceil(round(100 * slice_needed, 6))))


def mps_env(demand: Demand) -> dict[str, str]:
    """The MPS environment of the model's engine container (also when it is alone on its GPU, so a model
    added there later finds the limits in place); empty when MPS limits do not apply."""
    if demand.gpu.sharing != "mps" or demand.dedicated:
        return {}
    return {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(thread_percentage(demand, demand.gpu.compute_budget)),
            "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": f"0={mib_up(demand.memory_gib)}M"}


def kubernetes_hints(product: str, gpu_index: int, co_located: bool) -> dict[str, Any]:
    """A pod template fragment: merge ``metadata`` into the template's metadata and ``spec`` into its spec."""
    group = group_name(gpu_index)
    spec: dict[str, Any] = {"nodeSelector": {GPU_PRODUCT_LABEL: product}}
    if co_located:
        spec["affinity"] = {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"labelSelector": {"matchLabels": {GPU_GROUP_LABEL: group}}, "topologyKey": NODE_TOPOLOGY}]}}
    return {"metadata": {"labels": {GPU_GROUP_LABEL: group}}, "spec": spec}


def placement_for(plan: Plan, model_name: str) -> dict[str, Any]:
    """What the backend applies for one model: its GPU(s), MPS environment and Kubernetes hints.

    ``{"model", "gpu_type", "gpu_index", "gpu_indices", "gpus" (whole GPUs to request), "mps" (env),
    "kubernetes": {"metadata": {"labels"}, "spec": {"nodeSelector", "affinity"?}}}``. KeyError for a model
    the plan does not have."""
    p = plan.placement(model_name)
    return {"model": p.model, "gpu_type": p.gpu_type, "gpu_index": p.gpu_index, "gpu_indices": list(p.gpu_indices),
            "gpus": p.tensor_parallel, "mps": dict(p.mps), "kubernetes": copy.deepcopy(p.kubernetes)}
