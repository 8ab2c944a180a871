"""Lower bounds on the GPUs a group of models needs, and how far a plan is from them.

No plan can use fewer GPUs than ``ceil(total memory / GPU memory)`` or ``ceil(total compute share /
budget)``; the larger of the two is the bound a plan is measured against. It is a bound, not a promise:
when items are awkward sizes (two 41 GiB models cannot share an 80 GiB GPU) the optimum sits above it,
and only the exact solver's proof (status ``optimal``) says a plan cannot be improved. Computed on the
quantized sizes the solvers see, so it bounds exactly the problem they solve.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from llmserve.planner.packing import Capacity, Item


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Bound:
    """Lower bounds for one group of GPUs of a type; ``dedicated``: whole GPUs tensor-parallel models take."""

    memory: int
    compute: int
    dedicated: int = 0

    @property
    def best(self) -> int:
        return self.dedicated + max(self.memory, self.compute)

    def __add__(self, other: Bound) -> Bound:
        return Bound(self.memory + other.memory, self.compute + other.compute, self.dedicated + other.dedicated)


def lower_bound(items: Sequence[Item], capacity: Capacity, dedicated: int = 0) -> Bound:
    """The memory and compute bounds for packing ``items`` onto GPUs of ``capacity``."""
    if not items:
        return Bound(0, 0, dedicated)
    return Bound(_ceil_div(sum(i.memory for i in items), capacity.memory),
                 _ceil_div(sum(i.share for i in items), capacity.budget), dedicated)


def gap(gpus: int, bound: int) -> tuple[int, float]:
    """(GPUs above the bound, GPUs / bound): 0 and 1.0 mean the plan is provably optimal."""
    return gpus - bound, (gpus / bound if bound else 1.0)
