"""The benchmark: statistics and a run against the simulated engine."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest

from llmserve.stats import percentile
from loadtest.cli import BenchConfig
from loadtest.cli import bench as run
from loadtest.metrics import summarize
from loadtest.runner import Record, Target
from loadtest.sim import SimEngineProgram
from loadtest.simstack import StaticVersion
from tests.conftest import run_router


def test_percentile_interpolates_like_numpy() -> None:
    values = [1.0, 2.0, 3.0, 4.0]
    assert percentile(values, 50) == 2.5
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 4.0
    assert math.isclose(percentile(values, 90), 3.7)
    assert math.isnan(percentile([], 50))


def test_failed_requests_are_counted_but_left_out_of_latency() -> None:
    ok = Record(index=0, target="t", intended_s=0.0, sent_s=0.0, ok=True, status=200, first_token_s=0.1, end_s=0.5,
                itl_s=[0.01, 0.03], output_tokens=3)
    failed = Record(index=1, target="t", intended_s=0.0, sent_s=0.0, ok=False, status=503, first_token_s=9.0)
    summary = summarize([ok, failed], duration_s=1.0)
    assert summary["completed"] == 1 and summary["failed"] == 1
    assert summary["errors"] == {"503": 1}
    assert summary["p50_ttft_ms"] == pytest.approx(100.0)
    assert summary["p50_itl_ms"] == pytest.approx(20.0)
    assert summary["output_throughput"] == 3.0


async def test_bench_compares_router_with_the_engine_behind_it(tmp_path: Path) -> None:
    deployments = [StaticVersion(SimEngineProgram("demo", "v1", ttft_ms=30, itl_ms=5), 2048, 1)]
    async with run_router(deployments, tmp_path) as router:
        engine = router.backend.supervisor.replicas[0].base_url
        config = BenchConfig(model="demo", requests=8, concurrency=4, max_tokens=6, rounds=2, seed=1)
        report = await run([Target("direct", f"{engine}/v1"), Target("router", f"{router.url}/v1")], config)
    direct, routed = report["targets"]["direct"], report["targets"]["router"]
    for target in (direct, routed):
        assert target["completed"] == 8 and target["failed"] == 0
        assert target["total_output_tokens"] == 48
        assert 30 <= target["p50_ttft_ms"] < 1000  # the sim's 30 ms TTFT is a floor
        assert target["p50_itl_ms"] >= 4
    comparison = report["comparison"]["router_vs_direct"]
    assert set(comparison) == {"added_ttft_p50_ms", "added_ttft_p99_ms", "added_itl_p50_ms",
                               "output_throughput_ratio"}
    json.dumps(report)  # the report is plain JSON


async def test_bench_reports_errors_by_status(tmp_path: Path) -> None:
    deployments = [StaticVersion(SimEngineProgram("demo", "v1"), 2048, 1)]
    async with run_router(deployments, tmp_path) as router:
        config = BenchConfig(model="no-such-model", requests=2, concurrency=2, max_tokens=2, rounds=1, seed=0)
        report = await asyncio.wait_for(run([Target("router", f"{router.url}/v1")], config), 30)
    assert report["targets"]["router"]["failed"] == 2
    assert report["targets"]["router"]["errors"] == {"404": 2}


def test_routing_benchmark_measures_every_split() -> None:
    from loadtest.routing_bench import main as routing_main
    from loadtest.routing_bench import measure

    result = measure({"v1": 90, "v2": 10}, requests=2000)
    assert result["requests"] == 2000
    assert 0 < result["p50_us"] <= result["p99_us"] <= result["p999_us"]
    assert routing_main(["--requests", "200"]) == 0


async def test_metrics_overhead_benchmark_runs() -> None:
    from loadtest.metrics_overhead import measure

    report = await measure(requests=20, concurrency=4)
    comparison = report["comparison"]["metrics_on_vs_metrics_off"]
    assert report["targets"]["metrics_on"]["failed"] == 0 and report["targets"]["metrics_off"]["failed"] == 0
    assert 0.5 < comparison["output_throughput_ratio"] < 2.0


def test_overhead_pins_a_process_group_thread_by_thread() -> None:
    import os
    import subprocess
    import sys
    import time

    from loadtest.overhead import FULL, parse_cpus, pin, process_group, scenario_key

    assert parse_cpus("1") == {1} and parse_cpus("0,2-3") == {0, 2, 3}
    assert [scenario_key(s) for s in FULL] == ["ttft", "single-stream", "32-concurrent"]
    code = "import threading, time; threading.Thread(target=time.sleep, args=(30,)).start(); time.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)  # its own group, as a replica's
    try:
        cpu = min(os.sched_getaffinity(0))
        deadline = time.monotonic() + 10
        while len(os.listdir(f"/proc/{child.pid}/task")) < 2:  # the second thread has started
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert process_group(child.pid) == [child.pid]
        pin(child.pid, {cpu})
        assert all(os.sched_getaffinity(int(tid)) == {cpu} for tid in os.listdir(f"/proc/{child.pid}/task"))
    finally:
        child.kill()
        child.wait()
