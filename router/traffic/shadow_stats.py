"""The statistics of a shadow report: pure functions over plain numbers, each with its method stated.

- ``wilson``: the Wilson score interval of a rate (exact-match, agreement, error rates). Unlike the
  normal approximation it stays inside [0, 1] and is honest at 0 or n successes with small n.
- ``ratio_ci``: a paired ratio (shadow / primary) as the geometric mean of the per-pair ratios, with
  a normal interval on the log scale: latencies are skewed and multiplicative, so their logs are
  closer to normal, and the interval of a ratio stays positive and symmetric in "x times slower".
- ``mean_ci``: a mean with its normal (CLT) interval.

Every interval is two-sided at ``z`` (1.96: 95%); fewer than two values give no interval (None).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Z95 = 1.959963984540054


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval of ``successes`` out of ``n``; None when ``n`` is 0."""
    if n <= 0:
        return None
    if not 0 <= successes <= n:
        raise ValueError(f"successes ({successes}) must be between 0 and n ({n})")
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_ci(values: Sequence[float], z: float = Z95) -> tuple[float, tuple[float, float] | None] | None:
    """(mean, its normal interval) of ``values``; None when empty, no interval with one value."""
    n = len(values)
    if n == 0:
        return None
    mean = math.fsum(values) / n
    if n < 2:
        return mean, None
    variance = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    half = z * math.sqrt(variance / n)
    return mean, (mean - half, mean + half)


def ratio_ci(shadow: Sequence[float], primary: Sequence[float],
             z: float = Z95) -> tuple[float, tuple[float, float] | None] | None:
    """The paired ratio shadow/primary: exp(mean(log(s/p))) and exp of its normal interval.

    Pairs where either value is not positive are left out (no first token, a zero-length answer);
    None when no pair is left.
    """
    if len(shadow) != len(primary):
        raise ValueError(f"paired samples differ in length: {len(shadow)} shadow, {len(primary)} primary")
    logs = [math.log(s / p) for s, p in zip(shadow, primary, strict=True) if s > 0 and p > 0]
    summary = mean_ci(logs, z)
    if summary is None:
        return None
    mean, interval = summary
    return math.exp(mean), None if interval is None else (math.exp(interval[0]), math.exp(interval[1]))
