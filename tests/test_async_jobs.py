"""Async requests: 202 and a job for /predict and /generate, the job's status and result, who may read it,
callbacks (to loopback only), retention, failures; the runner's bounds with fakes and an injected clock."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, closing
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from llmserve.jobs_settings import JobsSettings
from llmserve.settings import AuthSettings, RouterSettings
from loadtest.sim import SimEngineProgram
from loadtest.simstack import StaticVersion
from router.errors import ShedLoad
from router.jobs.callback import check_callback_url
from router.jobs.durable import StoreJobStore
from router.jobs.errors import CallbackNotAllowed, TooManyJobs
from router.jobs.models import Job, Outcome
from router.jobs.runner import JobRunner
from router.store.sqlite import SQLiteStore
from tests.conftest import RunningRouter, free_port, run_router
from tests.test_auth import ADMIN, bearer, create_key
from tests.test_predict_api import XGB, deploy, features

ASYNC = {"prefer": "respond-async"}


@asynccontextmanager
async def jobs_router(tmp_path: Path, example_models: Path, jobs: JobsSettings | None = None
                      ) -> AsyncIterator[tuple[RunningRouter, httpx.AsyncClient, str]]:
    """Authentication on; the simulated chat model, a simulated ``broken`` one whose engine breaks every
    stream after two tokens (as a crash would), and the XGBoost fraud model; the client and an inference
    key's secret."""
    shutil.copytree(example_models / XGB, tmp_path / "models" / XGB)
    settings = RouterSettings(port=free_port(), retry_after_s=2, jobs=jobs or JobsSettings(),
                              auth=AuthSettings(enabled=True, admin_key=SecretStr(ADMIN)))
    versions = [StaticVersion(SimEngineProgram("chat", "v1", ttft_ms=2, itl_ms=1)),
                StaticVersion(SimEngineProgram("broken", "v1", ttft_ms=2, itl_ms=1,
                                               extra_args=("--drop-rate", "1.0", "--drop-after-tokens", "2")))]
    async with run_router(versions, tmp_path, router_settings=settings, store=SQLiteStore(tmp_path / "db")) as router, \
            httpx.AsyncClient(base_url=router.url, timeout=30) as client:
        async with httpx.AsyncClient(base_url=router.url, timeout=30, headers=bearer(ADMIN)) as admin:
            assert (await admin.post("/api/v1/models", json={"model_name": XGB, "framework": "xgboost"})
                    ).status_code == 201
            await deploy(admin, XGB, "v1", 100)
        key = (await create_key(client, name="app", scopes=["inference"]))["key"]
        yield router, client, key


async def settled(client: httpx.AsyncClient, accepted: httpx.Response, key: str, timeout_s: float = 20) -> dict:
    """Poll an accepted job's status URL until it has finished."""
    assert accepted.status_code == 202, accepted.text
    url = accepted.json()["status_url"]
    assert accepted.headers["location"] == url
    deadline = time.monotonic() + timeout_s
    while True:
        response = await client.get(url, headers=bearer(key))
        assert response.status_code == 200, response.text
        job = response.json()
        if job["status"] not in ("queued", "running"):
            return job
        assert time.monotonic() < deadline, job
        await asyncio.sleep(0.02)


def jobs_of(router: RunningRouter) -> StoreJobStore:
    """The router's jobs: in its store (a router with a store keeps them there, not in memory)."""
    store = router.app.state.router.jobs.store
    assert isinstance(store, StoreJobStore)
    return store


def stored_jobs(router: RunningRouter) -> int:
    """How many jobs the router's SQLite file holds."""
    store = jobs_of(router).store
    assert isinstance(store, SQLiteStore)
    with closing(sqlite3.connect(store.path)) as db:
        return int(db.execute("SELECT count(*) FROM jobs").fetchone()[0])


async def test_jobs_answer_what_the_synchronous_calls_answer(tmp_path: Path, example_models: Path) -> None:
    async with jobs_router(tmp_path, example_models) as (router, client, key):
        auth = bearer(key)
        predict = {"inputs": [{"features": row} for row in features(3)]}
        sync = await client.post(f"/api/v1/models/{XGB}/predict", json=predict, headers=auth)
        assert sync.status_code == 200, sync.text
        by_header = await client.post(f"/api/v1/models/{XGB}/predict", json=predict, headers={**auth, **ASYNC})
        accepted = by_header.json()
        assert accepted["status"] == "queued" and accepted["kind"] == "predict" and accepted["id"].startswith("job_")
        assert accepted["status_url"] == f"/api/v1/jobs/{accepted['id']}" and accepted["result"] is None
        assert by_header.headers["preference-applied"] == "respond-async"
        job = await settled(client, by_header, key)
        assert job["status"] == "succeeded" and job["status_code"] == 200 and job["error"] is None
        assert job["finished_at"] >= job["started_at"] >= job["created_at"]
        assert job["expires_at"] == pytest.approx(job["finished_at"] + 3600)
        # the body the sync call answers, its request id being the job's
        assert job["result"] == {**sync.json(), "id": job["request_id"]}

        by_params = await client.post(f"/api/v1/models/{XGB}/predict", headers=auth,
                                      json={**predict, "params": {"async": True}})
        assert (await settled(client, by_params, key))["result"]["predictions"] == sync.json()["predictions"]

        generate = {"prompt": "hello", "max_tokens": 5}
        sync_text = await client.post("/api/v1/models/chat/generate", json=generate, headers=auth)
        assert sync_text.status_code == 200, sync_text.text
        for request, headers in (({**generate, "params": {"async": True}}, auth), (generate, {**auth, **ASYNC})):
            accepted_text = await client.post("/api/v1/models/chat/generate", json=request, headers=headers)
            text_job = await settled(client, accepted_text, key)
            assert text_job["status"] == "succeeded", text_job
            result = text_job["result"]
            assert result["text"] == sync_text.json()["text"] and result["usage"]["completion_tokens"] == 5
            assert {k: v for k, v in result.items() if k not in ("id", "request_id")} == \
                {k: v for k, v in sync_text.json().items() if k not in ("id", "request_id")}
            assert result["request_id"] == text_job["request_id"]
        # the jobs ran in the batch band: admission counted them as batch
        metrics = (await client.get("/metrics")).text
        assert 'llmserve_admission_total{model="chat",outcome="full",priority="batch"}' in metrics
        assert stored_jobs(router) == 4 and router.app.state.router.jobs.pending == 0


async def test_bad_async_requests_are_refused_at_once_and_jobs_are_private(tmp_path: Path, example_models: Path
                                                                           ) -> None:
    async with jobs_router(tmp_path, example_models) as (router, client, key):
        auth = bearer(key)
        predict = f"/api/v1/models/{XGB}/predict"
        generate = "/api/v1/models/chat/generate"
        bad = [(predict, {"inputs": [{"features": [0.0] * 8}]}, 400),  # 8 features where the model takes 30
               (predict, {"inputs": []}, 400),
               ("/api/v1/models/nope/predict", {"inputs": [{"features": features(1)[0]}]}, 404),
               (generate, {"prompt": "x", "max_tokens": "5"}, 400),
               (generate, {"prompt": "x", "max_tokens": 100_000}, 400),
               (generate, {"prompt": "x", "params": {"version": "v7"}}, 404),
               ("/api/v1/models/nope/generate", {"prompt": "x"}, 404)]
        for path, body, status in bad:
            sync = await client.post(path, json=body, headers=auth)
            later = await client.post(path, json=body, headers={**auth, **ASYNC})
            assert sync.status_code == later.status_code == status, (path, body, later.text)
            assert later.json()["error"]["code"] == sync.json()["error"]["code"]
            assert later.json()["error"]["param"] == sync.json()["error"]["param"]
        streamed = await client.post(generate, json={"prompt": "x", "stream": True}, headers={**auth, **ASYNC})
        assert streamed.status_code == 400 and streamed.json()["error"]["param"] == "stream"
        not_a_flag = await client.post(generate, json={"prompt": "x", "params": {"async": "yes"}}, headers=auth)
        assert not_a_flag.status_code == 400 and not_a_flag.json()["error"]["param"] == "params.async"
        # hosts off the list that stay on this machine: were the check broken, no packet would leave it
        off_list = await client.post(generate, headers=auth, json={
            "prompt": "x", "params": {"async": True, "callback_url": "http://0.0.0.0:9/hook"}})
        assert off_list.status_code == 400, off_list.text
        error = off_list.json()["error"]
        assert error["code"] == "callback_not_allowed" and error["param"] == "callback_url"
        assert "LLMSERVE_ROUTER__JOBS__CALLBACK_HOSTS" in error["message"] and "127.0.0.1" in error["message"]
        by_header = await client.post(predict, json={"inputs": [{"features": features(1)[0]}]},
                                      headers={**auth, **ASYNC, "x-callback-url": "http://127.0.0.2:9/x"})
        assert by_header.status_code == 400 and by_header.json()["error"]["code"] == "callback_not_allowed"
        sync_callback = await client.post(generate, headers=auth, json={
            "prompt": "x", "params": {"callback_url": "http://127.0.0.1:9/hook"}})
        assert sync_callback.status_code == 400 and "async" in sync_callback.json()["error"]["message"]
        assert stored_jobs(router) == 0  # no job for any refused request

        missing = await client.get("/api/v1/jobs/job_nope", headers=auth)
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "job_not_found"
        accepted = await client.post(generate, json={"prompt": "x", "max_tokens": 2}, headers={**auth, **ASYNC})
        job = await settled(client, accepted, key)
        other = (await create_key(client, name="other", scopes=["inference"]))["key"]
        hidden = await client.get(job["status_url"], headers=bearer(other))
        assert hidden.status_code == 404 and hidden.json() == {**missing.json(), "error": {
            **missing.json()["error"], "message": missing.json()["error"]["message"].replace("job_nope", job["id"])}}
        assert (await client.get(job["status_url"])).status_code == 401
        reader = (await create_key(client, name="dash", scopes=["read"]))["key"]
        assert (await client.get(job["status_url"], headers=bearer(reader))).status_code == 403
        assert (await client.get(job["status_url"], headers=bearer(ADMIN))).json()["status"] == "succeeded"


class Receiver:
    """A loopback HTTP server that records each request's JSON body; answers ``statuses`` in turn, then 200."""

    def __init__(self, statuses: tuple[int, ...] = ()) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self._statuses = list(statuses)
        self.got = asyncio.Event()
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Receiver:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head.split("\r\n")[1:])
                   if k}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        status = self._statuses.pop(0) if self._statuses else 200
        self.headers.append(headers)
        self.bodies.append(json.loads(body))
        writer.write(f"HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".encode())
        await writer.drain()
        writer.close()
        if status == 200:
            self.got.set()


async def test_the_callback_gets_the_final_job_and_is_retried(tmp_path: Path, example_models: Path) -> None:
    jobs = JobsSettings(callback_backoff_s=0.01, callback_attempts=3)
    async with jobs_router(tmp_path, example_models, jobs) as (_, client, key), Receiver(statuses=(500,)) as hook:
        accepted = await client.post("/api/v1/models/chat/generate", headers=bearer(key), json={
            "prompt": "hi", "max_tokens": 3, "params": {"async": True,
                                                       "callback_url": f"http://127.0.0.1:{hook.port}/done"}})
        assert accepted.json()["callback_status"] == "pending"
        await asyncio.wait_for(hook.got.wait(), 20)
        assert len(hook.bodies) == 2  # a 500 is tried again
        delivered = hook.bodies[-1]
        assert delivered["id"] == accepted.json()["id"] and delivered["status"] == "succeeded"
        assert delivered["result"]["usage"]["completion_tokens"] == 3
        assert hook.headers[-1]["x-llmserve-job"] == delivered["id"]
        deadline = time.monotonic() + 5
        while (job := (await client.get(delivered["status_url"], headers=bearer(key))).json())[
                "callback_status"] != "delivered":
            assert time.monotonic() < deadline, job
            await asyncio.sleep(0.02)
        assert job["result"] == delivered["result"]

        failing = await client.post(f"/api/v1/models/{XGB}/predict", json={"inputs": [{"features": features(1)[0]}]},
                                    headers={**bearer(key), **ASYNC,
                                             "x-callback-url": f"http://localhost:{hook.port}/p"})
        assert (await settled(client, failing, key))["status"] == "succeeded"


async def test_results_expire_after_the_retention_then_are_forgotten(tmp_path: Path, example_models: Path) -> None:
    jobs = JobsSettings(retention_s=0.5, sweep_interval_s=0.05)
    async with jobs_router(tmp_path, example_models, jobs) as (router, client, key):
        accepted = await client.post(f"/api/v1/models/{XGB}/predict", headers={**bearer(key), **ASYNC},
                                     json={"inputs": [{"features": features(1)[0]}]})
        job = await settled(client, accepted, key)
        assert job["status"] == "succeeded" and job["result"] is not None
        store = jobs_of(router)
        assert await store.get(job["id"]) is not None
        seen: list[tuple[int, str | None]] = []
        swept: list[tuple[str, Outcome | None]] = []  # what the store held while the job answered expired
        deadline = time.monotonic() + 15
        while (answer := await client.get(job["status_url"], headers=bearer(key))).status_code == 200:
            view = answer.json()
            seen.append((200, view["status"]))
            if view["status"] == "expired":
                assert view["result"] is None and view["error"] is None
                assert time.time() >= job["finished_at"] + 0.5
                if (stored := await store.get(job["id"])) is not None:
                    swept.append((stored.status, stored.outcome))
            assert time.monotonic() < deadline, view
            await asyncio.sleep(0.02)
        assert answer.json()["error"]["code"] == "job_not_found"
        assert time.time() >= job["finished_at"] + 1.0  # forgotten only after as long again
        statuses = [status for _, status in seen]
        assert "expired" in statuses and statuses == sorted(statuses, key=("succeeded", "expired").index)
        assert ("expired", None) in swept  # the sweep dropped the result itself, not only the view
        assert await store.get(job["id"]) is None and stored_jobs(router) == 0


async def test_an_engine_failure_fails_the_job_with_the_sync_error(tmp_path: Path, example_models: Path) -> None:
    async with jobs_router(tmp_path, example_models) as (_, client, key):
        body = {"prompt": "hi", "max_tokens": 3}
        sync = await client.post("/api/v1/models/broken/generate", json=body, headers=bearer(key))
        assert sync.status_code == 502, sync.text
        accepted = await client.post("/api/v1/models/broken/generate", json=body, headers={**bearer(key), **ASYNC})
        job = await settled(client, accepted, key)
        assert job["status"] == "failed" and job["status_code"] == 502 and job["result"] is None
        assert job["error"] == sync.json()["error"]
        assert job["error"]["message"] and job["error"]["code"] == sync.json()["error"]["code"]


# -- the runner, the store and the allow-list alone: fakes and an injected clock --------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def job(**fields: Any) -> Job:
    return Job(kind="predict", model="m", owner="key_a", request_id="r", created_at=1000.0, **fields)


def gated(gate: asyncio.Event, outcome: Outcome) -> Callable[[], Awaitable[Outcome]]:
    async def work() -> Outcome:
        await gate.wait()
        return outcome

    return work


async def until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        await asyncio.sleep(0.002)


async def test_the_runner_bounds_concurrency_and_pending_jobs_and_keeps_results_for_the_retention() -> None:
    clock = Clock()
    runner = JobRunner(JobsSettings(max_concurrent=1, max_pending=2, retention_s=60), clock=clock)
    gate = asyncio.Event()
    first, second = job(), job()
    await runner.submit(first, gated(gate, Outcome(200, {"ok": 1})))
    await runner.submit(second, gated(gate, Outcome(429, {"error": {"message": "busy", "code": "overloaded"}})))
    with pytest.raises(TooManyJobs):
        await runner.submit(job(), gated(gate, Outcome(200, {})))
    await until(lambda: first.status == "running")
    await asyncio.sleep(0.01)
    assert second.status == "queued"  # one slot
    gate.set()
    await until(lambda: second.finished)
    assert runner.pending == 0
    assert runner.view(first).result == {"ok": 1} and runner.view(second).status == "failed"
    assert runner.view(second).error == {"message": "busy", "code": "overloaded"}
    clock.now += 59
    assert (await runner.sweep()) == (0, 0) and runner.view(first).status == "succeeded"
    clock.now += 2  # past the retention: expired at once in the view, dropped by the sweep
    assert runner.view(first).status == "expired" and runner.view(first).result is None
    assert (await runner.sweep()) == (2, 0) and first.outcome is None
    clock.now += 60
    assert (await runner.sweep()) == (0, 2) and await runner.get(first.id) is None
    await runner.close()


async def test_a_job_refused_for_a_while_is_tried_again_after_its_retry_after() -> None:
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    runner = JobRunner(JobsSettings(patience_s=30), sleep=sleep)
    calls = 0

    async def attempt() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ShedLoad("saturated", 2)
        return "done"

    assert await runner.patiently(attempt) == "done" and waits == [2, 2]
    impatient = JobRunner(JobsSettings(patience_s=1), sleep=sleep)
    calls = 0
    with pytest.raises(ShedLoad):
        await impatient.patiently(attempt)  # Retry-After past its patience: the refusal is the job's outcome
    await runner.close()
    await impatient.close()


def test_only_allowed_callback_hosts_pass() -> None:
    loopback = JobsSettings().callback_hosts
    for url in ("http://127.0.0.1:8080/x", "https://localhost/hook", "http://[::1]:9000/", "http://LOCALHOST/"):
        assert check_callback_url(url, loopback) == url
    for url in ("http://10.0.0.1/", "http://169.254.169.254/latest", "ftp://127.0.0.1/", "http://user:pw@127.0.0.1/",
                "127.0.0.1:80", "http://127.0.0.1.evil.example/", 5, "http://127.0.0.1:99999/"):
        with pytest.raises(CallbackNotAllowed):
            check_callback_url(url, loopback)
    assert check_callback_url("https://hooks.example.com/a", ["hooks.example.com"])
