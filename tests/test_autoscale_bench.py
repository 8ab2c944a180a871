"""The autoscaling benchmark: its scoring as pure functions, and its ``--quick`` run's report shape and invariants.

The quick run asserts only what holds on any machine (keys, nothing lost, the
autoscaled run scaled up and cost no more than the maximum): never a timing
threshold, which a loaded CI box would miss.
"""

from __future__ import annotations

import json
from pathlib import Path

from loadtest.autoscale_score import Sample, cold_start_holds, replica_seconds, reversals, steady_changes
from loadtest.autoscale_trace import FULL_DURATIONS, QUICK_DURATIONS, Compression, day_trace

KEYS = ("slo_attainment", "replica_seconds", "goodput", "direction_changes", "failed")


def test_the_day_trace_has_its_shape_and_seeded_arrivals() -> None:
    trace = day_trace(3.0, FULL_DURATIONS)
    assert [p.name for p in trace.phases] == ["night", "morning", "day", "evening", "late", "spike", "after"]
    spans = {p.name: (start, end) for p, start, end in trace.spans()}
    assert trace.rate_at(1.0) == 3.0 and trace.rate_at(spans["day"][0] + 1) == 18.0
    assert trace.rate_at(spans["spike"][0]) == 9.0 and trace.rate_at(spans["after"][0]) == 3.0
    middle = (spans["morning"][0] + spans["morning"][1]) / 2
    assert abs(trace.rate_at(middle) - 10.5) < 1e-9  # the ramp is linear
    first, again = trace.arrivals(7), trace.arrivals(7)
    assert first == again and first != trace.arrivals(8)
    assert abs(len(first) - trace.expected_requests()) < 4 * trace.expected_requests() ** 0.5
    assert all(0 <= t < trace.duration_s for t in first) and first == sorted(first)
    assert day_trace(3.0, QUICK_DURATIONS).duration_s == 20.0


def test_the_compression_divides_the_designs_delays() -> None:
    policy = Compression(30).policy(1, 4, 6.0, 16)
    assert (policy["up_delay_s"], policy["down_delay_s"], policy["idle_delay_s"], policy["cooldown_s"]) == \
        (4.0, 20.0, 10.0, 2.0)
    assert Compression(30).engine_start_s == 3.0 and Compression(30).allowed_changes(40.0) == 2.0


def test_replica_seconds_integrate_the_live_count_over_the_trace() -> None:
    samples = [Sample(0.0, 1, 1), Sample(2.0, 3, 1), Sample(4.0, 2, 2), Sample(9.0, 2, 2)]
    assert replica_seconds(samples, 6.0) == 1 * 2 + 3 * 2 + 2 * 2
    assert replica_seconds([Sample(-1.0, 4, 4)], 5.0) == 20.0  # a sample before the start counts from 0


def test_direction_changes_count_reversals_and_are_judged_per_steady_phase() -> None:
    decisions = [{"t": 1.0, "from": 1, "to": 2}, {"t": 2.0, "from": 2, "to": 4}, {"t": 8.0, "from": 4, "to": 3},
                 {"t": 9.0, "from": 3, "to": 4}, {"t": 30.0, "from": 4, "to": 3}]
    changes = reversals(decisions)
    assert changes == [8.0, 9.0, 30.0]
    trace = day_trace(1.0, {"night": 5, "morning": 1, "day": 10, "evening": 1, "late": 10, "spike": 1, "after": 10})
    steady = steady_changes(changes, trace, Compression(120))  # 10 minutes = 5 s
    assert steady["day"] == {"changes": 2, "allowed": 2.0, "within": True}
    assert steady["after"]["changes"] == 1 and steady["night"]["changes"] == 0


def test_cold_start_holds_come_from_the_routers_histogram() -> None:
    text = "\n".join([
        '# TYPE llmserve_cold_start_wait_seconds histogram',
        'llmserve_cold_start_wait_seconds_bucket{le="0.5",model="chat",version="v1"} 1.0',
        'llmserve_cold_start_wait_seconds_bucket{le="1.0",model="chat",version="v1"} 3.0',
        'llmserve_cold_start_wait_seconds_bucket{le="+Inf",model="chat",version="v1"} 4.0',
        'llmserve_cold_start_wait_seconds_count{model="chat",version="v1"} 4.0',
        'llmserve_cold_start_wait_seconds_sum{model="chat",version="v1"} 4.4',
        'llmserve_cold_start_wait_seconds_count{model="other",version="v1"} 9.0',
    ])
    assert cold_start_holds(text, "chat") == {"holds": 4, "wait_mean_s": 1.1, "wait_p50_le_s": 1.0,
                                              "wait_max_le_s": None}  # past the top bucket
    assert cold_start_holds("", "chat")["holds"] == 0


def test_the_quick_benchmark_reports_every_run_and_loses_nothing(tmp_path: Path) -> None:
    from loadtest.autoscale_bench import main

    output, plot = tmp_path / "autoscale.json", tmp_path / "autoscale.png"
    assert main(["--quick", "--output", str(output), "--plot", str(plot)]) == 0
    report = json.loads(output.read_text())
    for name in ("autoscaled", "fixed_min", "fixed_max"):
        run = report[name]
        assert all(key in run for key in KEYS), (name, sorted(run))
        assert run["lost"] == 0, (name, run["failed_by_status"])
        assert 0.0 <= run["slo_attainment"] <= 1.0 and run["requests"] == report["requests"] > 0
    auto, fixed_max = report["autoscaled"], report["fixed_max"]
    assert fixed_max["replica_seconds"] >= auto["replica_seconds"]
    assert any(e["to"] > e["from"] for e in auto["scale_events"]), auto["scale_events"]
    assert report["fixed_min"]["scale_events"] == [] and fixed_max["direction_changes"] == 0
    assert report["cold_start"]["lost"] == 0 and report["cold_start"]["cold_start"]["holds"] >= 1
    assert set(report["goals"]) >= {"attainment_at_least_99pct_of_fixed_max", "no_request_lost", "all"}
    assert all(isinstance(v, bool) for v in report["goals"].values())
    assert report["plot"] == str(plot) and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
