"""The autoscaler through the router, against simulated engines: ramps, scale to zero and back, drains."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from llmserve.replicas.backend import EndpointState
from llmserve.replicas.spec import EngineSpec
from llmserve.settings import AdmissionSettings, AutoscaleSettings, RouterSettings
from loadtest.sim import SimEngineProgram
from router.store.sqlite import SQLiteStore
from tests.conftest import RunningRouter, free_port, run_router
from tests.test_control_plane import MODEL, make_version

FAST_LOOP = AutoscaleSettings(interval_s=0.2, window_s=5, keepalive_s=0.3, hold_timeout_s=30)


def slow_sim(spec: EngineSpec) -> SimEngineProgram:
    # 20 tokens at 25 ms: a request is in flight about half a second; two replicas a core for the capacity check
    return SimEngineProgram(spec.model_name, spec.version, ttft_ms=20, itl_ms=25, replicas_per_core=2,
                            extra_args=("--slow-start-s", "0.6"))


@contextlib.asynccontextmanager
async def autoscaled_router(tmp_path: Path, program: Callable[[EngineSpec], SimEngineProgram] = slow_sim,
                            autoscale: AutoscaleSettings = FAST_LOOP) -> AsyncIterator[RunningRouter]:
    make_version(tmp_path / "models", "v1")
    settings = RouterSettings(port=free_port(), retry_after_s=2, admission=AdmissionSettings(enabled=False),
                              autoscale=autoscale)
    async with run_router([], tmp_path, router_settings=settings, store=SQLiteStore(tmp_path / "db.sqlite"),
                          program_factory=program) as router:
        yield router


async def deploy(client: httpx.AsyncClient, url: str, replicas: int, autoscaling: dict[str, Any]) -> None:
    assert (await client.post(f"{url}/api/v1/models", json={"model_name": MODEL})).status_code == 201
    created = await client.post(f"{url}/api/v1/deployments", json={
        "model_name": MODEL, "version": "v1", "traffic_percent": 100, "resources": {"replicas": replicas},
        "autoscaling": autoscaling})
    assert created.status_code == 202, created.text
    await until(lambda: _active(client, url), "v1 active")


async def _active(client: httpx.AsyncClient, url: str) -> bool:
    state = (await client.get(f"{url}/api/v1/deployments/{MODEL}")).json()
    return any(v["status"] == "active" for v in state["versions"]) and bool(state["split"])


async def until(check: Callable[[], Awaitable[bool]] | Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def ready(router: RunningRouter) -> int:
    return sum(r.state is EndpointState.READY for r in router.backend.supervisor.replicas)


def live(router: RunningRouter) -> int:
    return sum(r.state is not EndpointState.STOPPED for r in router.backend.supervisor.replicas)


async def stream(client: httpx.AsyncClient, url: str, user: str, max_tokens: int = 20) -> tuple[int, str]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
            "stream": True, "user": user}
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        text = (await response.aread()).decode()
    return response.status_code, text


async def test_a_ramp_scales_one_to_three_and_back_down_after_the_window(tmp_path: Path) -> None:
    policy = {"min_replicas": 1, "max_replicas": 3, "target_in_flight_per_replica": 2, "up_delay_s": 0.4,
              "down_delay_s": 1.5, "cooldown_s": 0.5}
    async with autoscaled_router(tmp_path) as router, httpx.AsyncClient(timeout=60) as client:
        await deploy(client, router.url, 1, policy)
        stop = asyncio.Event()
        results: list[tuple[int, str]] = []
        most_live = [0]

        async def user(name: str) -> None:
            while not stop.is_set():
                results.append(await stream(client, router.url, name))
                most_live[0] = max(most_live[0], live(router))

        users = [asyncio.create_task(user(f"u{i}")) for i in range(8)]
        await until(lambda: ready(router) == 3, "three ready replicas", timeout=40)
        stop.set()
        await asyncio.gather(*users)
        await until(lambda: live(router) == 1, "back to one replica", timeout=40)

        assert results and all(status == 200 and "[DONE]" in text and '"error"' not in text
                               for status, text in results), [r for r in results if r[0] != 200][:3]
        assert most_live[0] <= 3  # never past max_replicas
        view = (await client.get(f"{router.url}/api/v1/deployments/{MODEL}/autoscaling")).json()
        (version,) = view["versions"]
        assert version["desired_replicas"] == 1 and version["policy"]["max_replicas"] == 3
        moves = [(d["from"], d["to"], d["rule"]) for d in version["decisions"]]
        assert moves[0][:2] == (1, 2) and (2, 3) in [m[:2] for m in moves] and moves[-1][:2] == (2, 1), moves
        assert all(d["signals"]["ready"] >= 0 and d["reason"] for d in version["decisions"])
        metrics = (await client.get(f"{router.url}/metrics")).text
        assert f'llmserve_autoscale_decisions_total{{direction="up",mode="on",model="{MODEL}"' in metrics
        assert f'llmserve_autoscale_desired_replicas{{model="{MODEL}",version="v1"}} 1.0' in metrics


async def test_scale_to_zero_and_back_with_held_requests_that_all_succeed(tmp_path: Path) -> None:
    policy = {"min_replicas": 0, "max_replicas": 2, "idle_delay_s": 0.5, "cooldown_s": 0}
    async with autoscaled_router(tmp_path) as router, httpx.AsyncClient(timeout=60) as client:
        await deploy(client, router.url, 1, policy)
        await until(lambda: live(router) == 0, "scaled to zero")
        assert (await client.get(f"{router.url}/readyz")).status_code == 200  # at zero on purpose: still ready

        async def buffered() -> tuple[int, str]:
            response = await client.post(f"{router.url}/v1/chat/completions", json={
                "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
            return response.status_code, response.text

        started = time.monotonic()
        outcomes = await asyncio.gather(*(stream(client, router.url, f"s{i}", 3) for i in range(3)),
                                        *(buffered() for _ in range(2)))
        waited = time.monotonic() - started
        assert all(status == 200 for status, _ in outcomes), outcomes
        streams, answers = outcomes[:3], outcomes[3:]
        # the engine takes 0.6 s to pass its health check: the streams were kept alive meanwhile
        assert all(": waiting for a replica of chat:v1 to start" in text and "[DONE]" in text for _, text in streams)
        assert all('"choices"' in text for _, text in answers)
        assert waited > 0.5
        view = (await client.get(f"{router.url}/api/v1/deployments/{MODEL}/autoscaling")).json()
        rules = [d["rule"] for d in view["versions"][0]["decisions"]]
        assert "to_zero" in rules and rules[-1] == "cold_start", rules
        metrics = (await client.get(f"{router.url}/metrics")).text
        assert f'llmserve_cold_start_wait_seconds_count{{model="{MODEL}",version="v1"}} 5.0' in metrics


async def test_held_requests_past_the_bound_get_429_and_past_the_wait_503(tmp_path: Path) -> None:
    start_s = {"value": "0"}  # once scaled to zero, the replica the cold start launches never gets ready

    def program(spec: EngineSpec) -> SimEngineProgram:
        return SimEngineProgram(spec.model_name, spec.version, extra_args=("--slow-start-s", start_s["value"]))

    small = AutoscaleSettings(interval_s=0.2, keepalive_s=0.3, max_held=2, hold_timeout_s=1.0)
    policy = {"min_replicas": 0, "max_replicas": 1, "idle_delay_s": 0.3, "cooldown_s": 0}
    async with autoscaled_router(tmp_path, program, autoscale=small) as router, \
            httpx.AsyncClient(timeout=30) as client:
        await deploy(client, router.url, 1, policy)
        await until(lambda: live(router) == 0, "scaled to zero")
        start_s["value"] = "3600"
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        first = [asyncio.create_task(client.post(f"{router.url}/v1/chat/completions", json=body)) for _ in range(2)]
        await until(lambda: router.app.state.router.demand.of(MODEL, "v1").held == 2, "two held")
        third = await client.post(f"{router.url}/v1/chat/completions", json=body)
        assert third.status_code == 429 and third.headers["retry-after"] == "2"
        assert "autoscale.max_held" in third.json()["error"]["message"]
        held = await asyncio.gather(*first)
        assert [r.status_code for r in held] == [503, 503] and all(r.headers.get("retry-after") for r in held)
        assert "autoscale.hold_timeout_s" in held[0].json()["error"]["message"]
        async with client.stream("POST", f"{router.url}/v1/chat/completions", json={**body, "stream": True}) as r:
            text = (await r.aread()).decode()
        assert r.status_code == 200 and '"code":"no_replica_ready"' in text.replace(" ", "") and "[DONE]" in text


async def test_a_scale_down_under_load_loses_no_stream(tmp_path: Path) -> None:
    def long_streams(spec: EngineSpec) -> SimEngineProgram:
        return SimEngineProgram(spec.model_name, spec.version, ttft_ms=10, itl_ms=40, replicas_per_core=8)

    policy = {"min_replicas": 1, "max_replicas": 2}
    async with autoscaled_router(tmp_path, long_streams) as router, httpx.AsyncClient(timeout=60) as client:
        await deploy(client, router.url, 2, policy)
        await until(lambda: ready(router) == 2, "two ready")
        streams = [asyncio.create_task(stream(client, router.url, f"u{i}", max_tokens=40)) for i in range(6)]
        await until(lambda: all(r.outstanding for r in router.backend.endpoints()), "both replicas busy")
        changed = await client.put(f"{router.url}/api/v1/deployments/{MODEL}/autoscaling",
                                   json={"min_replicas": 1, "max_replicas": 1})
        assert changed.status_code == 200, changed.text
        await until(lambda: live(router) == 1, "one replica left")
        outcomes = await asyncio.gather(*streams)
        assert all(status == 200 and "[DONE]" in text and '"error"' not in text for status, text in outcomes)
        view = changed.json()["versions"][0]
        assert view["policy"]["max_replicas"] == 1


async def test_bad_policies_are_400s_naming_the_field_and_change_nothing(tmp_path: Path) -> None:
    async with autoscaled_router(tmp_path) as router, httpx.AsyncClient(timeout=30) as client:
        await deploy(client, router.url, 1, {"max_replicas": 2})
        url = f"{router.url}/api/v1/deployments/{MODEL}/autoscaling"
        too_many = 2 * len(os.sched_getaffinity(0)) + 1  # slow_sim: two replicas a core
        cases = [
            ({"min_replicas": 3, "max_replicas": 2}, "autoscaling.min_replicas"),
            ({"max_replicas": -1}, "autoscaling.max_replicas"),
            ({"max_replicas": 1000}, "autoscaling.max_replicas"),
            ({"max_replicas": too_many}, "autoscaling.max_replicas"),
            ({"slo": {"ttft_ms": 0}}, "autoscaling.slo.ttft_ms"),
            ({"target_in_flight_per_replica": 0}, "autoscaling.target_in_flight_per_replica"),
            ({"mode": "maybe"}, "mode"),
            ({"min_replicas": "two"}, "min_replicas"),
        ]
        for body, field in cases:
            response = await client.put(url, json=body)
            assert response.status_code == 400, (body, response.text)
            error = response.json()["error"]
            assert error["param"] == field, (body, error)
        if too_many <= 64:
            response = await client.put(url, json={"max_replicas": too_many})
            assert "set it to at most" in response.json()["error"]["message"]
        missing = await client.put(url, json={"version": "v9", "max_replicas": 2})
        assert missing.status_code == 404
        view = (await client.get(url)).json()
        assert view["versions"][0]["policy"]["max_replicas"] == 2  # nothing changed
        deploy_bad = await client.post(f"{router.url}/api/v1/deployments", json={
            "model_name": MODEL, "version": "v2", "resources": {"replicas": 3},
            "autoscaling": {"min_replicas": 1, "max_replicas": 2}})
        assert deploy_bad.status_code == 400 and deploy_bad.json()["error"]["param"] == "resources.replicas"


async def test_advisory_mode_records_what_it_would_do_once_and_changes_nothing(tmp_path: Path) -> None:
    async with autoscaled_router(tmp_path) as router, httpx.AsyncClient(timeout=30) as client:
        await deploy(client, router.url, 1, {"max_replicas": 3})
        url = f"{router.url}/api/v1/deployments/{MODEL}/autoscaling"
        assert (await client.put(url, json={"mode": "advisory", "min_replicas": 2, "max_replicas": 3})
                ).status_code == 200

        async def advised() -> bool:
            view = (await client.get(url)).json()["versions"][0]
            return bool(view["decisions"])

        await until(advised, "an advisory decision")
        await asyncio.sleep(1.0)  # five more periods
        view = (await client.get(url)).json()["versions"][0]
        assert [(d["action"], d["from"], d["to"], d["rule"]) for d in view["decisions"]] == [
            ("autoscale_advice", 1, 2, "bounds")]
        assert view["desired_replicas"] == 1 and live(router) == 1
        assert view["latest"]["applied"] is False


async def test_two_routers_on_one_redis_one_decides_and_both_converge(tmp_path: Path) -> None:
    from router.store.redis_store import RedisStore
    from tests.redis_server import redis_server

    def settings() -> RouterSettings:
        return RouterSettings(port=free_port(), retry_after_s=2, admission=AdmissionSettings(enabled=False),
                              autoscale=FAST_LOOP)

    with redis_server() as redis_url:
        make_version(tmp_path / "a" / "models", "v1")
        async with (
            run_router([], tmp_path / "a", router_settings=settings(), store=RedisStore(redis_url, "as:"),
                       program_factory=slow_sim) as a,
            run_router([], tmp_path / "b", router_settings=settings(), store=RedisStore(redis_url, "as:"),
                       program_factory=slow_sim) as b,
            httpx.AsyncClient(timeout=30) as client,
        ):
            await deploy(client, a.url, 1, {"max_replicas": 3})
            await until(lambda: live(b) == 1, "router B runs v1 too")
            put = await client.put(f"{b.url}/api/v1/deployments/{MODEL}/autoscaling",
                                   json={"min_replicas": 2, "max_replicas": 3})
            assert put.status_code == 200
            await until(lambda: ready(a) == 2 and ready(b) == 2, "two replicas on each router")
            await asyncio.sleep(1.0)
            history = (await client.get(f"{a.url}/api/v1/deployments/{MODEL}")).json()["history"]
            changes = [h for h in history if h["action"] == "autoscale"]
            assert len(changes) == 1, changes  # one router decided, not one each
            assert changes[0]["detail"]["router"] in {a.app.state.router.control.leases.router_id,
                                                      b.app.state.router.control.leases.router_id}


async def test_a_client_that_leaves_while_held_frees_its_place(tmp_path: Path) -> None:
    start_s = {"value": "0"}

    def program(spec: EngineSpec) -> SimEngineProgram:
        return SimEngineProgram(spec.model_name, spec.version, extra_args=("--slow-start-s", start_s["value"]))

    policy = {"min_replicas": 0, "max_replicas": 1, "idle_delay_s": 0.3, "cooldown_s": 0}
    async with autoscaled_router(tmp_path, program) as router, httpx.AsyncClient(timeout=30) as client:
        await deploy(client, router.url, 1, policy)
        await until(lambda: live(router) == 0, "scaled to zero")
        start_s["value"] = "3600"
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True}
        async with client.stream("POST", f"{router.url}/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith(": waiting for a replica"):
                    break  # and leave
        counts = router.app.state.router.demand.of(MODEL, "v1")
        await until(lambda: counts.held == 0 and counts.interactive == 0, "the hold and the in-flight count freed")
        metrics = (await client.get(f"{router.url}/metrics")).text
        assert f'llmserve_requests_total{{model="{MODEL}",route="/v1/chat/completions",status="499",version="v1"}}' \
            in metrics
