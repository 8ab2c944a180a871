"""How many lines of a batch run at once: additive increase, multiplicative decrease (AIMD), as TCP
shares a link.

The batch band takes only spare capacity: admission sheds it first when a version saturates, and a
refusal carries a Retry-After. So the window grows by about one line per window of successes (each
success adds ``1 / window``) up to ``max_window``; a refusal halves it (never below one) and pauses
every launch until its Retry-After has passed (``min_pause_s`` without one). Refusals that arrive
during a pause do not halve it again: lines in flight when the version saturated are refused together,
and that is one congestion signal, not many. Pure: the caller passes the time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class AIMD:
    max_window: int
    min_pause_s: float = 0.5
    window: float = 1.0
    paused_until: float = 0.0

    def room(self, now: float, in_flight: int) -> int:
        """Lines that may start now, with ``in_flight`` already running."""
        if now < self.paused_until:
            return 0
        return max(0, math.floor(self.window) - in_flight)

    def pause_left(self, now: float) -> float:
        return max(0.0, self.paused_until - now)

    def succeeded(self) -> None:
        self.window = min(float(self.max_window), self.window + 1.0 / self.window)

    def refused(self, now: float, retry_after_s: float | None) -> None:
        if now >= self.paused_until:
            self.window = max(1.0, self.window / 2)
        wait = retry_after_s if retry_after_s is not None and retry_after_s > 0 else self.min_pause_s
        self.paused_until = max(self.paused_until, now + wait)
