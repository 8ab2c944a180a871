"""The planner's entry point: a Fleet in, a Plan out.

Models are grouped by the GPU type they go on and each group is packed on its own (a model is not moved to
another type to save a GPU: open, see the README). In a group, tensor-parallel models take whole GPUs and
the rest are packed: first-fit decreasing always, then CP-SAT unless asked not to (``ffd``). CP-SAT has
nothing to search when first-fit already meets the lower bound (the plan is optimal by the bound), so
``auto`` and ``cpsat`` differ only in that ``cpsat`` fails loudly in the notes when ortools is missing even
then. CP-SAT missing, or timing out before an answer, leaves the first-fit plan, with a note saying why;
when CP-SAT proves that first-fit's count is the optimum, the plan stays first-fit's (solver "ffd", proof
"cpsat").
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Literal

from llmserve.planner import cpsat
from llmserve.planner.bounds import Bound, gap, lower_bound
from llmserve.planner.cost import Demand, demand_for
from llmserve.planner.ffd import first_fit_decreasing
from llmserve.planner.packing import Capacity, mib_down, units_down
from llmserve.planner.placement import kubernetes_hints, mps_env
from llmserve.planner.plan import GpuPlan, GroupResult, ModelPlacement, Plan, PlanStatus, SolverName
from llmserve.planner.schema import Fleet, GpuType

COST_MODEL = ("memory = weights + KV cache + per-process overhead; compute share = qps x service time "
              "(service_ms_base + service_ms_per_gib x weights unless measured); latency = service / (1 - GPU "
              "load) (processor sharing): an estimate, not a measurement")


def capacity_of(gpu: GpuType) -> Capacity:
    return Capacity(mib_down(gpu.memory_gib), units_down(gpu.compute_budget))


def demands(fleet: Fleet) -> list[Demand]:
    """Every model's demand on its GPU type; PlanInputError for the first that cannot be placed."""
    return [demand_for(m, fleet.gpu_for(m), i) for i, m in enumerate(fleet.models)]


def make_plan(fleet: Fleet, solver: SolverName = "auto", time_limit_s: float = 10.0,
              workers: int | None = None) -> Plan:
    """Pack the fleet's models onto as few GPUs as the chosen solver finds within ``time_limit_s`` (the
    whole plan's CP-SAT time, shared by the GPU types in turn)."""
    started = time.perf_counter()
    all_demands = demands(fleet)
    notes: list[str] = []
    groups: list[GroupResult] = []
    gpus: list[GpuPlan] = []
    placements: list[ModelPlacement] = []
    for gpu in fleet.gpu_types:
        members = [d for d in all_demands if d.gpu.name == gpu.name]
        if not members:
            continue
        remaining = max(0.0, time_limit_s - (time.perf_counter() - started))
        result, bins = _pack_group(gpu, [d for d in members if not d.dedicated],
                                   [d for d in members if d.dedicated], solver, remaining, workers, notes)
        groups.append(result)
        _emit(gpu, bins, gpus, placements)
    position = {d.model.name: d.index for d in all_demands}
    placements.sort(key=lambda p: position[p.model])
    bound = sum((Bound(g.memory_bound, g.compute_bound, g.dedicated_gpus) for g in groups), Bound(0, 0))
    used = len(gpus)
    lower = sum(g.lower_bound for g in groups)
    gap_gpus, ratio = gap(used, lower)
    statuses = {g.status for g in groups}
    status: PlanStatus = "heuristic" if "heuristic" in statuses else "optimal"
    return Plan(solver_requested=solver, status=status, gpus_used=used, ffd_gpus=sum(g.ffd_gpus for g in groups),
                lower_bound=lower, memory_bound=bound.memory, compute_bound=bound.compute,
                dedicated_gpus=bound.dedicated, gap_gpus=gap_gpus, gap_ratio=round(ratio, 3),
                solve_time_s=round(time.perf_counter() - started, 3), cost_model=COST_MODEL, notes=notes,
                groups=groups, gpus=gpus, placements=placements)


def _pack_group(gpu: GpuType, shared: list[Demand], dedicated: list[Demand], solver: SolverName,
                time_limit_s: float, workers: int | None, notes: list[str]
                ) -> tuple[GroupResult, list[list[Demand]]]:
    """One GPU type: (its result, its GPUs as lists of demands; a tensor-parallel model once per GPU)."""
    started = time.perf_counter()
    capacity = capacity_of(gpu)
    items = [d.item() for d in shared]
    ffd_bins = first_fit_decreasing(items, capacity)
    whole = sum(d.model.tensor_parallel for d in dedicated)
    bound = lower_bound(items, capacity, whole)
    bins, status = ffd_bins, _ffd_status(len(ffd_bins), bound)
    proof: Literal["lower-bound", "cpsat"] | None = "lower-bound" if status == "optimal" else None
    used_solver: Literal["ffd", "cpsat"] = "ffd"
    cpsat_ran = solver == "cpsat" or (solver == "auto" and status != "optimal")
    if cpsat_ran:
        found = cpsat.solve(items, capacity, len(ffd_bins), bound.best - whole, time_limit_s, workers)
        if found.status == "missing":
            notes.append(f"{gpu.name}: CP-SAT not available (pip install ortools); first-fit decreasing used")
        elif found.status == "timeout":
            notes.append(f"{gpu.name}: CP-SAT reached the time limit ({time_limit_s:.1f} s) having proven "
                         f"{found.proven_bound + whole} GPUs necessary; first-fit decreasing's plan kept")
        else:  # optimal: CP-SAT's plan, or first-fit's when CP-SAT proved nothing smaller fits
            proof = proof or "cpsat"  # first-fit on the bound needs no search to be optimal
            bins, status = (found.bins or ffd_bins), "optimal"
            used_solver = "cpsat" if found.bins else "ffd"
    gpu_lists = [[shared[i] for i in members] for members in bins]
    gpu_lists += [[d] for d in dedicated for _ in range(d.model.tensor_parallel)]
    result = GroupResult(gpu_type=gpu.name, models=len(shared) + len(dedicated), solver=used_solver,
                         status=status, proof=proof, cpsat_ran=cpsat_ran, gpus=len(gpu_lists),
                         ffd_gpus=len(ffd_bins) + whole,
                         memory_bound=bound.memory, compute_bound=bound.compute, dedicated_gpus=whole,
                         lower_bound=bound.best, solve_time_s=round(time.perf_counter() - started, 3))
    return result, gpu_lists


def _ffd_status(ffd_gpus: int, bound: Bound) -> PlanStatus:
    return "optimal" if ffd_gpus + bound.dedicated == bound.best else "heuristic"


def _emit(gpu: GpuType, bins: Sequence[Sequence[Demand]], gpus: list[GpuPlan],
          placements: list[ModelPlacement]) -> None:
    """Number this group's GPUs after those already emitted and describe them and their models.
    Shared GPUs are ordered by their largest model's memory, so the big ones come first in the table."""
    order = sorted(range(len(bins)), key=lambda b: (bins[b][0].dedicated, -max(d.memory_gib for d in bins[b])))
    seen_dedicated: dict[str, list[int]] = {}
    for b in order:
        members = sorted(bins[b], key=lambda d: -d.memory_gib)
        index = len(gpus)
        used = sum(d.memory_gib for d in members)
        load = sum(d.share for d in members)
        dedicated = members[0].model.name if members[0].dedicated else None
        gpus.append(GpuPlan(index=index, gpu_type=gpu.name, product=gpu.product, models=[d.model.name for d in members],
                            dedicated_to=dedicated, memory_gib=gpu.memory_gib, memory_used_gib=round(used, 3),
                            memory_free_gib=round(gpu.memory_gib - used, 3), compute_share=round(load, 4),
                            load_limit=round(min([gpu.compute_budget, *(d.load_cap for d in members)]), 4)))
        if dedicated is not None:
            seen_dedicated.setdefault(dedicated, []).append(index)
            if len(seen_dedicated[dedicated]) < members[0].model.tensor_parallel:
                continue
        for d in members:
            indices = seen_dedicated.get(d.model.name, [index])
            placements.append(ModelPlacement(
                model=d.model.name, gpu_type=gpu.name, gpu_index=indices[0], gpu_indices=indices,
                tensor_parallel=d.model.tensor_parallel, memory_gib=round(d.memory_gib, 3),
                compute_share=round(d.share, 4), service_time_ms=round(d.service_time_ms, 3),
                predicted_latency_ms=round(d.latency_ms(load), 3), latency_sla_ms=d.model.latency_sla_ms,
                memory_fraction=round(d.memory_gib / gpu.memory_gib, 4), mps=mps_env(d),
                kubernetes=kubernetes_hints(gpu.product, indices[0], co_located=len(members) > 1)))
