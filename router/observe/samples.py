"""Recent per-version request outcomes, in memory, for canary analysis and the autoscaler.

The router records each finished request's TTFT (streamed requests), time per
output token, latency, priority class and whether it failed; the canary
controller reads the window since a step began, the autoscaler the last
minute's percentiles per class. Bounded per version, so memory stays flat
under any load.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Sample:
    at: float
    ttft_ms: float | None
    failed: bool
    priority: str = "standard"
    tpot_ms: float | None = None  # mean gap between output tokens after the first (streams)
    latency_ms: float | None = None


@dataclass
class Latencies:
    """The successful requests' latencies of a window, one list per measure (ms)."""

    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    requests: int = 0


class SampleWindows:
    def __init__(self, max_per_version: int = 20_000, clock: Callable[[], float] = time.monotonic) -> None:
        self._windows: dict[tuple[str, str], collections.deque[Sample]] = {}
        self._max = max_per_version
        self._clock = clock

    def record(self, model: str, version: str, ttft_ms: float | None, status_code: int, priority: str = "standard",
               tpot_ms: float | None = None, latency_ms: float | None = None) -> None:
        window = self._windows.get((model, version))
        if window is None:
            window = self._windows[(model, version)] = collections.deque(maxlen=self._max)
        window.append(Sample(self._clock(), ttft_ms, status_code >= 500, priority, tpot_ms, latency_ms))

    def latencies(self, model: str, version: str, start: float, classes: Collection[str]) -> Latencies:
        """The latencies of the requests of ``classes`` that succeeded at or after ``start``."""
        found = Latencies()
        for sample in reversed(self._windows.get((model, version), ())):
            if sample.at < start:
                break
            if sample.failed or sample.priority not in classes:
                continue
            found.requests += 1
            if sample.ttft_ms is not None:
                found.ttft.append(sample.ttft_ms)
            if sample.tpot_ms is not None:
                found.tpot.append(sample.tpot_ms)
            if sample.latency_ms is not None:
                found.total.append(sample.latency_ms)
        return found

    def since(self, model: str, version: str, start: float) -> tuple[list[float], int, int]:
        """(TTFTs in ms, failed requests, all requests) recorded at or after ``start``."""
        ttfts: list[float] = []
        failed = total = 0
        for sample in reversed(self._windows.get((model, version), ())):
            if sample.at < start:
                break
            total += 1
            if sample.failed:
                failed += 1
            elif sample.ttft_ms is not None:
                ttfts.append(sample.ttft_ms)
        return ttfts, failed, total

    def now(self) -> float:
        return self._clock()
