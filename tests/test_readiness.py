"""/readyz: one model's trouble never takes the router out of rotation; each model's status is in the body."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx

from llmserve.replicas.backend import Endpoint, EndpointState
from llmserve.settings import RouterSettings
from loadtest.sim import SimEngineProgram
from loadtest.simstack import StaticVersion
from router.store.sqlite import SQLiteStore
from router.traffic.catalog import Catalog, ServedVersion
from router.traffic.readiness import ModelStatus, readiness
from tests.conftest import ScriptProgram, free_port, run_router
from tests.test_control_plane import MODEL, make_version, wait_status

SERVING = StaticVersion(SimEngineProgram("demo", "v1", ttft_ms=5, itl_ms=2))
CRASHING = StaticVersion(ScriptProgram("import sys; sys.exit(3)", model_name="crashy"))


def endpoint(model: str, state: EndpointState, ever_ready: bool = False, restarts: int = 0) -> Endpoint:
    return Endpoint(f"{model}:v1/0", model, "v1", state=state, ever_ready=ever_ready, restarts=restarts)


def catalog_with(*versions: ServedVersion) -> Catalog:
    catalog = Catalog()
    for served in versions:
        catalog.add_version(served)
    return catalog


def test_the_startup_rule_waits_only_for_first_starts_and_ignores_models_without_traffic() -> None:
    loading = ServedVersion("a", "v1", 2048, replicas=[endpoint("a", EndpointState.STARTING)])
    catalog = catalog_with(loading)
    catalog.set_split("registered-only", {})
    first = readiness(catalog, "startup", was_ready=False)
    assert not first.ready and first.waiting_for == ["a"]
    assert first.models == {"a": ModelStatus.STARTING, "registered-only": ModelStatus.NO_TRAFFIC}
    loading.replicas[0].restarts = 1  # its first start failed: settled, and unavailable
    assert readiness(catalog, "startup", was_ready=False).ready
    assert readiness(catalog, "serving", was_ready=True).ready is False


def test_a_first_deploy_in_progress_holds_a_new_router_back_but_not_one_that_was_ready() -> None:
    catalog = Catalog()
    catalog.set_split("fresh", {})  # registered; its first deploy has not launched anything yet
    starting = readiness(catalog, "startup", was_ready=False, deploying={"fresh"})
    assert not starting.ready and starting.waiting_for == ["fresh"]
    assert readiness(catalog, "startup", was_ready=True, deploying={"fresh"}).ready
    assert readiness(catalog, "startup", was_ready=False, deploying=()).ready


def test_a_model_that_crashed_after_serving_is_unavailable_but_the_router_stays_ready() -> None:
    crashed = ServedVersion("a", "v1", 2048, replicas=[endpoint("a", EndpointState.RESTARTING, ever_ready=True)])
    ok = ServedVersion("b", "v1", 2048, replicas=[endpoint("b", EndpointState.READY, ever_ready=True)])
    result = readiness(catalog_with(crashed, ok), "startup", was_ready=False)
    assert result.ready and result.models == {"a": ModelStatus.UNAVAILABLE, "b": ModelStatus.SERVING}
    assert result.ready_replicas == {"a": 0, "b": 1}


def test_a_version_at_zero_percent_or_scaled_to_zero_never_counts() -> None:
    v1 = ServedVersion("a", "v1", 2048, replicas=[endpoint("a", EndpointState.READY, ever_ready=True)])
    v2 = ServedVersion("a", "v2", 2048, replicas=[Endpoint("a:v2/0", "a", "v2")])  # loading, at 0%
    scaled = ServedVersion("z", "v1", 2048, replicas=[])  # no replicas wanted
    catalog = catalog_with(v1, v2, scaled)
    catalog.set_split("a", {"v1": 100, "v2": 0})
    result = readiness(catalog, "serving", was_ready=False)
    assert result.ready and result.models == {"a": ModelStatus.SERVING, "z": ModelStatus.NO_TRAFFIC}


async def test_a_registered_but_undeployed_model_leaves_the_router_ready_even_after_a_restart(tmp_path: Path) -> None:
    db = tmp_path / "db.sqlite"
    async with run_router([SERVING], tmp_path / "a", store=SQLiteStore(db)) as router, \
            httpx.AsyncClient(base_url=router.url, timeout=30) as client:
        created = await client.post("/api/v1/models", json={"model_name": "m", "framework": "xgboost"})
        assert created.status_code == 201
        deadline = time.monotonic() + 10
        while True:  # until the router has reconciled the new model from the store
            ready = await client.get("/readyz")
            assert ready.status_code == 200, ready.text
            if "m" in ready.json()["models"] or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        assert ready.json()["models"] == {"demo": "serving", "m": "no_traffic"}
    async with run_router([SERVING], tmp_path / "b", store=SQLiteStore(db)) as router, \
            httpx.AsyncClient(base_url=router.url, timeout=30) as client:
        ready = await client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["models"]["m"] == "no_traffic"


async def test_a_failed_deployment_leaves_the_router_ready(tmp_path: Path) -> None:
    async with run_router([SERVING], tmp_path, store=SQLiteStore(tmp_path / "db")) as router, \
            httpx.AsyncClient(base_url=router.url, timeout=30) as client:
        assert (await client.post("/api/v1/models", json={"model_name": MODEL})).status_code == 201
        # v1 was never prepared: the deployment fails with the reason
        created = await client.post("/api/v1/deployments", json={"model_name": MODEL, "version": "v1",
                                                                  "traffic_percent": 100})
        assert created.status_code == 202
        failed = await wait_status(client, router.url, "v1", "failed")
        assert "prepare" in failed["versions"][0]["reason"]
        ready = await client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["models"][MODEL] == "no_traffic"


async def test_a_crash_looping_model_leaves_the_router_ready_and_is_named_unavailable(tmp_path: Path) -> None:
    async with run_router([SERVING, CRASHING], tmp_path, wait_ready=False) as router, \
            httpx.AsyncClient(base_url=router.url, timeout=30) as client:
        await router.backend.wait_ready([e for e in router.backend.endpoints() if e.model_name == "demo"])
        deadline = time.monotonic() + 20
        while (ready := await client.get("/readyz")).status_code != 200 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)  # until the crashing replica's first start has failed
        assert ready.status_code == 200, ready.text
        assert ready.json()["models"] == {"demo": "serving", "crashy": "unavailable"}
        chat = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert (await client.post("/v1/chat/completions", json=chat)).status_code == 200


async def test_a_replica_killed_after_serving_keeps_the_router_ready_while_it_restarts(tmp_path: Path) -> None:
    async with run_router([SERVING], tmp_path) as router, \
            httpx.AsyncClient(base_url=router.url, timeout=30) as client:
        assert (await client.get("/readyz")).status_code == 200
        replica = router.backend.supervisor.replicas[0]
        os.killpg(replica.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while replica.state is EndpointState.READY and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        ready = await client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["models"]["demo"] == "unavailable"
        await router.backend.supervisor.wait_ready(replica, timeout=20)
        assert (await client.get("/readyz")).json()["models"]["demo"] == "serving"


async def test_the_serving_rule_takes_the_router_out_while_a_model_cannot_answer(tmp_path: Path) -> None:
    settings = RouterSettings(port=free_port(), retry_after_s=2, readiness="serving")
    async with run_router([SERVING, CRASHING], tmp_path, router_settings=settings, wait_ready=False) as router, \
            httpx.AsyncClient(base_url=router.url, timeout=30) as client:
        await router.backend.wait_ready([e for e in router.backend.endpoints() if e.model_name == "demo"])
        ready = await client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["waiting_for"] == ["crashy"]
        assert ready.headers["retry-after"] == "2"


async def test_first_start_of_a_deployed_model_holds_readiness_until_it_serves(tmp_path: Path) -> None:
    make_version(tmp_path / "models", "v1")
    async with run_router([], tmp_path, store=SQLiteStore(tmp_path / "db")) as router, \
            httpx.AsyncClient(base_url=router.url, timeout=30) as client:
        assert (await client.post("/api/v1/models", json={"model_name": MODEL})).status_code == 201
        await client.post("/api/v1/deployments", json={"model_name": MODEL, "version": "v1", "traffic_percent": 100})
        await wait_status(client, router.url, "v1", "active")
        ready = await client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["models"] == {MODEL: "serving"}
