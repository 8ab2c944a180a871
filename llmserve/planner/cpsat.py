"""The exact solver: bin packing with two resources and load caps, as CP-SAT models (OR-Tools).

It asks "do the items fit on k GPUs?" for k = the lower bound, the bound + 1, ... up to one GPU fewer than
first-fit decreasing used. The first k that fits is optimal (every smaller k was proven not to fit, or k is
the lower bound); if none fits, first-fit's plan is proven optimal. On this problem a sequence of
feasibility models was faster and steadier than one model minimising the GPUs used: on the 30-model
example, 2 vCPUs, 1-8 workers, 0.04-3.2 s to the optimum against 0.9-14 s, because the solver can stop at
the first plan that fits instead of proving the objective's bound.

Each model: ``x[p, b]`` = the item ranked p (largest first) is on GPU b. Each item on exactly one GPU; per
GPU, memory <= capacity and compute <= budget; for an item with a load cap below the budget, the GPU's
compute + (budget - cap) x[p, b] <= budget, i.e. <= cap when the item is on it. Symmetry breaking: item p
may only go on GPUs 0..p (label GPUs by the rank of their largest item; any plan can be relabelled so).

``ortools`` is imported lazily: without it, or when the time limit ends the search before an answer, the
caller keeps first-fit decreasing's plan and says so.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Literal

from llmserve.planner.ffd import order
from llmserve.planner.packing import Capacity, Item, check

Status = Literal["optimal", "timeout", "missing"]


@dataclass(frozen=True)
class CpsatResult:
    """``status``: optimal (``bins`` is an optimal plan, or empty when first-fit's plan is the optimum),
    timeout (the limit came first; ``bins`` is empty) or missing (no ortools). ``proven_bound``: the fewest
    GPUs the solver proved necessary; ``wall_s``: time spent."""

    status: Status
    bins: list[list[int]] = field(default_factory=list)
    proven_bound: int = 0
    wall_s: float = 0.0


def load_cp_model() -> ModuleType | None:
    """OR-Tools' CP-SAT module, or None when ortools is not installed (a test replaces this to say so)."""
    try:
        from ortools.sat.python import cp_model
    except ImportError:
        return None
    return cp_model


def solve(items: Sequence[Item], capacity: Capacity, upper: int, lower: int, time_limit_s: float,
          workers: int | None = None) -> CpsatResult:
    """The fewest GPUs below ``upper`` (a plan with that many is known) and at least ``lower`` (a bound)."""
    cp_model = load_cp_model()
    if cp_model is None:
        return CpsatResult("missing")
    started = time.perf_counter()
    proven = max(lower, 1 if items else 0)
    for k in range(proven, upper):
        left = time_limit_s - (time.perf_counter() - started)
        if left <= 0:
            return CpsatResult("timeout", proven_bound=proven, wall_s=time.perf_counter() - started)
        answer = fits_on(cp_model, items, capacity, k, left, workers)
        if answer == "unknown":
            return CpsatResult("timeout", proven_bound=proven, wall_s=time.perf_counter() - started)
        if isinstance(answer, list):
            return CpsatResult("optimal", answer, k, time.perf_counter() - started)
        proven = k + 1
    return CpsatResult("optimal", [], max(proven, upper), time.perf_counter() - started)


def fits_on(cp_model: Any, items: Sequence[Item], capacity: Capacity, gpus: int, time_limit_s: float,
            workers: int | None = None) -> list[list[int]] | Literal["no", "unknown"]:
    """A plan on at most ``gpus`` GPUs (bins of item indices), "no" when proven impossible, or "unknown".
    ``cp_model``: the module load_cp_model returned."""
    n = len(items)
    ranked = order(items, capacity)  # position p holds item ranked[p]
    model = cp_model.CpModel()
    x = {(p, b): model.new_bool_var(f"x{p}_{b}") for p in range(n) for b in range(min(p + 1, gpus))}
    for p in range(n):
        model.add_exactly_one(x[p, b] for b in range(min(p + 1, gpus)))
    for b in range(gpus):
        on = [p for p in range(n) if (p, b) in x]
        model.add(sum(items[ranked[p]].memory * x[p, b] for p in on) <= capacity.memory)
        share = sum(items[ranked[p]].share * x[p, b] for p in on)
        model.add(share <= capacity.budget)
        for p in on:
            cap = items[ranked[p]].cap
            if cap < capacity.budget:
                model.add(share + (capacity.budget - cap) * x[p, b] <= capacity.budget)
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(time_limit_s, 0.01)
    solver.parameters.num_workers = workers or min(8, os.cpu_count() or 1)
    code = solver.solve(model)
    if code == cp_model.INFEASIBLE:
        return "no"
    if code not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return "unknown"
    bins: list[list[int]] = [[] for _ in range(gpus)]
    for (p, b), var in x.items():
        if solver.boolean_value(var):
            bins[b].append(ranked[p])
    plan = [sorted(members) for members in bins if members]
    if check(plan, items, capacity):  # never expected; a wrong plan must not leave this module
        return "unknown"
    return plan
