"""The chaos command's scenarios on a CI-sized configuration: under each fault, no request is lost;
and the soak at its CI size, 2 minutes, its footprint flat."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest.chaos import Load, outcome_of, scenarios, table
from loadtest.chaos.__main__ import run_one
from loadtest.chaos.footprint import trend
from loadtest.chaos.soak import flatness
from loadtest.runner import Record

CI_LOAD = Load(users=4, duration_s=4.0)
# Two real engines on one core each serve the 4 users' 24-token streams slowly, one engine alone while
# the other restarts: 4 s gave CI 6 requests, 20 s gave 14 on an idle AVX-512 EPYC. The scenario waits
# for the killed engine's restart (tens of seconds) anyway, so a longer load costs little.
REAL_ENGINE_LOAD = Load(users=4, duration_s=30.0)
SOAK_CI_S = 120.0  # issue 14: a CI-sized 2-minute version of the 30-minute soak (in every run; -k "not soak" skips it)
# The soak's checks are about growth over minutes: 4 seconds of it would test only that it starts, which
# the 2-minute test below does too, so the fault scenarios' CI load leaves it out.
FAULTS = [s for s in scenarios() if s.name != "soak"]


@pytest.mark.parametrize("scenario", FAULTS, ids=lambda s: s.name)
async def test_every_request_under_the_fault_gets_a_clear_answer(scenario, tmp_path: Path) -> None:
    result = await run_one(scenario, REAL_ENGINE_LOAD if scenario.real_engine else CI_LOAD, tmp_path)
    print(table([result]))
    assert result["sent"] >= 10 and result["ok"] >= result["sent"] // 2
    assert result["missed"] == [], (result["missed"], result["lost_examples"])
    assert result["longest_stall_ms"] < 5000  # nothing waits past the router's time-outs (1 s first token here)
    if scenario.name in ("slow_replica", "hung_replica"):  # the hung one's requests go to the other replica
        assert result["failed_clean"] == 0


def test_a_cut_stream_counts_as_lost_and_an_error_event_as_a_clear_answer() -> None:
    cut = Record(0, "router", 0.0, 0.0, ok=True, status=200, first_token_s=0.1)  # text, then no [DONE]
    complete = Record(1, "router", 0.0, 0.0, ok=True, status=200, first_token_s=0.1, complete=True)
    errored = Record(2, "router", 0.0, 0.0, status=200, error="replica failed", error_event=True)
    refused = Record(3, "router", 0.0, 0.0, status=429, retry_after="1")
    dropped = Record(4, "router", 0.0, 0.0, error="ServerDisconnectedError")
    assert [outcome_of(r) for r in (cut, complete, errored, refused, dropped)] == [
        "lost", "ok", "failed_clean", "refused", "lost"]


async def test_soak_two_minutes_keeps_the_routers_footprint_flat(tmp_path: Path) -> None:
    (soak,) = [s for s in scenarios() if s.name == "soak"]
    result = await run_one(soak, Load(users=4, duration_s=SOAK_CI_S), tmp_path)
    print(table([result]))
    details = result["details"]
    print({"trends": details["trends"], "idle_before": details["idle_before"], "idle_after": details["idle_after"],
           "capacity": details["capacity"], "achieved_rps": details["achieved_rps"]})
    assert result["missed"] == [], (result["missed"], result["checks"], result["lost_examples"])
    assert result["failed_clean"] == 0
    assert result["sent"] >= 0.9 * details["rate_rps"] * SOAK_CI_S
    assert details["capacity"]["ok"] == details["capacity"]["sent"]  # the capacity run itself was clean


def test_a_leak_is_a_slope_that_the_in_flight_noise_is_not() -> None:
    minutes = [t * 6.0 for t in range(200)]  # 20 minutes, a sample every 6 s
    swinging = trend([(t, 60.0 + (20 if i % 2 else -20)) for i, t in enumerate(minutes)])  # in flight, no leak
    leaking = trend([(t, 60.0 + t / 60) for t in minutes])  # one more a minute
    assert abs(swinging.growth) < 1 and swinging.max == 80 and swinging.mean == 60
    assert leaking.slope_per_min == pytest.approx(1.0) and leaking.growth == pytest.approx(19.9)
    rss = trend([(t, 100.0) for t in minutes])
    flat = flatness({"rss_mb": rss, "fds": swinging, "tasks": swinging, "threads": trend([(0, 6), (60, 6)])})
    assert all(flat.values())
    assert flatness({"rss_mb": trend([(0, 100), (60, 108)]), "fds": leaking, "tasks": leaking,
                     "threads": trend([(0, 6), (60, 8)])}) == {"rss_flat": False, "fds_flat": False,
                                                                "tasks_flat": False, "threads_flat": False}
