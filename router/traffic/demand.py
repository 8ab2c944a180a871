"""What each version is asked for, counted where the router sees it: the autoscaler's demand signal.

Per version: requests in flight by priority class (from admission to the end
of the answer), requests waiting in admission for room, and requests held
because the version has no replica (``cold_start``). Plain integers updated on
the event loop; the autoscaler reads a snapshot once a period.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

VersionKey = tuple[str, str]


@dataclass
class Counts:
    in_flight: dict[str, int] = field(default_factory=lambda: {"critical": 0, "standard": 0, "batch": 0})
    waiting: int = 0  # in admission, for room on a saturated version
    held: int = 0  # for a replica of a version that has none

    @property
    def interactive(self) -> int:
        return self.in_flight["critical"] + self.in_flight["standard"]

    @property
    def batch(self) -> int:
        return self.in_flight["batch"]


class Demand:
    def __init__(self) -> None:
        self._counts: dict[VersionKey, Counts] = {}
        # called when demand arrives for a version with no replica (the autoscaler wakes at once)
        self.on_cold_demand: Callable[[str, str], None] = lambda _model, _version: None

    def of(self, model: str, version: str) -> Counts:
        counts = self._counts.get((model, version))
        if counts is None:
            counts = self._counts[(model, version)] = Counts()
        return counts

    def begin(self, model: str, version: str, priority: str) -> Callable[[], None]:
        """Count one request in flight; returns the call that ends it (idempotent)."""
        counts = self.of(model, version)
        cls = priority if priority in counts.in_flight else "standard"
        counts.in_flight[cls] += 1
        done = False

        def end() -> None:
            nonlocal done
            if not done:
                done = True
                counts.in_flight[cls] -= 1

        return end
