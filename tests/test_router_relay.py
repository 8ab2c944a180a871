"""The router over HTTP, in front of simulated engine replicas (real processes)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import httpx

from llmserve.replicas.backend import EndpointState
from loadtest.sim import SimEngineProgram
from loadtest.simstack import StaticVersion
from tests.conftest import ScriptProgram, run_router

CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}


def sim(replicas: int = 1, ttft_ms: float = 10, itl_ms: float = 5) -> list[StaticVersion]:
    return [StaticVersion(SimEngineProgram("demo", "v1", ttft_ms=ttft_ms, itl_ms=itl_ms), 2048, replicas)]


async def read_sse(response: httpx.Response) -> list[tuple[float, str]]:
    """(arrival time, data) of each SSE event as it arrives."""
    events: list[tuple[float, str]] = []
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            events.append((time.perf_counter(), line[6:]))
    return events


async def test_stream_is_relayed_chunk_by_chunk(tmp_path: Path) -> None:
    async with run_router(sim(itl_ms=60), tmp_path) as router, httpx.AsyncClient() as client:
        body = {**CHAT, "stream": True, "max_tokens": 6, "stream_options": {"include_usage": True}}
        async with client.stream("POST", f"{router.url}/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            assert response.headers["x-model-version"] == "v1"
            assert response.headers["x-served-by"] == "demo:v1/0"
            assert response.headers["x-request-id"]
            events = await read_sse(response)
    assert events[-1][1] == "[DONE]"
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert all(c["model"] == "demo:v1" for c in chunks)
    assert chunks[-1]["usage"]["completion_tokens"] == 6
    # Six tokens 60 ms apart: if the router buffered, they would arrive together.
    content_times = [t for (t, _), c in zip(events[:-1], chunks, strict=True) if c["choices"]]
    assert len(content_times) == 6
    assert content_times[-1] - content_times[0] > 0.2


async def test_non_streaming_chat_and_completions(tmp_path: Path) -> None:
    async with run_router(sim(), tmp_path) as router, httpx.AsyncClient() as client:
        chat = await client.post(f"{router.url}/v1/chat/completions", json={**CHAT, "max_tokens": 3})
        assert chat.status_code == 200
        assert chat.json()["choices"][0]["message"]["content"]
        assert chat.json()["model"] == "demo:v1"
        completion = await client.post(
            f"{router.url}/v1/completions", json={"model": "demo", "prompt": "Once", "max_tokens": 3}
        )
        assert completion.status_code == 200
        assert completion.json()["usage"]["completion_tokens"] == 3
        models = (await client.get(f"{router.url}/v1/models")).json()
        assert [m["id"] for m in models["data"]] == ["demo"]  # each model once: no version aliases by default
        assert models["data"][0]["versions"] == {"v1": 100}


async def test_generate_api_streams_text_and_a_final_summary(tmp_path: Path) -> None:
    async with run_router(sim(), tmp_path) as router, httpx.AsyncClient() as client:
        body = {"prompt": "hello", "max_tokens": 4, "stream": True, "params": {"temperature": 0.0}}
        async with client.stream("POST", f"{router.url}/api/v1/models/demo/generate", json=body) as response:
            assert response.status_code == 200
            text = (await response.aread()).decode()
        events = [block for block in text.strip().split("\n\n") if block]
        tokens = [e for e in events if e.startswith("event: token")]
        done = [e for e in events if e.startswith("event: done")]
        assert len(tokens) == 4
        summary = json.loads(done[0].split("data: ", 1)[1])
        assert summary["version"] == "v1" and summary["replica"] == "demo:v1/0"
        assert summary["usage"]["completion_tokens"] == 4

        plain = await client.post(f"{router.url}/api/v1/models/demo/generate", json={"prompt": "hi", "max_tokens": 2})
        assert plain.status_code == 200
        assert plain.json()["text"] and plain.json()["version"] == "v1"


async def test_version_can_be_pinned_and_unknown_version_is_404(tmp_path: Path) -> None:
    async with run_router(sim(), tmp_path) as router, httpx.AsyncClient() as client:
        pinned = await client.post(
            f"{router.url}/v1/chat/completions", json={**CHAT, "max_tokens": 1}, headers={"X-Model-Version": "v1"}
        )
        assert pinned.status_code == 200
        missing = await client.post(
            f"{router.url}/v1/chat/completions", json={**CHAT, "max_tokens": 1}, headers={"X-Model-Version": "v7"}
        )
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "version_not_found"
        generate = await client.post(
            f"{router.url}/api/v1/models/demo/generate", json={"prompt": "x", "params": {"version": "v7"}}
        )
        assert generate.status_code == 404


async def test_least_outstanding_spreads_concurrent_requests(tmp_path: Path) -> None:
    async with run_router(sim(replicas=2, itl_ms=20), tmp_path) as router, httpx.AsyncClient() as client:
        responses = await asyncio.gather(*(
            client.post(f"{router.url}/v1/chat/completions", json={**CHAT, "max_tokens": 5}) for _ in range(8)
        ))
    served = [r.headers["x-served-by"] for r in responses]
    assert all(r.status_code == 200 for r in responses)
    # Both replicas take a share; exact halves only if all eight overlap, which a busy CI box may not give.
    assert abs(served.count("demo:v1/0") - served.count("demo:v1/1")) <= 2


async def test_client_disconnect_aborts_the_engine_request(tmp_path: Path) -> None:
    running = 'vllm:num_requests_running{model_name="demo:v1"}'
    async with run_router(sim(itl_ms=50), tmp_path) as router, httpx.AsyncClient() as client:
        replica = router.backend.supervisor.replicas[0]
        body = {**CHAT, "stream": True, "max_tokens": 200}
        async with client.stream("POST", f"{router.url}/v1/chat/completions", json=body) as response:
            lines = response.aiter_lines()
            assert (await anext(lines)).startswith("data: ")
            metrics = (await client.get(f"{replica.base_url}/metrics")).text
            assert f"{running} 1.0" in metrics  # still generating while we are connected
            assert replica.outstanding == 1
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            metrics = (await client.get(f"{replica.base_url}/metrics")).text
            if f"{running} 0.0" in metrics:
                break
            await asyncio.sleep(0.05)
        assert f"{running} 0.0" in metrics
        assert "sim_requests_aborted_total 1" in metrics
        assert replica.outstanding == 0


async def test_dead_replica_is_skipped_before_the_first_token(tmp_path: Path) -> None:
    async with run_router(sim(replicas=2), tmp_path) as router, httpx.AsyncClient() as client:
        victim = router.backend.supervisor.replicas[0]
        os.killpg(victim.pid, signal.SIGKILL)
        await asyncio.sleep(0.1)
        responses = [
            await client.post(f"{router.url}/v1/chat/completions", json={**CHAT, "max_tokens": 2}) for _ in range(4)
        ]
        assert [r.status_code for r in responses] == [200] * 4
        assert all(r.headers["x-served-by"] == "demo:v1/1" for r in responses)
        # And the supervisor brings the dead one back.
        await router.backend.supervisor.wait_ready(victim, timeout=20)
        assert victim.restarts >= 1


async def test_replica_killed_mid_stream_ends_the_stream_with_an_error(tmp_path: Path) -> None:
    async with run_router(sim(itl_ms=50), tmp_path) as router, httpx.AsyncClient(timeout=10) as client:
        replica = router.backend.supervisor.replicas[0]
        body = {**CHAT, "stream": True, "max_tokens": 100}
        datas: list[str] = []
        async with client.stream("POST", f"{router.url}/v1/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    datas.append(line[6:])
                    if len(datas) == 2:
                        os.killpg(replica.pid, signal.SIGKILL)
        assert datas[-1] == "[DONE]"
        error = json.loads(datas[-2])["error"]
        assert error["code"] == "replica_failed" and "incomplete" in error["message"]


async def test_no_ready_replica_is_503_with_retry_after(tmp_path: Path) -> None:
    deployment = StaticVersion(ScriptProgram("import time; time.sleep(120)"), 2048, 1)
    async with run_router([deployment], tmp_path, wait_ready=False) as router, httpx.AsyncClient() as client:
        assert router.backend.supervisor.replicas[0].state is EndpointState.STARTING
        ready = await client.get(f"{router.url}/readyz")
        assert ready.status_code == 503 and ready.headers["retry-after"] == "2"
        assert ready.json()["waiting_for"] == ["demo"]
        response = await client.post(f"{router.url}/v1/chat/completions", json=CHAT)
        assert response.status_code == 503
        assert response.headers["retry-after"] == "2"
        assert response.json()["error"]["code"] == "no_replica_ready"
        assert (await client.get(f"{router.url}/healthz")).json() == {"status": "ok"}


async def test_readyz_once_every_model_has_a_ready_replica(tmp_path: Path) -> None:
    async with run_router(sim(), tmp_path) as router, httpx.AsyncClient() as client:
        ready = await client.get(f"{router.url}/readyz")
        assert ready.status_code == 200
        assert ready.json()["ready_replicas"] == {"demo": 1}




async def test_the_only_replica_dying_gives_503_with_retry_after_then_recovers(tmp_path: Path) -> None:
    async with run_router(sim(), tmp_path) as router, httpx.AsyncClient() as client:
        replica = router.backend.supervisor.replicas[0]
        os.killpg(replica.pid, signal.SIGKILL)
        await asyncio.sleep(0.05)
        response = await client.post(f"{router.url}/v1/chat/completions", json={**CHAT, "max_tokens": 2})
        assert response.status_code == 503
        assert response.headers["retry-after"] == "2"
        assert "refused" in response.json()["error"]["message"] or "restarting" in response.json()["error"]["message"]
        await router.backend.supervisor.wait_ready(replica, timeout=20)
        again = await client.post(f"{router.url}/v1/chat/completions", json={**CHAT, "max_tokens": 2})
        assert again.status_code == 200


async def test_a_stream_in_flight_when_the_router_stops_is_cut_and_its_engine_request_closed(tmp_path: Path) -> None:
    """A router that stops ends its open streams rather than waiting for them (a stream may run for
    minutes): their connections close, each relay closes its engine request, as a client leaving does."""
    async with httpx.AsyncClient() as client:
        async with run_router(sim(itl_ms=50), tmp_path) as router:
            replica = router.backend.supervisor.replicas[0]
            body = {**CHAT, "stream": True, "max_tokens": 2000}  # 100 s of tokens
            response = await client.send(client.build_request("POST", f"{router.url}/v1/chat/completions",
                                                              json=body), stream=True)
            lines = response.aiter_lines()
            assert (await anext(lines)).startswith("data: ")
            assert replica.outstanding == 1
        rest: list[str] = []
        try:
            async for line in lines:
                rest.append(line)
        except (httpx.RemoteProtocolError, httpx.ReadError):
            pass  # the connection closed in the middle of the chunked body: the client knows it is cut short
        finally:
            await response.aclose()
        assert "data: [DONE]" not in rest
        assert replica.outstanding == 0
