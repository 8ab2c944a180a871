"""Canary analysis on seeded synthetic TTFT samples: detection, false rollbacks, errors."""

from __future__ import annotations

import math
import random

import pytest

from router.control.canary_analysis import CanaryPolicy, Decision, analyze, mann_whitney_greater

POLICY = CanaryPolicy(min_samples=30, max_samples=3000)
SEEDS = range(20)


def ttft(rng: random.Random, mean_ms: float, cv: float = 0.3) -> float:
    sigma2 = math.log(1 + cv * cv)
    return rng.lognormvariate(math.log(mean_ms) - sigma2 / 2, math.sqrt(sigma2))


def rollout(seed: int, slowdown: float, canary_error_rate: float = 0.0, batch: int = 10
            ) -> tuple[Decision, int, int]:
    """A canary rollout through the policy's steps as traffic arrives in proportion to the split.

    Returns the outcome, the canary requests it took, and the step (percent) where it ended.
    Latency windows start afresh at each step; errors count over the whole rollout.
    """
    rng = random.Random(seed)
    canary_requests = canary_errors = stable_requests = 0
    for step in POLICY.steps[:-1]:
        stable: list[float] = []
        canary: list[float] = []
        while True:
            canary_batch = max(1, round(batch * step / (100 - step)))
            stable += [ttft(rng, 100) for _ in range(batch)]
            stable_requests += batch
            for _ in range(canary_batch):
                canary_requests += 1
                if rng.random() < canary_error_rate:
                    canary_errors += 1
                else:
                    canary.append(ttft(rng, 100 * slowdown))
            evidence = analyze(stable, canary, 0, canary_errors, POLICY, stable_requests, canary_requests)
            if evidence.decision is Decision.ROLLBACK:
                return Decision.ROLLBACK, canary_requests, step
            if evidence.decision is Decision.PROMOTE:
                break
    return Decision.PROMOTE, canary_requests, 100


def test_mann_whitney_matches_known_direction() -> None:
    assert mann_whitney_greater([5, 6, 7, 8, 9] * 6, [1, 2, 3, 4, 5] * 6) < 0.001
    assert mann_whitney_greater([1, 2, 3, 4, 5] * 6, [5, 6, 7, 8, 9] * 6) > 0.999
    assert 0.3 < mann_whitney_greater([1, 2, 3] * 10, [1, 2, 3] * 10) < 0.7


def test_a_20_percent_slower_canary_is_rolled_back_at_the_first_step() -> None:
    outcomes = [rollout(seed, 1.2) for seed in SEEDS]
    assert all(decision is Decision.ROLLBACK and step == 5 for decision, _, step in outcomes), outcomes
    assert max(n for _, n, _ in outcomes) <= 1000  # canary requests to detection, across 20 seeds


def test_a_canary_like_stable_is_always_promoted() -> None:
    outcomes = [rollout(seed, 1.0) for seed in SEEDS]
    assert all(decision is Decision.PROMOTE for decision, _, _ in outcomes), outcomes


def test_a_canary_with_5_percent_errors_is_rolled_back() -> None:
    outcomes = [rollout(seed, 1.0, canary_error_rate=0.05) for seed in SEEDS]
    assert all(decision is Decision.ROLLBACK for decision, _, _ in outcomes), outcomes


def test_evidence_is_complete_and_holds_without_samples() -> None:
    evidence = analyze([100.0] * 10, [100.0] * 10, 0, 0, POLICY)
    assert evidence.decision is Decision.HOLD and "samples" in evidence.reason
    data = evidence.to_dict()
    assert data["decision"] == "hold" and data["threshold"] == pytest.approx(0.05)
    assert {"p_slower", "p_within", "stable_ttft_p99_ms", "canary_ttft_p50_ms", "p_errors"} <= set(data)


def test_an_undecided_step_rolls_back_after_max_step_s() -> None:
    policy = CanaryPolicy(bake_s=1, max_step_s=60)
    assert analyze([], [], 0, 0, policy, step_elapsed_s=59).decision is Decision.HOLD
    starved = analyze([100.0] * 80, [100.0] * 3, 0, 0, policy, step_elapsed_s=60)
    assert starved.decision is Decision.ROLLBACK
    assert "undecided after 60 s" in starved.reason and "3 canary samples" in starved.reason
    # Evidence that decides still decides, however long the step took.
    rng = random.Random(3)
    stable = [rng.gauss(100, 10) for _ in range(200)]
    same = [rng.gauss(100, 10) for _ in range(200)]
    assert analyze(stable, same, 0, 0, policy, step_elapsed_s=600).decision is Decision.PROMOTE


@pytest.mark.parametrize("kwargs", [{"steps": (50, 25, 100)}, {"steps": (5, 50)}, {"min_samples": 5},
                                    {"confidence": 1.0}, {"bake_s": 60, "max_step_s": 30}])
def test_bad_policies_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        CanaryPolicy(**kwargs)
