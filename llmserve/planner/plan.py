"""What the planner returns: one entry per GPU, one per model, and how the plan compares with its bounds.

Plain pydantic models, so ``plan.model_dump(mode="json")`` is the JSON the command line writes and a
caller (the Kubernetes backend, a dashboard) reads the same fields the table shows.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

SolverName = Literal["auto", "ffd", "cpsat"]
PlanStatus = Literal["optimal", "heuristic"]


class GpuPlan(BaseModel):
    """One GPU. ``load_limit``: the compute its models may use together, min(budget, their load caps);
    ``dedicated_to``: the tensor-parallel model that owns it whole, if any."""

    model_config = ConfigDict(frozen=True)

    index: int
    gpu_type: str
    product: str
    models: list[str]
    dedicated_to: str | None = None
    memory_gib: float
    memory_used_gib: float
    memory_free_gib: float
    compute_share: float
    load_limit: float


class ModelPlacement(BaseModel):
    """One model: where it runs and what to start it with.

    ``gpu_index``: its GPU (the first of ``gpu_indices`` for tensor parallelism); ``memory_gib`` and
    ``compute_share``: per GPU it occupies; ``predicted_latency_ms``: the cost model's mean latency at its
    GPU's planned load; ``memory_fraction``: its memory over the GPU's, e.g. for vLLM's
    --gpu-memory-utilization; ``mps``: environment for the engine container; ``kubernetes``: a pod
    template fragment (see placement.kubernetes_hints)."""

    model_config = ConfigDict(frozen=True)

    model: str
    gpu_type: str
    gpu_index: int
    gpu_indices: list[int]
    tensor_parallel: int
    memory_gib: float
    compute_share: float
    service_time_ms: float
    predicted_latency_ms: float
    latency_sla_ms: float
    memory_fraction: float
    mps: dict[str, str]
    kubernetes: dict[str, Any]


class GroupResult(BaseModel):
    """How one GPU type's models were packed. ``solver``: what produced the plan; ``proof`` of its
    optimality: it meets the lower bound, or CP-SAT proved no fewer GPUs fit (None: not proven);
    ``cpsat_ran``: whether CP-SAT was asked; ``ffd_gpus``: what first-fit decreasing alone used;
    ``lower_bound``: max(memory_bound, compute_bound) + dedicated GPUs."""

    model_config = ConfigDict(frozen=True)

    gpu_type: str
    models: int
    solver: Literal["ffd", "cpsat"]
    status: PlanStatus
    proof: Literal["lower-bound", "cpsat"] | None
    cpsat_ran: bool
    gpus: int
    ffd_gpus: int
    memory_bound: int
    compute_bound: int
    dedicated_gpus: int
    lower_bound: int
    solve_time_s: float


class Plan(BaseModel):
    """The whole plan. ``status``: optimal (proven, for every GPU type: it meets the lower bound, or CP-SAT
    proved no fewer GPUs fit) or heuristic (first-fit decreasing's plan, not proven optimal: CP-SAT was not
    asked, is not installed, or hit the time limit); ``notes``: fallbacks and why."""

    model_config = ConfigDict(frozen=True)

    solver_requested: SolverName
    status: PlanStatus
    gpus_used: int
    ffd_gpus: int
    lower_bound: int
    memory_bound: int
    compute_bound: int
    dedicated_gpus: int
    gap_gpus: int
    gap_ratio: float
    solve_time_s: float
    cost_model: str
    notes: list[str]
    groups: list[GroupResult]
    gpus: list[GpuPlan]
    placements: list[ModelPlacement]

    def placement(self, model: str) -> ModelPlacement:
        for p in self.placements:
            if p.model == model:
                return p
        raise KeyError(f"no model {model!r} in this plan (it has: {', '.join(p.model for p in self.placements)})")
