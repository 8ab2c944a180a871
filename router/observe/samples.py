"""Recent per-version request outcomes, in memory, for canary analysis.

The router records each finished request's TTFT (streamed requests) and
whether it failed; the canary controller reads the window since a step began.
Bounded per version, so memory stays flat under any load.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Sample:
    at: float
    ttft_ms: float | None
    failed: bool


class SampleWindows:
    def __init__(self, max_per_version: int = 20_000, clock: Callable[[], float] = time.monotonic) -> None:
        self._windows: dict[tuple[str, str], collections.deque[Sample]] = {}
        self._max = max_per_version
        self._clock = clock

    def record(self, model: str, version: str, ttft_ms: float | None, status_code: int) -> None:
        window = self._windows.get((model, version))
        if window is None:
            window = self._windows[(model, version)] = collections.deque(maxlen=self._max)
        window.append(Sample(self._clock(), ttft_ms, status_code >= 500))

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
