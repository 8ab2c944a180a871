"""Predict versions scale their batcher's threads: the batcher resizes live, the autoscaler drives it."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from llmserve.settings import AutoscaleSettings, RouterSettings
from router.predict.batcher import BatchingConfig, DynamicBatcher
from router.store.sqlite import SQLiteStore
from tests.conftest import free_port, run_router
from tests.test_autoscaler import until
from tests.test_predict_api import XGB, deploy, features


class SlowRuntime:
    """Each batch takes 50 ms of a thread; counts how many run at once."""

    def __init__(self) -> None:
        self.running = 0
        self.most = 0
        self._lock = threading.Lock()

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(0.05)
        with self._lock:
            self.running -= 1
        return {"y": inputs["x"]}


async def load(batcher: DynamicBatcher, requests: int) -> None:
    # one row a request and no batching: each request is its own batch, so concurrency shows
    await asyncio.gather(*(batcher.submit({"x": np.zeros((1, 1), np.float32)}) for _ in range(requests)))


async def test_a_batcher_resizes_up_at_once_and_down_as_batches_finish() -> None:
    runtime = SlowRuntime()
    batcher = DynamicBatcher(runtime, BatchingConfig(enabled=False, instances=1))
    await load(batcher, 6)
    assert runtime.most == 1
    batcher.resize(3)
    runtime.most = 0
    await load(batcher, 9)
    assert runtime.most == 3 and batcher.instances == 3
    batcher.resize(1)
    runtime.most = 0
    await load(batcher, 6)
    assert runtime.most == 1
    batcher.resize(2)  # the permits a resize down withheld come back
    runtime.most = 0
    await load(batcher, 6)
    assert runtime.most == 2
    busy = batcher.busy_s
    assert busy >= 0.05 * 27 * 0.9  # every batch's model time counted
    await batcher.close()


async def test_a_predict_version_scales_its_threads_with_the_load(tmp_path: Path, example_models: Path) -> None:
    repo = tmp_path / "models"
    shutil.copytree(example_models / XGB, repo / XGB)
    settings = RouterSettings(port=free_port(), autoscale=AutoscaleSettings(interval_s=0.2, window_s=5))
    policy = {"min_replicas": 1, "max_replicas": 2, "target_in_flight_per_replica": 1, "up_delay_s": 0.3,
              "down_delay_s": 1.0, "cooldown_s": 0.3}
    async with run_router([], tmp_path, router_settings=settings, store=SQLiteStore(tmp_path / "db")) as router, \
            httpx.AsyncClient(base_url=router.url, timeout=30) as client:
        framework = json.loads((repo / XGB / "v1" / "manifest.json").read_text())["framework"]
        assert (await client.post("/api/v1/models", json={"model_name": XGB, "framework": framework})
                ).status_code == 201
        await deploy(client, XGB, "v1", 100, autoscaling=policy)
        control = router.app.state.router.control
        batcher = control.versions.get((XGB, "v1")).predictor.batcher
        assert batcher.instances == 1
        stop = asyncio.Event()
        statuses: list[int] = []

        async def user() -> None:
            rows = [{"features": r} for r in features(64)]
            while not stop.is_set():
                statuses.append((await client.post(f"/api/v1/models/{XGB}/predict", json={"inputs": rows}))
                                .status_code)

        users = [asyncio.create_task(user()) for _ in range(8)]
        await until(lambda: batcher.instances == 2, "two batcher threads", timeout=20)
        stop.set()
        await asyncio.gather(*users)
        await until(lambda: batcher.instances == 1, "back to one thread", timeout=20)
        assert statuses and set(statuses) == {200}
        view = (await client.get(f"/api/v1/deployments/{XGB}/autoscaling")).json()
        moves = [(d["from"], d["to"]) for d in view["versions"][0]["decisions"]]
        assert moves[0] == (1, 2) and moves[-1] == (2, 1), moves
        cores = len(os.sched_getaffinity(0))
        too_many = await client.put(f"/api/v1/deployments/{XGB}/autoscaling", json={"max_replicas": cores + 1})
        assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "autoscaling.max_replicas"
        assert f"CPU budget of {XGB}:v1's router: {cores} cores" in too_many.json()["error"]["message"]
        to_zero = await client.put(f"/api/v1/deployments/{XGB}/autoscaling", json={"min_replicas": 0})
        assert to_zero.status_code == 400 and to_zero.json()["error"]["param"] == "autoscaling.min_replicas"


async def test_without_a_policy_a_predict_version_keeps_its_batching_instances(tmp_path: Path,
                                                                                example_models: Path) -> None:
    repo = tmp_path / "models"
    shutil.copytree(example_models / XGB, repo / XGB)
    async with run_router([], tmp_path, store=SQLiteStore(tmp_path / "db")) as router, \
            httpx.AsyncClient(base_url=router.url, timeout=30) as client:
        framework = json.loads((repo / XGB / "v1" / "manifest.json").read_text())["framework"]
        assert (await client.post("/api/v1/models", json={"model_name": XGB, "framework": framework})
                ).status_code == 201
        await deploy(client, XGB, "v1", 100, batching={"instances": 2})
        assert (await client.put(f"/api/v1/deployments/{XGB}/traffic", json={"v1": 100})).status_code == 200
        await asyncio.sleep(0.3)  # the reconciles that follow each change have run
        batcher = router.app.state.router.control.versions.get((XGB, "v1")).predictor.batcher
        assert batcher.instances == 2
