"""Canary rollouts end to end through the router, with simulated engines of chosen latency."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from llmserve.replicas.spec import EngineSpec
from loadtest.sim import SimEngineProgram
from router.store.sqlite import SQLiteStore
from tests.conftest import RunningRouter, run_router
from tests.test_control_plane import MODEL, deploy, make_version

STABLE_TTFT_MS = 30.0


def factory_for(canary_ttft_ms: float, canary_error_rate: float = 0.0):
    def factory(spec: EngineSpec) -> SimEngineProgram:
        slow = spec.version == "v2"
        args = ["--jitter-cv", "0.25", "--seed", "1" if slow else "2"]
        if slow and canary_error_rate:
            args += ["--error-rate", str(canary_error_rate)]
        return SimEngineProgram(spec.model_name, spec.version, ttft_ms=canary_ttft_ms if slow else STABLE_TTFT_MS,
                                itl_ms=2, extra_args=tuple(args))
    return factory


@contextlib.asynccontextmanager
async def stable_v1(tmp_path: Path, factory) -> AsyncIterator[tuple[RunningRouter, httpx.AsyncClient]]:
    """A router with versions v1 and v2 on disk and v1 deployed at 100%, and a client for it."""
    store = SQLiteStore(tmp_path / "db")
    for version in ("v1", "v2"):
        make_version(tmp_path / "models", version)
    async with run_router([], tmp_path, store=store, program_factory=factory) as r, \
            httpx.AsyncClient(timeout=30) as client:
        assert (await client.post(f"{r.url}/api/v1/models", json={"model_name": MODEL})).status_code == 201
        await deploy(client, r.url, "v1", 100)
        yield r, client


async def canary_run(tmp_path: Path, canary_ttft_ms: float, error_rate: float = 0.0) -> tuple[dict, list[str], int]:
    async with stable_v1(tmp_path, factory_for(canary_ttft_ms, error_rate)) as (r, client):
        failures: list[str] = []
        sent = 0
        stop = asyncio.Event()

        async def user(seed: int) -> None:
            nonlocal sent
            rng = random.Random(seed)
            while not stop.is_set():
                body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                        "stream": True, "user": f"u{rng.randrange(10_000)}"}
                async with client.stream("POST", f"{r.url}/v1/chat/completions", json=body) as response:
                    lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
                sent += 1
                if response.status_code != 200 or any('"error"' in line for line in lines):
                    failures.append(f"{response.status_code} {response.headers.get('x-model-version')}")

        users = [asyncio.create_task(user(i)) for i in range(8)]
        response = await client.post(f"{r.url}/api/v1/deployments", json={
            "model_name": MODEL, "version": "v2", "traffic_percent": 0,
            "strategy": {"type": "canary", "steps": [10, 50, 100], "bake_s": 0.3, "min_samples": 30}})
        assert response.status_code == 202, response.text
        deadline = time.monotonic() + 90
        canary: dict = {}
        while time.monotonic() < deadline:
            got = await client.get(f"{r.url}/api/v1/deployments/{MODEL}/canary")
            if got.status_code == 200:
                canary = got.json()
                if canary["status"] != "running":
                    break
            await asyncio.sleep(0.1)
        stop.set()
        await asyncio.gather(*users)
        state = (await client.get(f"{r.url}/api/v1/deployments/{MODEL}")).json()
        return {"canary": canary, "state": state}, failures, sent


async def test_a_20_percent_slower_canary_is_rolled_back_before_the_50_percent_step(tmp_path: Path) -> None:
    result, failures, _ = await canary_run(tmp_path, STABLE_TTFT_MS * 1.2)
    canary = result["canary"]
    assert canary["status"] == "rolled_back" and canary["step_percent"] == 10
    decision = canary["decisions"][-1]
    assert decision["decision"] == "rollback" and decision["p_slower"] < decision["threshold"]
    assert decision["canary_samples"] >= 30 and decision["ttft_p50_ratio"] > 1.1
    assert result["state"]["split"] == {"v1": 100}
    actions = [h["action"] for h in result["state"]["history"]]
    assert "canary_rollback" in actions and actions[-1] in ("rollback", "canary_rollback")
    assert failures == []


async def test_a_canary_as_fast_as_stable_is_promoted_to_100(tmp_path: Path) -> None:
    result, failures, sent = await canary_run(tmp_path, STABLE_TTFT_MS)
    assert result["canary"]["status"] == "promoted", result["canary"]["latest_analysis"]
    assert result["state"]["split"] == {"v2": 100}
    assert [d["decision"] for d in result["canary"]["decisions"]] == ["promote", "promote"]
    assert failures == [] and sent > 50


@pytest.mark.parametrize("error_rate", [0.05])
async def test_a_canary_with_errors_is_rolled_back(tmp_path: Path, error_rate: float) -> None:
    result, failures, _ = await canary_run(tmp_path, STABLE_TTFT_MS, error_rate)
    assert result["canary"]["status"] == "rolled_back"
    assert "error rate" in result["canary"]["decisions"][-1]["reason"]
    assert result["state"]["split"] == {"v1": 100}
    assert all(f.endswith("v2") for f in failures)  # only the canary's own errors reached users


async def test_manual_pause_resume_promote_and_abort(tmp_path: Path) -> None:
    async with stable_v1(tmp_path, factory_for(STABLE_TTFT_MS)) as (r, client):
        response = await client.post(f"{r.url}/api/v1/deployments", json={
            "model_name": MODEL, "version": "v2",
            "strategy": {"type": "canary", "steps": [10, 50, 100], "bake_s": 60, "min_samples": 30}})
        assert response.status_code == 202
        base = f"{r.url}/api/v1/deployments/{MODEL}"

        async def canary_state(predicate, timeout: float = 20) -> dict:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                got = await client.get(f"{base}/canary")
                if got.status_code == 200 and predicate(got.json()):
                    return got.json()
                await asyncio.sleep(0.05)
            raise AssertionError("the canary never got there")

        await canary_state(lambda c: c["step_percent"] == 10)
        assert (await client.post(f"{base}/canary/pause")).json()["status"] == "paused"
        assert (await client.post(f"{base}/canary/resume")).json()["status"] == "running"
        await client.post(f"{base}/canary/promote")
        await canary_state(lambda c: c["step_percent"] == 50)
        assert (await client.get(base)).json()["split"] == {"v1": 50, "v2": 50}
        await client.post(f"{base}/canary/abort")
        done = await canary_state(lambda c: c["status"] == "aborted")
        assert [d["decision"] for d in done["decisions"]] == ["promote", "abort"]
        assert (await client.get(base)).json()["split"] == {"v1": 100}
        late = await client.post(f"{base}/canary/resume")
        assert late.status_code == 409
        assert (await client.post(f"{base}/canary/explode")).status_code in (400, 409)


async def test_a_canary_that_gets_no_traffic_is_rolled_back_after_max_step_s(tmp_path: Path) -> None:
    async with stable_v1(tmp_path, factory_for(STABLE_TTFT_MS)) as (r, client):
        bad = await client.post(f"{r.url}/api/v1/deployments", json={
            "model_name": MODEL, "version": "v2", "traffic_percent": 0,
            "strategy": {"type": "canary", "bake_s": 5, "max_step_s": 1}})
        assert bad.status_code == 400 and "max_step_s" in bad.json()["error"]["message"]
        response = await client.post(f"{r.url}/api/v1/deployments", json={
            "model_name": MODEL, "version": "v2", "traffic_percent": 0,
            "strategy": {"type": "canary", "steps": [10, 100], "bake_s": 0.2, "min_samples": 30, "max_step_s": 1.5}})
        assert response.status_code == 202, response.text
        deadline = time.monotonic() + 60
        canary: dict = {}
        while time.monotonic() < deadline:
            got = await client.get(f"{r.url}/api/v1/deployments/{MODEL}/canary")
            if got.status_code == 200 and (canary := got.json())["status"] != "running":
                break
            await asyncio.sleep(0.1)
        assert canary["status"] == "rolled_back", canary
        assert "undecided after 1.5 s" in canary["decisions"][-1]["reason"]
        state = (await client.get(f"{r.url}/api/v1/deployments/{MODEL}")).json()
        assert state["split"] == {"v1": 100}
