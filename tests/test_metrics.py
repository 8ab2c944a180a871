"""/metrics: Prometheus text that parses, and histograms that count what was sent."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from llmserve.settings import RouterSettings
from loadtest.sim import SimEngineProgram
from loadtest.simstack import StaticVersion
from tests.conftest import free_port, run_router

CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(all_samples: dict, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in all_samples.items() if n == name and labels.items() <= dict(ls).items())


async def test_metrics_count_what_was_sent(tmp_path: Path) -> None:
    deployments = [StaticVersion(SimEngineProgram("demo", "v1", ttft_ms=10, itl_ms=3), 2048, 2)]
    async with run_router(deployments, tmp_path) as router, httpx.AsyncClient() as client:
        streams = [client.post(f"{router.url}/v1/chat/completions",
                               json={**CHAT, "stream": True, "max_tokens": 5, "user": f"u{i}"}) for i in range(6)]
        plain = [client.post(f"{router.url}/v1/completions", json={"model": "demo", "prompt": "x", "max_tokens": 3})
                 for _ in range(4)]
        responses = await asyncio.gather(*streams, *plain)
        assert all(r.status_code == 200 for r in responses)
        bad = await client.post(f"{router.url}/v1/chat/completions", json={**CHAT, "model": "nope"})
        assert bad.status_code == 404
        scrape = await client.get(f"{router.url}/metrics")
    assert scrape.status_code == 200 and scrape.headers["content-type"].startswith("text/plain")
    found = samples(scrape.text)
    assert value(found, "llmserve_requests_total", route="/v1/chat/completions", status="200", version="v1") == 6
    assert value(found, "llmserve_requests_total", route="/v1/completions", status="200") == 4
    assert value(found, "llmserve_time_to_first_token_seconds_count", model="demo", version="v1") == 6
    assert value(found, "llmserve_e2e_latency_seconds_count", model="demo") == 10
    assert value(found, "llmserve_inter_token_latency_seconds_count", model="demo") == 6 * 4
    # TPOT needs a first-token time: streamed requests only
    assert value(found, "llmserve_time_per_output_token_seconds_count", model="demo") == 6
    assert value(found, "llmserve_output_tokens_total", model="demo") == 6 * 5 + 4 * 3
    assert value(found, "llmserve_requests_in_flight", model="demo") == 0
    assert value(found, "llmserve_traffic_share_percent", model="demo", version="v1") == 100
    assert value(found, "llmserve_replica_ready", model="demo") == 2
    assert value(found, "llmserve_router_asyncio_tasks") >= 1  # the scrape runs in one
    # SLO bounds are bucket edges; no per-user or per-request labels anywhere
    ttft_buckets = {dict(ls)["le"] for (n, ls) in found if n == "llmserve_time_to_first_token_seconds_bucket"}
    assert {"0.05", "0.5"} <= ttft_buckets
    assert not any(k in dict(ls) for (_n, ls) in found for k in ("user", "request_id"))
    # every streamed request observed once (which bucket is a matter of speed, for benchmarks: in one
    # clean-clone CI run on a loaded machine none of the six ~10 ms TTFTs was under 500 ms)
    assert value(found, "llmserve_time_to_first_token_seconds_bucket", le="+Inf") == 6


async def test_metrics_can_be_turned_off(tmp_path: Path) -> None:
    port = free_port()
    settings = RouterSettings(port=port, metrics_enabled=False)
    deployments = [StaticVersion(SimEngineProgram("demo", "v1"), 2048, 1)]
    async with run_router(deployments, tmp_path, router_settings=settings) as router, httpx.AsyncClient() as client:
        answer = await client.post(f"{router.url}/v1/chat/completions", json={**CHAT, "max_tokens": 1})
        assert answer.status_code == 200
        assert (await client.get(f"{router.url}/metrics")).status_code == 404


async def test_engine_metrics_are_re_exposed_per_replica(tmp_path: Path) -> None:
    settings = RouterSettings(port=free_port(), engine_metrics_interval_s=0.1)
    deployments = [StaticVersion(SimEngineProgram("demo", "v1"), 2048, 2)]
    async with run_router(deployments, tmp_path, router_settings=settings) as router, httpx.AsyncClient() as client:
        await client.post(f"{router.url}/v1/chat/completions", json={**CHAT, "max_tokens": 1})
        found: dict = {}
        for _ in range(50):
            found = samples((await client.get(f"{router.url}/metrics")).text)
            if value(found, "llmserve_engine_requests_running", model="demo") == 0 and any(
                    n == "llmserve_engine_kv_cache_usage_ratio" for n, _ in found):
                break
            await asyncio.sleep(0.1)
    replicas = {dict(ls)["replica"] for (n, ls) in found if n == "llmserve_engine_requests_waiting"}
    assert replicas == {"demo:v1/0", "demo:v1/1"}
    assert value(found, "llmserve_engine_requests_running", version="v1") == 0


def test_vllm_metric_names_are_parsed() -> None:
    from router.observe.engine_samples import parse_engine_metrics

    text = (
        '# TYPE vllm:num_requests_running gauge\n'
        'vllm:num_requests_running{engine="0",model_name="m"} 3.0\n'
        '# TYPE vllm:num_preemptions counter\n'
        'vllm:num_preemptions_total{engine="0",model_name="m"} 7.0\n'
        '# TYPE vllm:prefix_cache_hits counter\n'
        'vllm:prefix_cache_hits_total{engine="0",model_name="m"} 40.0\n'
    )
    assert parse_engine_metrics(text) == {"vllm:num_requests_running": 3.0, "vllm:num_preemptions_total": 7.0,
                                          "vllm:prefix_cache_hits_total": 40.0}


def test_a_long_stream_holds_a_bounded_number_of_gaps_and_every_gap_is_counted() -> None:
    from router.observe.metrics import RouterMetrics
    from router.observe.request_record import GAP_BATCH, RequestRecord
    from router.traffic.catalog import Catalog

    metrics = RouterMetrics(Catalog())
    record = RequestRecord("r", "/v1/chat/completions", metrics=metrics)
    record.begin("demo", "v1", stream=True)
    held = 0
    for _ in range(10 * GAP_BATCH + 1):  # a token a chunk: 10 * GAP_BATCH gaps
        record.mark_chunk(b'{"choices":[{"delta":{"content":"word"}}]}')
        held = max(held, len(record.gaps_s))
    record.finish(200)
    assert held < GAP_BATCH  # not one float a token for the stream's whole life
    count = metrics.registry.get_sample_value("llmserve_inter_token_latency_seconds_count",
                                              {"model": "demo", "version": "v1"})
    assert count == 10 * GAP_BATCH


async def test_the_asyncio_task_gauge_counts_the_loops_tasks() -> None:
    """The soak reads this gauge to see a task leak from outside the router's process."""
    from router.observe.metrics import RouterMetrics
    from router.traffic.catalog import Catalog

    metrics = RouterMetrics(Catalog())

    def tasks() -> float:
        return value(samples(metrics.exposition().decode()), "llmserve_router_asyncio_tasks")

    before = tasks()
    parked = [asyncio.create_task(asyncio.sleep(60)) for _ in range(5)]
    assert tasks() == before + 5
    for task in parked:
        task.cancel()
    await asyncio.gather(*parked, return_exceptions=True)
    assert tasks() == before
    assert before >= 1  # this test's own task
