"""The autoscaling benchmark's load: a day-shaped trace, compressed in time, and the compression itself.

The trace (rates are multiples of ``base_rate``; ``steady`` phases are where the
"one change of direction per 10 minutes" goal is judged):

=========  ==========================  ======  ========================================
phase      rate                        steady  why
=========  ==========================  ======  ========================================
night      1x                          yes     the low phase: fits on one replica
morning    linear ramp 1x -> 6x        no      the ramp the autoscaler must follow
day        6x                          yes     the plateau: needs about the maximum
evening    linear ramp 6x -> 1x        no      the load goes, the replicas should too
late       1x                          yes     low again, long enough to scale down
spike      3x, at once                 no      a sudden burst on a scaled-down version
after      1x                          yes     back to low: scale back down
=========  ==========================  ======  ========================================

Arrivals are a non-homogeneous Poisson process at the trace's rate, drawn by
thinning (exact for the ramps, unlike stepping ``expovariate`` by the rate at
the last arrival), seeded: every run of one invocation gets the same send times.

Time is compressed by one factor (``Compression.factor``) for everything the
autoscaler reacts to: the policy's delays (the design's table: up after 2 min
hot, down after 10 min cold, to zero after 5 min idle, 1 min cooldown), the
engine's start time (90 s, a small model on a GPU) and the "10 minutes of steady
load" of the goal. The trace itself is compressed far more (a day into minutes):
its ramps arrive ten times faster, relative to those delays, than a real day's,
which is harder on the autoscaler, not easier.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

# What the compression divides: seconds in the real world (the policy's design defaults, a model's start)
REAL_UP_DELAY_S = 120.0
REAL_DOWN_DELAY_S = 600.0
REAL_IDLE_DELAY_S = 300.0
REAL_COOLDOWN_S = 60.0
REAL_ENGINE_START_S = 90.0
REAL_STEADY_WINDOW_S = 600.0  # the goal: at most one change of direction per 10 minutes of steady load


@dataclass(frozen=True)
class Phase:
    name: str
    duration_s: float
    start_factor: float  # the rate at the phase's start, in multiples of the base rate
    end_factor: float  # at its end (a ramp); equal to start_factor for a flat phase
    steady: bool


@dataclass(frozen=True)
class Trace:
    phases: tuple[Phase, ...]
    base_rate: float  # requests/s at 1x

    @property
    def duration_s(self) -> float:
        return sum(p.duration_s for p in self.phases)

    def spans(self) -> list[tuple[Phase, float, float]]:
        """Each phase with its start and end, seconds from the trace's start."""
        out, start = [], 0.0
        for phase in self.phases:
            out.append((phase, start, start + phase.duration_s))
            start += phase.duration_s
        return out

    def factor_at(self, t: float) -> float:
        for phase, start, end in self.spans():
            if start <= t < end:
                share = (t - start) / phase.duration_s if phase.duration_s else 0.0
                return phase.start_factor + (phase.end_factor - phase.start_factor) * share
        return self.phases[-1].end_factor

    def rate_at(self, t: float) -> float:
        return self.base_rate * self.factor_at(t)

    def phase_at(self, t: float) -> str:
        for phase, start, end in self.spans():
            if start <= t < end:
                return phase.name
        return self.phases[-1].name

    def arrivals(self, seed: int) -> list[float]:
        """Seconds from the start of each request: Poisson at ``rate_at``, by thinning a faster stream."""
        rng = random.Random(seed)
        peak = self.base_rate * max(max(p.start_factor, p.end_factor) for p in self.phases)
        times: list[float] = []
        t = 0.0
        while True:
            t += rng.expovariate(peak)
            if t >= self.duration_s:
                return times
            if rng.random() * peak < self.rate_at(t):
                times.append(t)

    def expected_requests(self) -> float:
        return sum(p.duration_s * self.base_rate * (p.start_factor + p.end_factor) / 2 for p in self.phases)

    def to_dict(self) -> dict[str, Any]:
        return {"base_rate_per_s": self.base_rate, "duration_s": self.duration_s,
                "phases": [{"name": p.name, "start_s": round(s, 3), "end_s": round(e, 3),
                            "rate_per_s": [round(self.base_rate * p.start_factor, 3),
                                           round(self.base_rate * p.end_factor, 3)], "steady": p.steady}
                           for p, s, e in self.spans()]}


def day_trace(base_rate: float, durations: dict[str, float], peak: float = 6.0, spike: float = 3.0) -> Trace:
    """The day's shape with these phase lengths (seconds): night, morning, day, evening, late, spike, after."""
    shape = (("night", 1.0, 1.0, True), ("morning", 1.0, peak, False), ("day", peak, peak, True),
             ("evening", peak, 1.0, False), ("late", 1.0, 1.0, True), ("spike", spike, spike, False),
             ("after", 1.0, 1.0, True))
    return Trace(tuple(Phase(name, durations[name], a, b, steady) for name, a, b, steady in shape), base_rate)


# The full run: 5.5 minutes a run. The quick one (CI): 20 s a run, at a faster compression so the
# autoscaler still has time to act inside it.
FULL_DURATIONS = {"night": 80.0, "morning": 50.0, "day": 70.0, "evening": 40.0, "late": 40.0, "spike": 15.0,
                  "after": 35.0}
QUICK_DURATIONS = {"night": 2.0, "morning": 4.0, "day": 5.0, "evening": 2.0, "late": 2.0, "spike": 2.0,
                   "after": 3.0}


@dataclass(frozen=True)
class Compression:
    """Real-world durations divided by ``factor``: the policy's delays, the engine's start, the goal's window."""

    factor: float

    def scaled(self, real_s: float) -> float:
        return real_s / self.factor

    @property
    def engine_start_s(self) -> float:
        return self.scaled(REAL_ENGINE_START_S)

    @property
    def steady_window_s(self) -> float:
        return self.scaled(REAL_STEADY_WINDOW_S)

    def policy(self, min_replicas: int, max_replicas: int, target_in_flight: float, max_queue: int
               ) -> dict[str, Any]:
        """The autoscaling policy sent with the deploy: the design's delays, compressed."""
        return {"min_replicas": min_replicas, "max_replicas": max_replicas,
                "target_in_flight_per_replica": target_in_flight, "max_queue": max_queue,
                "up_delay_s": self.scaled(REAL_UP_DELAY_S), "down_delay_s": self.scaled(REAL_DOWN_DELAY_S),
                "idle_delay_s": self.scaled(REAL_IDLE_DELAY_S), "cooldown_s": self.scaled(REAL_COOLDOWN_S)}

    def allowed_changes(self, steady_s: float) -> float:
        """Changes of direction the goal allows in ``steady_s`` seconds of steady load (one per window)."""
        return steady_s / self.steady_window_s
