"""Async jobs in the router's store: every router on one SQLite file or one Redis sees every job (status and
result), finished jobs outlive the router that ran them, and a job whose router stopped is failed instead of
staying running; the runners with real stores and an injected clock, then two real routers on one file."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from llmserve.jobs_settings import JobsSettings
from llmserve.settings import AuthSettings, RouterSettings
from router.jobs.callback import CallbackSender
from router.jobs.durable import StoreJobStore
from router.jobs.models import Job, Outcome
from router.jobs.runner import ORPHANED, JobRunner
from router.store import JobRecord, Store
from router.store.redis_store import RedisStore
from router.store.sqlite import SQLiteStore
from tests.conftest import free_port, run_router
from tests.test_async_jobs import ASYNC, Clock, gated, jobs_router, settled
from tests.test_auth import ADMIN, bearer
from tests.test_predict_api import XGB, features

StoreFactory = Callable[[], Store]


@pytest.fixture(params=["sqlite", "redis"])
async def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreFactory]:
    """Opens another connection to one backend each call: what each router of a fleet has."""
    opened: list[Store] = []
    prefix = f"jobs-{uuid.uuid4().hex[:8]}:"

    def open_one() -> Store:
        if request.param == "sqlite":
            store: Store = SQLiteStore(tmp_path / "shared.db")
        else:
            store = RedisStore(request.getfixturevalue("redis_url"), prefix=prefix)
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        await store.close()


class Callbacks(CallbackSender):
    """Records the callbacks instead of sending them."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    async def send(self, url: str, body: dict[str, Any], job_id: str) -> bool:
        self.sent.append(body)
        return True

    async def aclose(self) -> None:
        pass


def a_job(**fields: Any) -> Job:
    return Job(kind="generate", model="chat", owner="key_a", request_id=f"req-{uuid.uuid4().hex[:6]}",
               created_at=1000.0, **fields)


def runner(store: Store, clock: Clock, name: str, callbacks: CallbackSender | None = None) -> JobRunner:
    return JobRunner(JobsSettings(lease_s=30, retention_s=600), StoreJobStore(store), clock=clock, runner=name,
                     callbacks=callbacks or Callbacks())


async def eventually(condition: Callable[[], Awaitable[bool]], timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, "the condition never held"
        await asyncio.sleep(0.005)


async def status_of(reader: JobRunner, job_id: str) -> str | None:
    job = await reader.get(job_id)
    return None if job is None else job.status


async def test_a_job_taken_by_one_router_is_read_on_another(open_store: StoreFactory) -> None:
    clock = Clock()
    a, b = runner(open_store(), clock, "router-a"), runner(open_store(), clock, "router-b")
    gate = asyncio.Event()
    job = a_job()
    await a.submit(job, gated(gate, Outcome(200, {"text": "hi", "usage": {"completion_tokens": 1}})))
    await eventually(lambda: _is(b, job.id, "running"))
    seen = await b.get(job.id)
    assert seen is not None and (seen.runner, seen.owner, seen.request_id, seen.kind) == \
        ("router-a", "key_a", job.request_id, "generate")
    assert b.view(seen).result is None and seen.visible_to("key_a", False) and not seen.visible_to("key_b", False)
    clock.now += 5
    gate.set()
    await eventually(lambda: _is(b, job.id, "succeeded"))
    done = await b.get(job.id)
    assert done is not None and done.finished_at == 1005.0
    assert b.view(done).model_dump() == a.view(job).model_dump()  # the same JSON from either router
    assert b.view(done).result == {"text": "hi", "usage": {"completion_tokens": 1}}
    clock.now += 601  # past the retention: either router's sweep drops it from the store, for both
    assert await b.sweep() == (1, 0)
    assert (await a.get(job.id)).status == "expired" and (await a.get(job.id)).outcome is None  # type: ignore[union-attr]
    await a.close()
    await b.close()


async def _is(reader: JobRunner, job_id: str, status: str) -> bool:
    return await status_of(reader, job_id) == status


async def test_the_jobs_of_a_stopped_router_fail_once_and_its_late_writes_do_not_count(open_store: StoreFactory
                                                                                       ) -> None:
    clock = Clock()
    calls = Callbacks()
    a = runner(open_store(), clock, "router-a")
    stopped = JobRunner(JobsSettings(lease_s=30, max_concurrent=1), StoreJobStore(open_store()), clock=clock,
                        runner="router-stopped", callbacks=Callbacks())  # one slot: its second job stays queued
    b = runner(open_store(), clock, "router-b", callbacks=calls)
    gate = asyncio.Event()
    kept = a_job()
    orphan = a_job(callback_url="http://127.0.0.1:9/done", callback_status="pending")
    queued = a_job()
    await a.submit(kept, gated(gate, Outcome(200, {"ok": "a"})))
    await stopped.submit(orphan, gated(gate, Outcome(200, {"ok": "stopped"})))
    await eventually(lambda: _is(b, orphan.id, "running"))
    ran: list[str] = []

    async def work_of_queued() -> Outcome:
        ran.append(queued.id)
        return Outcome(200, {})

    await stopped.submit(queued, work_of_queued)
    clock.now += 30  # the leases end now: not yet lapsed
    assert await b.settle_orphans() == []
    clock.now += 1
    await a.renew()  # router-a's lease loop still runs; router-stopped's does not (it is gone)
    orphans = await b.settle_orphans()
    assert sorted(j.id for j in orphans) == sorted([orphan.id, queued.id])
    assert await a.settle_orphans() == [] and await b.settle_orphans() == []  # settled once
    for job_id in (orphan.id, queued.id):
        failed = await a.get(job_id)
        assert failed is not None and failed.status == "failed" and failed.finished_at == clock.now
        view = a.view(failed)
        assert view.status_code == 503 and view.error is not None and view.result is None
        assert view.error["code"] == "job_interrupted" and view.error["message"] == ORPHANED
        assert "submit it again" in view.error["message"]
    assert await status_of(b, kept.id) == "running"
    await eventually(lambda: _is_true(len(calls.sent) == 1))
    assert calls.sent[0]["id"] == orphan.id and calls.sent[0]["status"] == "failed"
    await eventually(lambda: _callback_of(b, orphan.id, "delivered"))
    # the stopped router was only cut off: its job finishes and its queued one starts, but their writes are
    # refused (and it runs nothing for a job it may no longer write)
    gate.set()
    await eventually(lambda: _is(b, kept.id, "succeeded"))
    await eventually(lambda: _is_true(stopped.pending == 0))
    assert ran == []
    await stopped.close()
    assert (await b.get(orphan.id)).outcome.body["error"]["message"] == ORPHANED  # type: ignore[union-attr]
    assert (await b.get(queued.id)).outcome.body["error"]["message"] == ORPHANED  # type: ignore[union-attr]
    await a.close()
    await b.close()


async def _is_true(value: bool) -> bool:
    return value


async def _callback_of(reader: JobRunner, job_id: str, status: str) -> bool:
    job = await reader.get(job_id)
    return job is not None and job.callback_status == status


async def test_finished_jobs_outlive_the_router_and_its_sqlite_connection(tmp_path: Path) -> None:
    clock = Clock()
    first_store = SQLiteStore(tmp_path / "llmserve.db")
    first = runner(first_store, clock, "router-1")
    job = a_job()
    await first.submit(job, gated(asyncio.Event(), Outcome(200, {})))  # never finishes: the router dies with it
    done = a_job()
    release = asyncio.Event()
    release.set()
    await first.submit(done, gated(release, Outcome(200, {"predictions": [1]})))
    await eventually(lambda: _is(first, done.id, "succeeded"))
    await first_store.close()  # killed: no shutdown wrote anything (its store is gone before its tasks)
    second_store = SQLiteStore(tmp_path / "llmserve.db")
    second = runner(second_store, clock, "router-2")
    result = await second.get(done.id)
    assert result is not None and second.view(result).result == {"predictions": [1]}
    assert await status_of(second, job.id) == "running"
    clock.now += 31
    assert [j.id for j in await second.settle_orphans()] == [job.id]
    assert await status_of(second, job.id) == "failed"
    await first.close()  # its tasks end; their writes fail on the closed connection (logged), none lands
    assert await status_of(second, job.id) == "failed"
    await second.close()
    await second_store.close()


async def test_two_routers_on_one_sqlite_file_share_jobs_and_fail_a_killed_routers_jobs(
        tmp_path: Path, example_models: Path) -> None:
    jobs = JobsSettings(sweep_interval_s=0.05)
    a_context = jobs_router(tmp_path / "a", example_models, jobs)
    router_a, client_a, key = await a_context.__aenter__()
    a_stopped = False
    try:
        settings_b = RouterSettings(port=free_port(), retry_after_s=2, jobs=jobs,
                                    auth=AuthSettings(enabled=True, admin_key=SecretStr(ADMIN)))
        (tmp_path / "b").mkdir()
        async with run_router([], tmp_path / "b", router_settings=settings_b,
                              store=SQLiteStore(tmp_path / "a" / "db")) as router_b, \
                httpx.AsyncClient(base_url=router_b.url, timeout=30) as client_b:
            # a job taken by router A: its status and result on router B, to its key only
            accepted = await client_a.post(f"/api/v1/models/{XGB}/predict", headers={**bearer(key), **ASYNC},
                                           json={"inputs": [{"features": features(1)[0]}]})
            on_a = await settled(client_a, accepted, key)
            assert on_a["status"] == "succeeded" and on_a["result"]["predictions"]
            on_b = await client_b.get(on_a["status_url"], headers=bearer(key))
            assert on_b.status_code == 200 and on_b.json() == on_a
            assert (await client_b.get(on_a["status_url"], headers=bearer(ADMIN))).json()["result"] == on_a["result"]

            # router A stops while a long job runs: on router B the job is failed, not running forever
            long = await client_a.post("/api/v1/models/chat/generate", headers={**bearer(key), **ASYNC},
                                       json={"prompt": "hi", "max_tokens": 2000})
            assert long.status_code == 202, long.text
            url = long.json()["status_url"]
            await eventually(lambda: _answers(client_b, url, key, "running"), timeout_s=20)
            await a_context.__aexit__(None, None, None)
            a_stopped = True
            stopped = (await client_b.get(url, headers=bearer(key))).json()
            assert stopped["status"] == "failed" and stopped["error"]["code"] == "job_interrupted", stopped

            # a router killed outright leaves its job running with a lease nobody renews: B's sweep fails it
            store = router_b.app.state.router.jobs.store
            assert isinstance(store, StoreJobStore)
            left = JobRecord(id="job_left_by_a_killed_router", status="running", runner="killed-router",
                             lease_until=time.time() + 0.3, created_at=time.time(), started_at=time.time(),
                             detail={"kind": "generate", "model": "chat", "owner": None, "request_id": "r-killed",
                                     "callback_url": None})
            await store.store.add_job(left)
            url = f"/api/v1/jobs/{left.id}"
            assert (await client_b.get(url, headers=bearer(ADMIN))).json()["status"] == "running"
            await eventually(lambda: _answers(client_b, url, ADMIN, "failed"), timeout_s=20)
            failed = (await client_b.get(url, headers=bearer(ADMIN))).json()
            assert failed["error"]["code"] == "job_interrupted" and failed["error"]["message"] == ORPHANED
            assert failed["finished_at"] >= left.lease_until
    finally:
        if not a_stopped:
            await a_context.__aexit__(None, None, None)


async def _answers(client: httpx.AsyncClient, url: str, key: str, status: str) -> bool:
    response = await client.get(url, headers=bearer(key))
    assert response.status_code == 200, response.text
    return bool(response.json()["status"] == status)


async def test_a_router_shut_down_cleanly_fails_its_running_and_queued_jobs_at_once(open_store: StoreFactory
                                                                                     ) -> None:
    clock = Clock()
    closing = JobRunner(JobsSettings(max_concurrent=1), StoreJobStore(open_store()), clock=clock, runner="router-a",
                        callbacks=Callbacks())
    reader = runner(open_store(), clock, "router-b")
    gate = asyncio.Event()
    running, queued = a_job(), a_job()
    await closing.submit(running, gated(gate, Outcome(200, {})))
    await closing.submit(queued, gated(gate, Outcome(200, {})))
    await eventually(lambda: _is(reader, running.id, "running"))
    assert await status_of(reader, queued.id) == "queued"
    await closing.close()
    for job_id in (running.id, queued.id):
        job = await reader.get(job_id)
        assert job is not None and job.status == "failed" and job.outcome is not None
        assert job.outcome.body["error"]["code"] == "job_interrupted"
        assert "shut down" in job.outcome.body["error"]["message"]
    await reader.close()
