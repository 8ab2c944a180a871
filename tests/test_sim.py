"""The simulated engine's capacity model and fault knobs."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import httpx
import pytest
import uvicorn

from loadtest.sim import SimConfig, build_app, parse_args
from tests.conftest import free_port

CHAT = {"model": "sim", "messages": [{"role": "user", "content": "hi"}]}


@contextlib.asynccontextmanager
async def serve(config: SimConfig) -> AsyncIterator[str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(config), host="127.0.0.1", port=port, log_config=None))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


def gauge(text: str, name: str) -> float:
    line = next(line for line in text.splitlines() if line.startswith(name))
    return float(line.rsplit(" ", 1)[1])


async def test_requests_beyond_capacity_wait_in_a_queue() -> None:
    async with serve(SimConfig(ttft_ms=150, itl_ms=1, max_running=2)) as url, httpx.AsyncClient() as client:
        started = time.perf_counter()
        calls = [asyncio.create_task(client.post(f"{url}/v1/chat/completions", json={**CHAT, "max_tokens": 1}))
                 for _ in range(4)]
        await asyncio.sleep(0.07)
        metrics = (await client.get(f"{url}/metrics")).text
        assert gauge(metrics, "vllm:num_requests_running") == 2.0
        assert gauge(metrics, "vllm:num_requests_waiting") == 2.0
        assert gauge(metrics, "vllm:kv_cache_usage_perc") > 0
        responses = await asyncio.gather(*calls)
        elapsed = time.perf_counter() - started
    assert all(r.status_code == 200 for r in responses)
    assert 0.28 <= elapsed < 1.0  # two waves of 150 ms


async def test_latency_grows_with_load() -> None:
    config = SimConfig(ttft_ms=50, itl_ms=1, max_running=4, load_slowdown=3.0)
    async with serve(config) as url, httpx.AsyncClient() as client:
        started = time.perf_counter()
        await client.post(f"{url}/v1/chat/completions", json={**CHAT, "max_tokens": 1})
        alone = time.perf_counter() - started
        started = time.perf_counter()
        await asyncio.gather(*(client.post(f"{url}/v1/chat/completions", json={**CHAT, "max_tokens": 1})
                               for _ in range(4)))
        loaded = time.perf_counter() - started
    assert loaded > alone * 1.8


async def test_fault_knobs() -> None:
    async with serve(SimConfig(error_rate=1.0)) as url, httpx.AsyncClient() as client:
        response = await client.post(f"{url}/v1/chat/completions", json=CHAT)
        assert response.status_code == 500 and response.json()["error"]["code"] == 500
    async with serve(SimConfig(drop_rate=1.0, drop_after_tokens=2, itl_ms=1)) as url, httpx.AsyncClient() as client:
        with pytest.raises(httpx.RemoteProtocolError):
            async with client.stream("POST", f"{url}/v1/chat/completions",
                                     json={**CHAT, "stream": True, "max_tokens": 10}) as response:
                [line async for line in response.aiter_lines()]
    async with serve(SimConfig(hang_rate=1.0, hang_s=30)) as url, httpx.AsyncClient(timeout=0.5) as client:
        with pytest.raises(httpx.ReadTimeout):
            async with client.stream("POST", f"{url}/v1/chat/completions",
                                     json={**CHAT, "stream": True}) as response:
                [line async for line in response.aiter_lines() if line.startswith("data: {")]
    async with serve(SimConfig(slow_start_s=0.3)) as url, httpx.AsyncClient() as client:
        assert (await client.get(f"{url}/health")).status_code == 503
        await asyncio.sleep(0.35)
        assert (await client.get(f"{url}/health")).status_code == 200


async def test_jitter_follows_the_configured_spread() -> None:
    async with serve(SimConfig(ttft_ms=20, itl_ms=2, jitter_cv=0.5, seed=7)) as url, httpx.AsyncClient() as client:
        times = []
        for _ in range(20):
            started = time.perf_counter()
            await client.post(f"{url}/v1/completions", json={"model": "sim", "prompt": "x", "max_tokens": 1})
            times.append(time.perf_counter() - started)
    assert max(times) > 1.3 * min(times)


def test_bad_knobs_are_refused() -> None:
    with pytest.raises(SystemExit):
        parse_args(["--error-rate", "1.5"])
    _args, config = parse_args(["--max-running", "8", "--drop-rate", "0.1", "--model", "a:v1", "a"])
    assert config.max_running == 8 and config.served_names == ("a:v1", "a")
