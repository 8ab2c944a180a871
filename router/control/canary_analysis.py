"""Canary analysis: is the new version slower (or failing more) than stable?

Comparing two noisy p99s with a fixed threshold either flaps or misses
regressions, so the decision is a pair of one-sided Mann-Whitney U tests on
the TTFT samples of the same window, against stable scaled by the tolerance
(``s' = s * (1 + tolerance)``):

- ROLLBACK when the canary is significantly *slower* than ``s'``
  (p < 1 - confidence): a regression beyond the tolerance;
- PROMOTE when it is significantly *faster* than ``s'`` (evidence that it is
  within the tolerance) and its error rate is no higher than stable's plus
  ``error_margin``;
- HOLD otherwise, until ``max_samples`` or ``max_step_s``, when an undecided
  step rolls back (a canary must earn its traffic; one that gets too little
  traffic to decide would otherwise hold its share forever).

Errors: a one-sided two-proportion z-test; a canary whose error rate is
significantly higher than stable's by more than ``error_margin`` rolls back
whatever its latency. The U statistic uses the normal approximation with
tie correction, fine from the ``min_samples`` (>= 20) the policy requires.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from llmserve.stats import percentile


class Decision(str, enum.Enum):
    PROMOTE = "promote"
    HOLD = "hold"
    ROLLBACK = "rollback"


@dataclass(frozen=True)
class CanaryPolicy:
    steps: tuple[int, ...] = (5, 25, 50, 100)
    bake_s: float = 60.0
    min_samples: int = 50
    max_samples: int = 2000
    max_step_s: float = 1800.0
    ttft_tolerance: float = 0.10
    confidence: float = 0.95
    error_margin: float = 0.01

    def __post_init__(self) -> None:
        if not self.steps or list(self.steps) != sorted(self.steps) or self.steps[-1] != 100 or self.steps[0] <= 0:
            raise ValueError("steps must rise from above 0 to 100, e.g. 5,25,50,100")
        if self.min_samples < 20 or self.max_samples < self.min_samples:
            raise ValueError("min_samples must be at least 20 and at most max_samples")
        if self.max_step_s < self.bake_s:
            raise ValueError("max_step_s must be at least bake_s")
        if not 0.5 < self.confidence < 1:
            raise ValueError("confidence must be between 0.5 and 1")


@dataclass(frozen=True)
class Evidence:
    decision: Decision
    reason: str
    stable_samples: int
    canary_samples: int
    stable_ttft_p50_ms: float
    canary_ttft_p50_ms: float
    stable_ttft_p99_ms: float
    canary_ttft_p99_ms: float
    ttft_p50_ratio: float
    p_slower: float  # P-value of "canary slower than stable * (1 + tolerance)"
    p_within: float  # P-value of "canary faster than stable * (1 + tolerance)"
    stable_error_rate: float
    canary_error_rate: float
    p_errors: float
    threshold: float  # 1 - confidence

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["decision"] = self.decision.value
        return data


def _normal_sf(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2))


def mann_whitney_greater(x: Sequence[float], y: Sequence[float]) -> float:
    """One-sided p-value that x is stochastically greater than y (normal approximation, tie-corrected)."""
    n1, n2 = len(x), len(y)
    if n1 == 0 or n2 == 0:
        return 1.0
    pooled = sorted([(v, 0) for v in x] + [(v, 1) for v in y])
    ranks = [0.0] * len(pooled)
    tie_term = 0.0
    i = 0
    while i < len(pooled):
        j = i
        while j + 1 < len(pooled) and pooled[j + 1][0] == pooled[i][0]:
            j += 1
        rank = (i + j) / 2 + 1
        for k in range(i, j + 1):
            ranks[k] = rank
        size = j - i + 1
        tie_term += size**3 - size
        i = j + 1
    rank_sum_x = sum(r for r, (_, group) in zip(ranks, pooled, strict=True) if group == 0)
    u = rank_sum_x - n1 * (n1 + 1) / 2
    n = n1 + n2
    variance = n1 * n2 / 12 * ((n + 1) - tie_term / (n * (n - 1)))
    if variance <= 0:
        return 1.0
    z = (u - n1 * n2 / 2 - 0.5) / math.sqrt(variance)  # continuity correction
    return _normal_sf(z)


def errors_higher(stable_errors: int, stable_n: int, canary_errors: int, canary_n: int, margin: float) -> float:
    """One-sided p-value that the canary's error rate exceeds stable's by more than ``margin``."""
    if stable_n == 0 or canary_n == 0:
        return 1.0
    p1, p2 = canary_errors / canary_n, stable_errors / stable_n
    pooled = (stable_errors + canary_errors) / (stable_n + canary_n)
    se = math.sqrt(max(pooled * (1 - pooled), 1e-9) * (1 / canary_n + 1 / stable_n))
    return _normal_sf((p1 - p2 - margin) / se)


def analyze(
    stable_ttft_ms: Sequence[float],
    canary_ttft_ms: Sequence[float],
    stable_errors: int,
    canary_errors: int,
    policy: CanaryPolicy,
    stable_requests: int | None = None,
    canary_requests: int | None = None,
    step_elapsed_s: float = 0.0,
) -> Evidence:
    """Decide promote / hold / rollback for one step.

    Latency comes from this step's window; errors may be counted over the
    whole rollout (pass the request totals they come from), so a canary
    that fails now and then cannot slip through one step at a time.
    ``step_elapsed_s``: how long this step has run, against ``max_step_s``.
    """
    alpha = 1 - policy.confidence
    ns, nc = len(stable_ttft_ms), len(canary_ttft_ms)
    stable_total = stable_requests if stable_requests is not None else ns + stable_errors
    canary_total = canary_requests if canary_requests is not None else nc + canary_errors
    p_errors = errors_higher(stable_errors, stable_total, canary_errors, canary_total, policy.error_margin)
    scaled = [v * (1 + policy.ttft_tolerance) for v in stable_ttft_ms]
    p_slower = mann_whitney_greater(canary_ttft_ms, scaled)
    p_within = mann_whitney_greater(scaled, canary_ttft_ms)
    s50, c50 = percentile(stable_ttft_ms, 50), percentile(canary_ttft_ms, 50)

    enough = min(ns, nc) >= policy.min_samples
    if min(stable_total, canary_total) >= policy.min_samples and p_errors < alpha:
        decision, reason = Decision.ROLLBACK, "canary error rate significantly higher than stable's"
    elif enough and p_slower < alpha:
        decision, reason = Decision.ROLLBACK, (
            f"canary TTFT slower than stable by more than {policy.ttft_tolerance:.0%} "
            f"with {policy.confidence:.0%} confidence")
    elif (enough and p_within < alpha
          and canary_errors / canary_total <= stable_errors / stable_total + policy.error_margin):
        decision, reason = Decision.PROMOTE, f"canary TTFT within {policy.ttft_tolerance:.0%} of stable"
    elif min(ns, nc) >= policy.max_samples:
        decision, reason = Decision.ROLLBACK, f"undecided after {policy.max_samples} samples"
    elif step_elapsed_s >= policy.max_step_s:
        decision, reason = Decision.ROLLBACK, (
            f"undecided after {policy.max_step_s:g} s at this step ({ns} stable and {nc} canary samples; "
            f"{policy.min_samples} a side are needed): send the canary more traffic or raise max_step_s")
    elif not enough:
        decision, reason = Decision.HOLD, f"waiting for {policy.min_samples} samples on each side"
    else:
        decision, reason = Decision.HOLD, "not yet significant either way"
    return Evidence(
        decision=decision, reason=reason, stable_samples=ns, canary_samples=nc,
        stable_ttft_p50_ms=s50, canary_ttft_p50_ms=c50,
        stable_ttft_p99_ms=percentile(stable_ttft_ms, 99), canary_ttft_p99_ms=percentile(canary_ttft_ms, 99),
        ttft_p50_ratio=(c50 / s50) if ns and nc and s50 else float("nan"),
        p_slower=p_slower, p_within=p_within,
        stable_error_rate=stable_errors / stable_total if stable_total else 0.0,
        canary_error_rate=canary_errors / canary_total if canary_total else 0.0,
        p_errors=p_errors, threshold=alpha,
    )
