"""The GPU packing planner: place many models on as few GPUs as memory, compute and latency SLAs allow.

``make_plan(load_fleet("models.yaml"))`` gives a Plan; ``placement_for(plan, name)`` what the backend
applies to one model (MPS limits, Kubernetes hints). ``llmserve plan`` is the command line. The modules:
schema (input), cost (the cost model), packing (the integer problem), ffd and cpsat (the solvers),
bounds, solve (the entry point), plan and placement (the output).
"""

from llmserve.planner.errors import PlanInputError
from llmserve.planner.loading import fleet_from_data, load_fleet
from llmserve.planner.placement import placement_for
from llmserve.planner.plan import GpuPlan, ModelPlacement, Plan
from llmserve.planner.schema import Fleet, GpuType, ModelSpec
from llmserve.planner.solve import make_plan

__all__ = ["Fleet", "GpuPlan", "GpuType", "ModelPlacement", "ModelSpec", "Plan", "PlanInputError",
           "fleet_from_data", "load_fleet", "make_plan", "placement_for"]
