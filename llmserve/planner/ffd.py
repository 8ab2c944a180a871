"""First-fit decreasing: the fast path, always run, and the fallback when the exact solver cannot run.

Sort models by their dominant size (the larger of their memory and compute fractions of a GPU), then put
each on the first GPU it fits on, opening a new GPU when none has room. It takes about a millisecond
for 30 models and is often optimal, not always: ``tests/test_planner.py`` builds a case where it needs a
GPU more than necessary (and the 30-model example is another), which is why the exact solver exists.
"""

from __future__ import annotations

from collections.abc import Sequence

from llmserve.planner.packing import Capacity, Item, dominant_size, feasible


def order(items: Sequence[Item], capacity: Capacity) -> list[int]:
    """Item indices, largest first; ties by memory, then name, so the plan is deterministic."""
    return sorted(range(len(items)),
                  key=lambda i: (-dominant_size(items[i], capacity), -items[i].memory, items[i].name))


def first_fit_decreasing(items: Sequence[Item], capacity: Capacity) -> list[list[int]]:
    """Bins of item indices. Every item must fit alone (cost.demand_for has checked)."""
    bins: list[list[int]] = []
    for i in order(items, capacity):
        for members in bins:
            if feasible([*(items[j] for j in members), items[i]], capacity):
                members.append(i)
                break
        else:
            bins.append([i])
    return bins
