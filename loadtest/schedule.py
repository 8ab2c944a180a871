"""When each request is meant to be sent: arrival processes and load shapes.

An open-loop run is a list of intended send times fixed before the run
starts (seeded, so reproducible). The runner sends each request at its
intended time whether or not earlier ones have answered, and latency is
reported from the intended time as well as from the actual send, so a slow
server cannot hide its queueing by slowing the generator down (coordinated
omission).

Shapes give the rate over time; arrivals turn a rate into gaps:
- ``poisson``: exponential gaps (burstiness 1);
- ``gamma``: gamma gaps with shape = burstiness (< 1 burstier, > 1 smoother);
- ``constant``: evenly spaced.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    """Offered rate (requests/s) as a function of seconds since the start."""

    kind: str  # constant | ramp | spike
    rate: float
    end_rate: float | None = None  # ramp: the rate at the end
    spike_factor: float = 1.0
    spike_start_s: float = 0.0
    spike_duration_s: float = 0.0

    def rate_at(self, t: float, duration_s: float) -> float:
        if self.kind == "ramp" and self.end_rate is not None and duration_s > 0:
            return self.rate + (self.end_rate - self.rate) * min(1.0, t / duration_s)
        if self.kind == "spike" and self.spike_start_s <= t < self.spike_start_s + self.spike_duration_s:
            return self.rate * self.spike_factor
        return self.rate


def _gap_sampler(arrival: str, burstiness: float, rng: random.Random) -> Callable[[float], float]:
    if arrival == "poisson":
        return lambda rate: rng.expovariate(rate)
    if arrival == "gamma":
        # mean 1/rate whatever the shape: scale = 1 / (rate * shape)
        return lambda rate: rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
    if arrival == "constant":
        return lambda rate: 1.0 / rate
    raise ValueError(f"unknown arrival process {arrival!r}; expected poisson, gamma or constant")


def intended_send_times(
    shape: Shape, duration_s: float, arrival: str = "poisson", burstiness: float = 1.0,
    max_requests: int | None = None, seed: int = 0,
) -> list[float]:
    """Seconds from the start at which each request is meant to go out, within ``duration_s``."""
    if shape.rate <= 0 or (shape.end_rate is not None and shape.end_rate <= 0):
        raise ValueError("rates must be positive")
    if burstiness <= 0:
        raise ValueError("burstiness must be positive")
    rng = random.Random(seed)
    gap = _gap_sampler(arrival, burstiness, rng)
    times: list[float] = []
    t = 0.0
    while max_requests is None or len(times) < max_requests:
        t += gap(shape.rate_at(t, duration_s))
        if t >= duration_s:
            break
        times.append(t)
    return times
