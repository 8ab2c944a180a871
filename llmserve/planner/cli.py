"""``llmserve plan``: read a models file, pack it, print the plan as tables and write it as JSON.

Bad input exits 2 with one line naming the field and the fix (PlanInputError), never a traceback: the
person running this is editing a YAML file, not debugging the planner.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from llmserve.planner.errors import PlanInputError
from llmserve.planner.plan import Plan

SOLVER_LABEL = {"cpsat": "CP-SAT", "ffd": "first-fit decreasing"}


def add_parser(sub: Any) -> None:
    """Register ``plan`` on the main command's subparsers."""
    plan = sub.add_parser("plan", help="pack models onto as few GPUs as their memory, compute and SLAs allow",
                          description="Pack models onto GPUs (first-fit decreasing, then CP-SAT) and print the "
                          "plan; see the README's 'GPU packing planner'.")
    plan.add_argument("--models", required=True, metavar="FILE.yaml",
                      help="models and GPU types, e.g. llmserve/planner/examples/a100-30-models.yaml")
    plan.add_argument("--solver", choices=["auto", "ffd", "cpsat"], default="auto",
                      help="auto: CP-SAT unless first-fit decreasing already meets the lower bound (default); "
                      "ffd: first-fit decreasing only; cpsat: always CP-SAT")
    plan.add_argument("--time-limit-s", type=float, default=10.0, help="CP-SAT's time limit (default 10)")
    plan.add_argument("--json", metavar="OUT", help="also write the plan as JSON here")
    plan.set_defaults(func=lambda args, settings: run(args))


def run(args: argparse.Namespace) -> int:
    from llmserve.planner.loading import load_fleet
    from llmserve.planner.solve import make_plan

    try:
        if args.time_limit_s <= 0:
            raise PlanInputError("--time-limit-s", f"must be positive (got {args.time_limit_s:g})", "e.g. 10")
        plan = make_plan(load_fleet(args.models), solver=args.solver, time_limit_s=args.time_limit_s)
        if args.json:
            write_json(plan, Path(args.json))
    except PlanInputError as exc:
        print(f"llmserve plan: {exc}", file=sys.stderr)
        return 2
    render(plan)
    return 0


def write_json(plan: Plan, out: Path) -> None:
    try:
        out.write_text(json.dumps(plan.model_dump(mode="json"), indent=2) + "\n")
    except OSError as exc:
        raise PlanInputError("--json", f"cannot write {str(out)!r}: {exc.strerror or exc}",
                             "pass a path in an existing, writable folder") from None


def summary(plan: Plan) -> str:
    """One line: GPUs used, by what, against first-fit decreasing and the lower bound."""
    solvers = sorted({SOLVER_LABEL[g.solver] for g in plan.groups})
    return (f"{len(plan.placements)} models on {plan.gpus_used} GPUs ({' + '.join(solvers)}, {plan.status}); "
            f"first-fit decreasing: {plan.ffd_gpus}; lower bound: {plan.lower_bound} (memory {plan.memory_bound}, "
            f"compute {plan.compute_bound}{f', dedicated {plan.dedicated_gpus}' if plan.dedicated_gpus else ''}); "
            f"{plan.gap_gpus} above it; {plan.solve_time_s:.2f} s")


def render(plan: Plan, console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    # not a terminal (a pipe, a CI log): wide enough that model names are not cut
    console = console or (Console() if sys.stdout.isatty() else Console(width=160))
    gpus = Table(title="GPUs")
    for column in ("#", "type", "models", "mem used GiB", "mem free GiB", "compute", "limit"):
        gpus.add_column(column, justify="left" if column in ("type", "models") else "right", overflow="fold")
    for g in plan.gpus:
        gpus.add_row(str(g.index), g.gpu_type, "\n".join(g.models), f"{g.memory_used_gib:.1f}",
                     f"{g.memory_free_gib:.1f}", f"{g.compute_share:.2f}", f"{g.load_limit:.2f}")
    models = Table(title="Models")
    for column in ("model", "GPU", "mem GiB", "share", "latency ms (model)", "SLA ms", "MPS threads %", "MPS mem"):
        models.add_column(column, justify="left" if column == "model" else "right", overflow="fold")
    for p in plan.placements:
        where = ",".join(map(str, p.gpu_indices))
        models.add_row(p.model, where, f"{p.memory_gib:.1f}", f"{p.compute_share:.3f}",
                       f"{p.predicted_latency_ms:.1f}", f"{p.latency_sla_ms:g}",
                       p.mps.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "-"),
                       p.mps.get("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT", "-"))
    console.print(gpus)
    console.print(models)
    console.print(summary(plan), highlight=False)
    for note in plan.notes:
        console.print(f"note: {note}", highlight=False)
    console.print(f"cost model: {plan.cost_model}", highlight=False, style="dim")
