"""What a chaos scenario is: a name, what it does, and a run that reports what every client saw."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loadtest.chaos.tally import Tally


@dataclass(frozen=True)
class Load:
    """The steady load every scenario runs under."""

    users: int = 8
    duration_s: float = 20.0


@dataclass
class Outcome:
    """What a scenario measured: the clients' tally, the fault it injected, and its own checks."""

    tally: Tally
    fault: str
    checks: dict[str, Any] = field(default_factory=dict)  # what recovered, how fast, what was kept
    details: dict[str, Any] = field(default_factory=dict)  # figures for the JSON only (the soak's series)

    def failures(self) -> list[str]:
        """The scenario's goals it missed: anything lost, or a check that came out false."""
        missed = [f"{self.tally.lost} requests lost"] if self.tally.lost else []
        return missed + [name for name, value in self.checks.items() if value is False]


Run = Callable[[Load, Path], Awaitable[Outcome]]


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    run: Run
    real_engine: bool = False  # runs vLLM itself: minutes, not seconds; only when asked for


def report(scenario: Scenario, outcome: Outcome, wall_s: float) -> dict[str, Any]:
    tally = asdict(outcome.tally)
    tally.pop("examples")
    return {"scenario": scenario.name, "summary": scenario.summary, "fault": outcome.fault, **tally,
            "lost_examples": outcome.tally.examples, "checks": outcome.checks,
            "missed": outcome.failures(), "wall_s": round(wall_s, 1), "details": outcome.details}
