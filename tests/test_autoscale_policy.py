"""The autoscaling policy as a pure function: each rule of the design's table, each safeguard, the anchors' flaps.

Time is a number passed in; nothing sleeps.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from router.control.autoscale.checks import check_policy
from router.control.autoscale.policy import (
    AutoscalingPolicy,
    Memory,
    Mode,
    PolicyError,
    Signals,
    Slo,
    desired_replicas,
    within_budget,
)
from router.control.leases import RETIRE
from router.errors import InvalidRequest
from router.store import DeploymentRecord, DeploymentStatus

POLICY = AutoscalingPolicy(min_replicas=1, max_replicas=8, target_in_flight_per_replica=4, max_queue=50,
                           up_delay_s=120, down_delay_s=600, idle_delay_s=300, cooldown_s=60)


def run(signals: Signals, current: int, policy: AutoscalingPolicy, times: list[float],
        memory: Memory | None = None) -> tuple[list[int], Memory]:
    """The desired count at each time, the load unchanged and every change applied at once."""
    counts = []
    for now in times:
        decision = desired_replicas(signals_for(signals, current), current, policy, now, memory)
        memory, current = decision.memory, decision.desired
        counts.append(current)
    assert memory is not None
    return counts, memory


def signals_for(signals: Signals, current: int) -> Signals:
    return Signals(**{**signals.__dict__, "ready": current})


def test_utilisation_over_80_percent_for_two_minutes_scales_up_not_before() -> None:
    hot = Signals(ready=2, in_flight=4, utilisation=0.9)
    first = desired_replicas(hot, 2, POLICY, 0.0)
    assert first.desired == 2 and first.memory.hot_since == 0.0
    at_119 = desired_replicas(hot, 2, POLICY, 119.0, first.memory)
    assert at_119.desired == 2
    at_120 = desired_replicas(hot, 2, POLICY, 120.0, at_119.memory)
    assert (at_120.desired, at_120.rule) == (3, "utilisation")


def test_a_short_dip_keeps_the_hot_window_and_a_long_one_restarts_it() -> None:
    hot, calm = Signals(ready=2, in_flight=4, utilisation=0.9), Signals(ready=2, in_flight=4, utilisation=0.5)
    memory = desired_replicas(hot, 2, POLICY, 0.0).memory
    dip = desired_replicas(calm, 2, POLICY, 20.0, memory).memory  # 20 s calm: under a quarter of 120 s
    assert dip.hot_since == 0.0
    assert desired_replicas(hot, 2, POLICY, 120.0, desired_replicas(hot, 2, POLICY, 25.0, dip).memory).desired == 3
    memory = desired_replicas(calm, 2, POLICY, 60.0, memory).memory  # 60 s calm: the wait starts again
    assert memory.hot_since is None
    assert desired_replicas(hot, 2, POLICY, 150.0, memory).desired == 2  # hot again since 150 only
    assert desired_replicas(hot, 2, POLICY, 270.0, desired_replicas(hot, 2, POLICY, 150.0, memory).memory).desired == 3


def test_queue_over_max_scales_up_at_once_by_at_most_double() -> None:
    queued = Signals(ready=2, in_flight=8, queued=40, engine_waiting=20)
    decision = desired_replicas(queued, 2, POLICY, 0.0)
    assert decision.rule == "panic"
    assert decision.desired == 4  # demand wants 17, the step is at most a doubling


def test_batch_traffic_alone_never_scales_up() -> None:
    batch_only = Signals(ready=1, in_flight=0, batch_in_flight=40, engine_waiting=80, utilisation=1.0)
    counts, _ = run(batch_only, 1, POLICY, [0, 100, 200, 300, 400])
    assert counts == [1, 1, 1, 1, 1]
    # half of the work interactive: half of the engines' 80 waiting counts, under max_queue (no panic), and
    # the interactive demand (20 in flight, 40 waiting) still asks for more replicas after up_delay_s
    mixed = Signals(ready=1, in_flight=20, batch_in_flight=20, engine_waiting=80, utilisation=1.0)
    counts, _ = run(mixed, 1, POLICY, [0, 120])
    assert counts == [1, 2]


def test_latency_over_the_slo_scales_up_and_needs_samples() -> None:
    slow = Signals(ready=2, in_flight=2, ttft_p99_ms=900, samples=100)
    counts, _ = run(slow, 2, POLICY, [0, 120])
    assert counts == [2, 3]
    few = Signals(ready=2, in_flight=2, ttft_p99_ms=900, samples=5)
    counts, _ = run(few, 2, POLICY, [0, 120, 240])
    assert counts == [2, 2, 2]


def test_itl_and_whole_request_slos_count_too() -> None:
    policy = AutoscalingPolicy(max_replicas=8, slo=Slo(ttft_ms=None, itl_ms=50, p99_ms=None), up_delay_s=0)
    assert desired_replicas(Signals(ready=1, itl_p99_ms=80, samples=50), 1, policy, 0.0).rule == "latency"
    policy = AutoscalingPolicy(max_replicas=8, slo=Slo(ttft_ms=None, p99_ms=40), up_delay_s=0)
    assert desired_replicas(Signals(ready=1, latency_p99_ms=60, samples=50), 1, policy, 0.0).rule == "latency"


def test_scale_down_only_after_ten_cold_minutes_then_one_a_cooldown() -> None:
    cold = Signals(ready=4, in_flight=1, utilisation=0.1)
    counts, _ = run(cold, 4, POLICY, [0, 300, 599, 600, 630, 659, 660, 700, 720, 800])
    # cold since 0: 4 -> 3 at 600; the load is still cold, so one more each cooldown (60 s): 660, 720
    assert counts == [4, 4, 4, 3, 3, 3, 2, 2, 1, 1]


def test_a_load_that_warms_up_after_a_step_down_restarts_the_window() -> None:
    cold, warm = Signals(ready=3, in_flight=1, utilisation=0.1), Signals(ready=2, in_flight=1, utilisation=0.5)
    step = desired_replicas(cold, 3, POLICY, 600.0, Memory(cold_since=0.0))
    assert step.desired == 2
    warmer = desired_replicas(warm, 2, POLICY, 700.0, step.memory)  # 50% busy on two: not cold any more
    assert warmer.desired == 2 and warmer.memory.cold_since is None
    assert desired_replicas(cold, 2, POLICY, 760.0, warmer.memory).desired == 2  # a new ten minutes from here


def test_scale_down_is_refused_when_the_load_would_not_fit_on_n_minus_1() -> None:
    """Dynamo's 2 <-> 1 flap: 6 in flight on 2 replicas at target 4 is cold by utilisation but would be 6 on 1."""
    signals = Signals(ready=2, in_flight=6, utilisation=0.25)
    counts, memory = run(signals, 2, POLICY, [0, 600, 1200, 1800])
    assert counts == [2, 2, 2, 2]
    decision = desired_replicas(signals, 2, POLICY, 2400, memory)
    assert "would not fit" in decision.reason


def test_no_action_while_a_replica_starts_or_drains() -> None:
    hot = Signals(ready=1, starting=1, in_flight=40, queued=100)
    decision = desired_replicas(hot, 2, POLICY, 0.0)
    assert (decision.desired, decision.rule) == (2, "pending")
    draining = Signals(ready=3, draining=1, in_flight=0)
    assert desired_replicas(draining, 3, POLICY, 10_000.0, Memory(cold_since=0.0)).rule == "pending"


def test_bounds_apply_at_once() -> None:
    assert desired_replicas(Signals(ready=1), 1, AutoscalingPolicy(min_replicas=3, max_replicas=5), 0).desired == 3
    assert desired_replicas(Signals(ready=6), 6, AutoscalingPolicy(max_replicas=4), 0).desired == 4


def test_scale_to_zero_after_idle_and_back_with_held_requests() -> None:
    policy = AutoscalingPolicy(min_replicas=0, max_replicas=4, idle_delay_s=300, cooldown_s=0)
    idle = Signals(ready=1)
    counts, memory = run(idle, 1, policy, [0, 299, 300])
    assert counts == [1, 1, 0]
    held = Signals(ready=0, held=30)
    decision = desired_replicas(held, 0, policy, 301, memory)
    # one replica, not ceil(30 / 8) = 4: held requests inflate concurrency (Knative's lesson)
    assert (decision.desired, decision.rule) == (1, "cold_start")
    assert desired_replicas(Signals(ready=0), 0, policy, 400).desired == 0


def test_a_trickle_keeps_a_version_from_scaling_to_zero() -> None:
    policy = AutoscalingPolicy(min_replicas=0, idle_delay_s=300, cooldown_s=0)
    memory = None
    for now in range(0, 1000, 50):
        load = Signals(ready=1, in_flight=1 if now % 200 == 0 else 0)
        decision = desired_replicas(load, 1, policy, float(now), memory)
        memory = decision.memory
        assert decision.desired == 1


def test_cooldown_after_a_change() -> None:
    policy = AutoscalingPolicy(max_replicas=8, down_delay_s=0, cooldown_s=60)
    after_up = Memory(last_change_at=100.0, last_direction="up")
    cold = Signals(ready=3, in_flight=0, utilisation=0.05)
    assert desired_replicas(cold, 3, policy, 130.0, after_up).desired == 3
    assert desired_replicas(cold, 3, policy, 161.0, desired_replicas(cold, 3, policy, 130.0, after_up).memory
                            ).desired == 2


def test_an_oscillating_load_changes_direction_at_most_once_per_ten_minutes() -> None:
    """A load that swings every 90 s between 2x and 0.5x of one replica's target: the up and down windows
    never both complete inside one swing, so the count does not chase it."""
    memory: Memory | None = None
    current = 2
    for now in range(0, 3600, 5):
        high = (now // 90) % 2 == 0
        load = Signals(ready=current, in_flight=12 if high else 2, utilisation=0.9 if high else 0.2)
        decision = desired_replicas(load, current, POLICY, float(now), memory)
        memory, current = decision.memory, decision.desired
    assert memory is not None
    assert memory.direction_changes <= 3600 / 600


def test_direction_changes_are_counted() -> None:
    policy = AutoscalingPolicy(max_replicas=8, up_delay_s=0, down_delay_s=0, cooldown_s=0)
    up = desired_replicas(Signals(ready=1, in_flight=20), 1, policy, 0.0)
    down = desired_replicas(Signals(ready=2, in_flight=0), 2, policy, 1.0, up.memory)
    assert (up.direction, down.direction, down.memory.direction_changes) == ("up", "down", 1)


@pytest.mark.parametrize(("values", "field"), [
    ({"min_replicas": 5, "max_replicas": 2}, "autoscaling.min_replicas"),
    ({"max_replicas": 0}, "autoscaling.max_replicas"),
    ({"max_replicas": 10_000}, "autoscaling.max_replicas"),
    ({"min_replicas": -1}, "autoscaling.min_replicas"),
    ({"target_in_flight_per_replica": 0}, "autoscaling.target_in_flight_per_replica"),
    ({"slo": {"ttft_ms": 0}}, "autoscaling.slo.ttft_ms"),
    ({"slo": {"latency": 3}}, "autoscaling.slo.latency"),
    ({"up_delay_s": -5}, "autoscaling.up_delay_s"),
    ({"mode": "sometimes"}, "autoscaling.mode"),
    ({"replicas": 3}, "autoscaling.replicas"),
    ({"utilisation_low": 0.9}, "autoscaling.utilisation_low"),
    ({"min_samples": 0}, "autoscaling.min_samples"),
])
def test_bad_policies_name_their_field(values: dict[str, object], field: str) -> None:
    with pytest.raises(PolicyError) as caught:
        AutoscalingPolicy.from_dict(values)
    assert caught.value.field == field


def test_the_policy_round_trips_through_its_stored_form() -> None:
    policy = AutoscalingPolicy(mode=Mode.ADVISORY, min_replicas=0, max_replicas=3, slo=Slo(ttft_ms=300, itl_ms=40))
    assert AutoscalingPolicy.from_dict(policy.to_dict()) == policy


@pytest.mark.parametrize(("status", "operation"), [(DeploymentStatus.DRAINING, ""),
                                                   (DeploymentStatus.ACTIVE, RETIRE)])
def test_a_version_being_rolled_back_is_not_given_a_policy(status: DeploymentStatus, operation: str) -> None:
    record = DeploymentRecord(id="d1", model_name="chat", version="v2", status=status, model_dir="/m",
                              operation=operation)
    with pytest.raises(InvalidRequest) as caught:
        check_policy(AutoscalingPolicy(), record, False, versions=None)  # type: ignore[arg-type]
    assert caught.value.param == "autoscaling" and "rolled back" in caught.value.message


def test_predict_threads_stay_within_the_cpu_budget() -> None:
    up = desired_replicas(Signals(ready=1, in_flight=40), 1, AutoscalingPolicy(max_replicas=8, up_delay_s=0), 0.0)
    assert up.desired == 2
    assert within_budget(up, budget=4, used_elsewhere=0).desired == 2
    capped = within_budget(replace(up, desired=4), budget=4, used_elsewhere=2)
    assert capped.desired == 2 and "CPU budget" in capped.reason
    assert within_budget(up, budget=2, used_elsewhere=2).desired == 1  # no room: it keeps what it has
