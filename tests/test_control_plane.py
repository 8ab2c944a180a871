"""Deployments, traffic splits and rollback through the HTTP API, with simulated engines."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from llmserve.replicas.spec import EngineSpec
from llmserve.settings import AdmissionSettings, RouterSettings
from loadtest.sim import SimEngineProgram
from loadtest.simstack import sim_model_folder
from router.store import Store
from router.store.redis_store import RedisStore
from router.store.sqlite import SQLiteStore
from tests.conftest import RunningRouter, free_port, run_router
from tests.redis_server import redis_server

MODEL = "chat"


def sim_factory(spec: EngineSpec) -> SimEngineProgram:
    return SimEngineProgram(spec.model_name, spec.version, ttft_ms=5, itl_ms=5)


def make_version(models_dir: Path, version: str, model: str = MODEL) -> None:
    sim_model_folder(models_dir, model, version, "test")


@asynccontextmanager
async def control_router(
    tmp_path: Path, db: Path | None = None, redis_url: str | None = None
) -> AsyncIterator[RunningRouter]:
    store: Store = RedisStore(redis_url, "restart:") if redis_url else SQLiteStore(db or tmp_path / "llmserve.db")
    # the control plane under test, not load shedding: 200 users at once would saturate two replicas
    settings = RouterSettings(port=free_port(), retry_after_s=2, admission=AdmissionSettings(enabled=False))
    async with run_router([], tmp_path, router_settings=settings, store=store, program_factory=sim_factory) as router:
        yield router


async def wait_status(client: httpx.AsyncClient, url: str, version: str, status: str, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        state = (await client.get(f"{url}/api/v1/deployments/{MODEL}")).json()
        versions = {v["version"]: v for v in state["versions"] if v["status"] == status}
        if version in versions:
            return state
        if time.monotonic() > deadline:
            raise AssertionError(f"{version} never became {status}: {state}")
        await asyncio.sleep(0.05)


async def deploy(client: httpx.AsyncClient, url: str, version: str, percent: int, engine: dict | None = None) -> dict:
    response = await client.post(f"{url}/api/v1/deployments", json={
        "model_name": MODEL, "version": version, "traffic_percent": percent, "resources": {"replicas": 1},
        "engine": engine or {}})
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "deploying"
    state = await wait_status(client, url, version, "active")
    deadline = time.monotonic() + 10
    while percent and version not in state["split"] and time.monotonic() < deadline:
        # the split changes just after the status turns active
        await asyncio.sleep(0.02)
        state = (await client.get(f"{url}/api/v1/deployments/{MODEL}")).json()
    return state


async def setup_v1(client: httpx.AsyncClient, router: RunningRouter, tmp_path: Path) -> None:
    for version in ("v1", "v2", "v3"):
        make_version(tmp_path / "models", version)
    created = await client.post(f"{router.url}/api/v1/models", json={
        "model_name": MODEL, "description": "test", "framework": "vllm", "owner": "team"})
    assert created.status_code == 201
    await deploy(client, router.url, "v1", 100)


async def chat(client: httpx.AsyncClient, url: str, user: str | None = None, **extra: object) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, **extra}
    if user is not None:
        body["user"] = user
    return await client.post(f"{url}/v1/chat/completions", json=body)


async def test_deploy_a_canary_and_users_stick_to_their_version(tmp_path: Path) -> None:
    async with control_router(tmp_path) as router, httpx.AsyncClient(timeout=30) as client:
        await setup_v1(client, router, tmp_path)
        state = await deploy(client, router.url, "v2", 10)
        assert state["split"] == {"v1": 90, "v2": 10}
        users = [f"user-{i}" for i in range(200)]
        responses = await asyncio.gather(*(chat(client, router.url, u) for u in users))
        refused = [(r.status_code, r.text[:200]) for r in responses if r.status_code != 200]
        assert not refused, refused[:3]
        versions = [r.headers["x-model-version"] for r in responses]
        assert all(r.json()["model"] == f"{MODEL}:{v}" for r, v in zip(responses, versions, strict=True))
        assert 0.03 <= versions.count("v2") / len(users) <= 0.17
        again = [(await chat(client, router.url, u)).headers["x-model-version"] for u in users[:40]]
        assert again == versions[:40]
        # 10% -> 20%: nobody on v2 leaves it
        on_v2 = {u for u, v in zip(users, versions, strict=True) if v == "v2"}
        put = await client.put(f"{router.url}/api/v1/deployments/{MODEL}/traffic", json={"v1": 80, "v2": 20})
        assert put.status_code == 200 and put.json()["split"] == {"v1": 80, "v2": 20}
        after = {u: (await chat(client, router.url, u)).headers["x-model-version"] for u in on_v2}
        assert set(after.values()) <= {"v2"}
        # Every request is in the inference log, with the version that served it.
        store = router.app.state.router.control.store
        day = time.strftime("%Y%m%d", time.gmtime())
        deadline = time.monotonic() + 5
        logs = []
        while time.monotonic() < deadline:
            logs = [log for log in await store.inference_logs(day, MODEL) if log.user_bucket is not None]
            if len(logs) >= 240:
                break
            await asyncio.sleep(0.1)
        assert len(logs) >= 240
        assert {log.version for log in logs} == {"v1", "v2"}
        # non-streamed answers have no first-token time to observe
        assert all(log.status_code == 200 and log.output_tokens == 1 and log.latency_ms > 0 for log in logs)


async def test_rollback_is_instant_and_the_old_version_drains(tmp_path: Path) -> None:
    async with control_router(tmp_path) as router, httpx.AsyncClient(timeout=30) as client:
        await setup_v1(client, router, tmp_path)
        await deploy(client, router.url, "v2", 50)
        rollback = await client.post(f"{router.url}/api/v1/deployments/{MODEL}/rollback")
        assert rollback.status_code == 200, rollback.text
        body = rollback.json()
        assert body["from"] == "v2" and body["to"] == "v1"
        assert body["applied_in_ms"] < 1000
        responses = [await chat(client, router.url, f"u{i}") for i in range(30)]
        assert {r.headers["x-model-version"] for r in responses} == {"v1"}
        state = await wait_status(client, router.url, "v2", "retired")
        assert state["split"] == {"v1": 100}
        actions = [h["action"] for h in state["history"]]
        assert actions[-1] == "rollback" and "activate" in actions
        assert state["history"][-1]["actor"] == "api"


async def test_bad_control_requests(tmp_path: Path) -> None:
    async with control_router(tmp_path) as router, httpx.AsyncClient(timeout=30) as client:
        await setup_v1(client, router, tmp_path)
        url = router.url
        dup_model = await client.post(f"{url}/api/v1/models", json={"model_name": MODEL})
        assert dup_model.status_code == 409
        dup = await client.post(f"{url}/api/v1/deployments", json={"model_name": MODEL, "version": "v1"})
        assert dup.status_code == 409 and "already deployed" in dup.json()["error"]["message"]
        unknown = await client.post(f"{url}/api/v1/deployments", json={"model_name": "nope", "version": "v1"})
        assert unknown.status_code == 404
        for split, needle in [({"v1": 60, "v2": 30}, "v2"), ({"v1": 90}, "sum to 90"),
                              ({"v1": "100"}, "whole numbers: v1")]:
            response = await client.put(f"{url}/api/v1/deployments/{MODEL}/traffic", json=split)
            assert response.status_code == 400 and needle in response.json()["error"]["message"]
        missing = await client.put(f"{url}/api/v1/deployments/nope/traffic", json={"v1": 100})
        assert missing.status_code == 404
        busy = await client.delete(f"{url}/api/v1/deployments/{MODEL}/versions/v1")
        assert busy.status_code == 409 and "move its traffic first" in busy.json()["error"]["message"]
        nothing = await client.post(f"{url}/api/v1/deployments/{MODEL}/rollback")
        assert nothing.status_code == 409
        bad_to = await client.post(f"{url}/api/v1/deployments/{MODEL}/rollback", json={"to": "v9"})
        assert bad_to.status_code == 404
        bad_body = await client.post(f"{url}/api/v1/deployments", json={"model_name": MODEL, "version": "v4",
                                                                        "traffic_percent": 150})
        assert bad_body.status_code == 400 and bad_body.json()["error"]["param"] == "traffic_percent"
        # A version with no prepared folder fails with the reason; traffic is unchanged.
        failing = await client.post(f"{url}/api/v1/deployments", json={"model_name": MODEL, "version": "v9",
                                                                       "traffic_percent": 50})
        assert failing.status_code == 202
        state = await wait_status(client, url, "v9", "failed")
        reason = next(v["reason"] for v in state["versions"] if v["version"] == "v9")
        assert "manifest" in reason and "llmserve prepare" in reason
        assert state["split"] == {"v1": 100}


async def test_zero_downtime_deploy_shift_and_rollback_under_load(tmp_path: Path) -> None:
    async with control_router(tmp_path) as router, httpx.AsyncClient(timeout=30) as client:
        await setup_v1(client, router, tmp_path)
        failures: list[str] = []
        completed = 0
        stop = asyncio.Event()

        async def user(index: int) -> None:
            nonlocal completed
            while not stop.is_set():
                body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20,
                        "stream": True, "user": f"load-{index}-{completed}"}
                try:
                    async with client.stream("POST", f"{router.url}/v1/chat/completions", json=body) as r:
                        lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
                    if r.status_code != 200 or lines[-1] != "data: [DONE]" or any('"error"' in x for x in lines):
                        failures.append(f"{r.status_code}: {lines[-2:]}")
                    else:
                        completed += 1
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))

        users = [asyncio.create_task(user(i)) for i in range(6)]
        await asyncio.sleep(0.3)
        await deploy(client, router.url, "v2", 30)
        shift = await client.put(f"{router.url}/api/v1/deployments/{MODEL}/traffic", json={"v1": 20, "v2": 80})
        assert shift.status_code == 200
        await asyncio.sleep(0.3)
        assert (await client.post(f"{router.url}/api/v1/deployments/{MODEL}/rollback")).status_code == 200
        await wait_status(client, router.url, "v2", "retired")
        await asyncio.sleep(0.2)
        stop.set()
        await asyncio.gather(*users)
        assert failures == []
        assert completed > 20


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_state_survives_a_router_restart(tmp_path: Path, backend: str) -> None:
    db = tmp_path / "llmserve.db"
    with contextlib.ExitStack() as resources:
        redis_url = resources.enter_context(redis_server()) if backend == "redis" else None
        async with control_router(tmp_path, db, redis_url) as router, httpx.AsyncClient(timeout=30) as client:
            await setup_v1(client, router, tmp_path)
            await deploy(client, router.url, "v2", 25)
            before = (await client.get(f"{router.url}/api/v1/deployments/{MODEL}")).json()
        await restarted_router_has_the_same_state(tmp_path, db, redis_url, before)


async def restarted_router_has_the_same_state(
    tmp_path: Path, db: Path, redis_url: str | None, before: dict
) -> None:
    async with control_router(tmp_path, db, redis_url) as router, httpx.AsyncClient(timeout=30) as client:
        after = (await client.get(f"{router.url}/api/v1/deployments/{MODEL}")).json()
        assert after["split"] == before["split"] == {"v1": 75, "v2": 25}
        assert [h["action"] for h in after["history"]] == [h["action"] for h in before["history"]]
        await asyncio.gather(*(router.backend.supervisor.wait_ready(r) for r in router.backend.supervisor.replicas))
        served = {(await chat(client, router.url, f"u{i}")).headers["x-model-version"] for i in range(40)}
        assert served == {"v1", "v2"}


@pytest.mark.parametrize("split", [{"v1": 100}])
async def test_models_listing(tmp_path: Path, split: dict[str, int]) -> None:
    async with control_router(tmp_path) as router, httpx.AsyncClient(timeout=30) as client:
        await setup_v1(client, router, tmp_path)
        listing = (await client.get(f"{router.url}/api/v1/models")).json()["models"]
        assert [m["model_name"] for m in listing] == [MODEL] and listing[0]["owner"] == "team"
        one = (await client.get(f"{router.url}/api/v1/models/{MODEL}")).json()
        assert one["versions"] == ["v1"]
        assert (await client.get(f"{router.url}/api/v1/models/nope")).status_code == 404
        assert (await client.get(f"{router.url}/api/v1/deployments")).json()["deployments"][0]["split"] == split


async def test_two_routers_on_one_redis_share_the_control_plane(tmp_path: Path) -> None:
    with redis_server() as url:
        prefix = "two-routers:"
        async with (
            run_router([], tmp_path / "a", store=RedisStore(url, prefix), program_factory=sim_factory) as a,
            run_router([], tmp_path / "b", store=RedisStore(url, prefix), program_factory=sim_factory) as b,
            httpx.AsyncClient(timeout=30) as client,
        ):
            for version in ("v1", "v2"):
                make_version(tmp_path / "a" / "models", version)
            assert (await client.post(f"{a.url}/api/v1/models", json={"model_name": MODEL})).status_code == 201
            await deploy(client, a.url, "v1", 100)
            await deploy(client, a.url, "v2", 10)

            async def b_share(version: str) -> int:
                models = (await client.get(f"{b.url}/v1/models")).json()["data"]
                return next((m["versions"].get(version, -1) for m in models if m["id"] == MODEL), -1)

            deadline = time.monotonic() + 10
            while await b_share("v2") != 10 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert await b_share("v2") == 10

            changed_at = time.monotonic()
            put = await client.put(f"{a.url}/api/v1/deployments/{MODEL}/traffic", json={"v1": 40, "v2": 60})
            assert put.status_code == 200
            while await b_share("v2") != 60 and time.monotonic() - changed_at < 5:
                await asyncio.sleep(0.01)
            applied_after = time.monotonic() - changed_at
            assert await b_share("v2") == 60
            assert applied_after < 1.0, f"router B applied the change after {applied_after:.3f}s"
            # B runs its own replicas of both versions and serves them.
            await asyncio.gather(*(b.backend.supervisor.wait_ready(r) for r in b.backend.supervisor.replicas))
            served = {(await chat(client, b.url, f"u{i}")).headers["x-model-version"] for i in range(40)}
            assert served == {"v1", "v2"}


async def test_concurrent_conflicting_traffic_changes_one_wins_one_gets_409(tmp_path: Path) -> None:
    async with control_router(tmp_path) as router, httpx.AsyncClient(timeout=30) as client:
        await setup_v1(client, router, tmp_path)
        state = await deploy(client, router.url, "v2", 10)
        revision = str(state["revision"])
        url = f"{router.url}/api/v1/deployments/{MODEL}/traffic"
        first, second = await asyncio.gather(
            client.put(url, json={"v1": 50, "v2": 50}, headers={"If-Match": revision}),
            client.put(url, json={"v1": 0, "v2": 100}, headers={"If-Match": revision}),
        )
        assert sorted([first.status_code, second.status_code]) == [200, 409]
        loser = first if first.status_code == 409 else second
        assert "read it again" in loser.json()["error"]["message"]
        winner = first if first.status_code == 200 else second
        after = (await client.get(f"{router.url}/api/v1/deployments/{MODEL}")).json()
        assert after["split"] == winner.json()["split"] and after["revision"] == int(revision) + 1
        bad = await client.put(url, json={"v1": 100, "v2": 0}, headers={"If-Match": "abc"})
        assert bad.status_code == 400


async def test_blue_green_switches_at_once_and_retires_the_old_after_the_grace(tmp_path: Path) -> None:
    async with control_router(tmp_path) as router, httpx.AsyncClient(timeout=30) as client:
        await setup_v1(client, router, tmp_path)
        response = await client.post(f"{router.url}/api/v1/deployments", json={
            "model_name": MODEL, "version": "v2", "strategy": {"type": "blue_green", "grace_s": 1.0}})
        assert response.status_code == 202
        state = await wait_status(client, router.url, "v2", "active")
        deadline = time.monotonic() + 10
        while state["split"] != {"v2": 100} and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            state = (await client.get(f"{router.url}/api/v1/deployments/{MODEL}")).json()
        assert state["split"] == {"v2": 100}
        # during the grace period the old version is still ready: rollback is instant
        v1 = next(v for v in state["versions"] if v["version"] == "v1")
        assert v1["status"] == "active" and v1["ready_replicas"] == 1
        state = await wait_status(client, router.url, "v1", "retired")
        assert "blue_green_retire" in [h["action"] for h in state["history"]]
