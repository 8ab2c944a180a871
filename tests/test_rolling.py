"""The rolling strategy: replicas replaced one at a time, never below the desired ready count."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from llmserve.replicas.backend import EndpointState
from llmserve.replicas.spec import EngineSpec
from loadtest.sim import SimEngineProgram
from router.store.sqlite import SQLiteStore
from tests.conftest import RunningRouter, fast_engine_settings, run_router
from tests.test_control_plane import MODEL, chat, make_version, wait_status

REPLICAS = 3


@dataclass(frozen=True)
class FailsAfterMarker(SimEngineProgram):
    """A simulated engine that exits at start once ``marker`` exists: replica 2 of a rolling update fails."""

    marker: str = ""

    def command(self, host: str, port: int) -> list[str]:
        sim = " ".join(super().command(host, port))
        return ["sh", "-c", f"test -e {self.marker} && exit 3; exec {sim}"]


@contextlib.asynccontextmanager
async def rolling_router(tmp_path: Path, v2_program: SimEngineProgram | None = None,
                         ready_timeout_s: float = 30) -> AsyncIterator[RunningRouter]:
    def factory(spec: EngineSpec) -> SimEngineProgram:
        if spec.version == "v2" and v2_program is not None:
            return v2_program
        return SimEngineProgram(spec.model_name, spec.version, ttft_ms=5, itl_ms=5)

    for version in ("v1", "v2"):
        make_version(tmp_path / "models", version)
    async with run_router([], tmp_path, store=SQLiteStore(tmp_path / "db.sqlite"), program_factory=factory,
                          engine_settings=fast_engine_settings(ready_timeout_s=ready_timeout_s)) as router:
        yield router


async def start_v1(client: httpx.AsyncClient, url: str) -> None:
    assert (await client.post(f"{url}/api/v1/models", json={"model_name": MODEL})).status_code == 201
    created = await client.post(f"{url}/api/v1/deployments", json={
        "model_name": MODEL, "version": "v1", "traffic_percent": 100, "resources": {"replicas": REPLICAS}})
    assert created.status_code == 202
    await wait_status(client, url, "v1", "active")


async def roll_v2(client: httpx.AsyncClient, url: str) -> None:
    created = await client.post(f"{url}/api/v1/deployments", json={
        "model_name": MODEL, "version": "v2", "resources": {"replicas": REPLICAS},
        "strategy": {"type": "rolling"}})
    assert created.status_code == 202, created.text


def ready_count(router: RunningRouter) -> int:
    return sum(r.state is EndpointState.READY for r in router.backend.supervisor.replicas)


async def test_a_rolling_update_keeps_the_ready_count_and_loses_no_request(tmp_path: Path) -> None:
    async with rolling_router(tmp_path) as router, httpx.AsyncClient(timeout=30) as client:
        await start_v1(client, router.url)
        stop = asyncio.Event()
        results: list[tuple[int, str]] = []
        lowest_ready = [ready_count(router)]

        async def user(name: str) -> None:
            while not stop.is_set():
                response = await chat(client, router.url, name, stream=True, max_tokens=4)
                results.append((response.status_code, response.headers.get("x-model-version", "")))

        async def watch_ready() -> None:
            while not stop.is_set():
                lowest_ready[0] = min(lowest_ready[0], ready_count(router))
                await asyncio.sleep(0.005)

        tasks = [asyncio.create_task(user(f"user-{i}")) for i in range(6)]
        tasks.append(asyncio.create_task(watch_ready()))
        await roll_v2(client, router.url)
        state = await wait_status(client, router.url, "v1", "retired", timeout=60)
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*tasks)

        assert lowest_ready[0] >= REPLICAS
        assert state["split"] == {"v2": 100}
        steps = [h["detail"]["percent"] for h in state["history"] if h["action"] == "rolling_step"]
        assert steps == [33, 67, 100]
        assert [s for s, _ in results if s != 200] == []
        assert {v for _, v in results} == {"v1", "v2"}
        assert results[-1][1] == "v2"
        live = [r for r in router.backend.supervisor.replicas if r.state is not EndpointState.STOPPED]
        assert sorted(r.id for r in live) == [f"{MODEL}:v2/{i}" for i in range(REPLICAS)]


async def test_a_replica_that_fails_mid_roll_gives_the_old_version_everything_back(tmp_path: Path) -> None:
    marker = tmp_path / "fail-now"
    flaky = FailsAfterMarker(MODEL, "v2", ttft_ms=5, itl_ms=5, marker=str(marker))
    async with rolling_router(tmp_path, flaky, ready_timeout_s=4) as router, \
            httpx.AsyncClient(timeout=30) as client:
        await start_v1(client, router.url)
        await roll_v2(client, router.url)
        deadline = time.monotonic() + 30
        while (await client.get(f"{router.url}/api/v1/deployments/{MODEL}")).json()["split"].get("v2") != 33:
            assert time.monotonic() < deadline, "the first step never came"
            await asyncio.sleep(0.02)
        marker.touch()  # replica 2 of v2 now exits at start
        state = await wait_status(client, router.url, "v2", "failed", timeout=30)
        assert state["split"] == {"v1": 100}
        failed = next(v for v in state["versions"] if v["version"] == "v2")
        assert "replica 2 of 3 failed" in failed["reason"]
        deadline = time.monotonic() + 20
        while ready_count(router) < REPLICAS or any(
                r.version == "v2" and r.state is not EndpointState.STOPPED for r in router.backend.supervisor.replicas):
            assert time.monotonic() < deadline, "v1 never got its replicas back"
            await asyncio.sleep(0.05)
        answers = await asyncio.gather(*(chat(client, router.url, f"u{i}") for i in range(20)))
        assert {(a.status_code, a.headers["x-model-version"]) for a in answers} == {(200, "v1")}


async def test_a_rollback_during_a_rolling_update_restores_the_old_replicas(tmp_path: Path) -> None:
    slow = SimEngineProgram(MODEL, "v2", ttft_ms=5, itl_ms=5, extra_args=("--slow-start-s", "1.5"))
    async with rolling_router(tmp_path, slow) as router, httpx.AsyncClient(timeout=30) as client:
        await start_v1(client, router.url)
        await roll_v2(client, router.url)
        deadline = time.monotonic() + 30
        while (await client.get(f"{router.url}/api/v1/deployments/{MODEL}")).json()["split"].get("v2") != 33:
            assert time.monotonic() < deadline, "the first step never came"
            await asyncio.sleep(0.02)
        back = await client.post(f"{router.url}/api/v1/deployments/{MODEL}/rollback", json={})
        assert back.status_code == 200 and back.json()["to"] == "v1"
        await wait_status(client, router.url, "v2", "retired", timeout=30)
        deadline = time.monotonic() + 20
        while sum(r.version == "v1" and r.state is EndpointState.READY
                  for r in router.backend.supervisor.replicas) < REPLICAS:
            assert time.monotonic() < deadline, "v1 never got its replicas back"
            await asyncio.sleep(0.05)
        state = (await client.get(f"{router.url}/api/v1/deployments/{MODEL}")).json()
        assert state["split"] == {"v1": 100}
        assert "rolling_step" in [h["action"] for h in state["history"]]
