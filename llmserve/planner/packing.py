"""The packing problem both solvers see: items with integer memory and compute, GPUs with integer capacity.

Sizes are quantized once, here, and every solver and every check uses the same integers, so the fast path,
the exact solver and the tests cannot disagree about whether a GPU is full because of floating-point
rounding. Quantizing rounds demands up and capacities down, so a plan that fits in integers also fits in
the GiB and shares it was made from.

A GPU holding items ``S`` is feasible when

* the memory of ``S`` is at most the GPU's memory, and
* the compute share of ``S`` is at most the GPU's budget *and* at most every member's own load cap (a model
  with a tight SLA keeps the whole GPU it sits on below the load at which it would miss it; see cost.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

MIB_PER_GIB = 1024
SHARE_UNITS = 10_000  # compute in ten-thousandths of one GPU


def mib_up(gib: float) -> int:
    """GiB to whole MiB, rounded up (a demand). ``round`` first: 0.1 * 1024 is 102.4, not 102.40000000000001."""
    return math.ceil(round(gib * MIB_PER_GIB, 6))


def mib_down(gib: float) -> int:
    """GiB to whole MiB, rounded down (a capacity)."""
    return math.floor(round(gib * MIB_PER_GIB, 6))


def units_up(share: float) -> int:
    return math.ceil(round(share * SHARE_UNITS, 6))


def units_down(share: float) -> int:
    return math.floor(round(share * SHARE_UNITS, 6))


@dataclass(frozen=True)
class Item:
    """One model process as the solvers see it: memory in MiB, compute and load cap in SHARE_UNITS."""

    name: str
    memory: int
    share: int
    cap: int


@dataclass(frozen=True)
class Capacity:
    """One GPU: memory in MiB, compute budget in SHARE_UNITS."""

    memory: int
    budget: int


def feasible(members: Iterable[Item], capacity: Capacity) -> bool:
    """Whether one GPU can hold these items together (the module docstring's two conditions)."""
    members = list(members)
    memory = sum(i.memory for i in members)
    share = sum(i.share for i in members)
    limit = min([capacity.budget, *(i.cap for i in members)])
    return memory <= capacity.memory and share <= limit


def fits_alone(item: Item, capacity: Capacity) -> bool:
    return feasible([item], capacity)


def check(bins: Sequence[Sequence[int]], items: Sequence[Item], capacity: Capacity) -> list[str]:
    """What is wrong with an assignment (bins of item indices): items missing, doubled, or a GPU over
    capacity. Empty when it is a valid plan. The solvers' results go through this before they are used."""
    problems = []
    placed = sorted(i for b in bins for i in b)
    if placed != list(range(len(items))):
        problems.append(f"items placed {placed}, expected each of 0..{len(items) - 1} once")
    for n, members in enumerate(bins):
        if not members:
            problems.append(f"GPU {n} is empty")
        elif not feasible((items[i] for i in members), capacity):
            problems.append(f"GPU {n} over capacity: {[items[i].name for i in members]}")
    return problems


def dominant_size(item: Item, capacity: Capacity) -> float:
    """The item's larger fraction of a GPU, memory or compute: the "size" first-fit decreasing sorts by, as
    usual for packing with two resources (an item that is small in memory but compute-heavy is big)."""
    return max(item.memory / capacity.memory, item.share / capacity.budget)
