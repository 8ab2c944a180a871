"""The OpenAI Batch API: the official ``openai`` client's files and batches calls against a router over
simulated engines (round trip, bad lines, limits, cancel, expiry, a restart mid-batch); the store's batch
methods on SQLite and Redis; the runner with a fake line executor and an injected clock (a router that dies
holding a batch, refusals); the AIMD policy."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from pydantic import SecretStr

from llmserve.batches_settings import BatchesSettings
from llmserve.settings import AdmissionSettings, AuthSettings, RouterSettings
from loadtest.sim import SimEngineProgram
from loadtest.simstack import StaticVersion
from router.batches.files import FileStore
from router.batches.models import Batch, Line, parse_lines, window_seconds
from router.batches.policy import AIMD
from router.batches.runner import BatchRunner, LineAnswer
from router.store import BatchLineRecord, BatchRecord, Store
from router.store.sqlite import SQLiteStore
from tests.conftest import RunningRouter, free_port, run_router
from tests.test_auth import ADMIN, create_key

FAST = BatchesSettings(scan_interval_s=0.2, progress_interval_s=0.1, lease_s=5, max_concurrency=8,
                       max_file_bytes=64 << 10, max_lines=200)
CHAT = "/v1/chat/completions"


def request_line(custom_id: str, model: str = "chat", url: str = CHAT) -> bytes:
    body = {"model": model, "messages": [{"role": "user", "content": f"hi {custom_id}"}], "max_tokens": 3}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body}).encode()


def jsonl(lines: list[bytes]) -> bytes:
    return b"\n".join(lines) + b"\n"


# -- the policy and the parsing: pure ----------------------------------------------------------------------

def test_aimd_grows_by_one_a_window_halves_once_per_refusal_and_pauses() -> None:
    aimd = AIMD(max_window=8, min_pause_s=0.5)
    assert aimd.room(0.0, 0) == 1
    for _ in range(20):
        aimd.succeeded()
    assert 5 <= aimd.window <= 8
    before = aimd.window
    aimd.refused(10.0, 2.0)
    assert aimd.window == pytest.approx(before / 2) and aimd.room(11.0, 0) == 0 and aimd.pause_left(11.0) == 1.0
    aimd.refused(11.0, 1.0)  # the same congestion (lines that were in flight): not halved again, not shortened
    assert aimd.window == pytest.approx(before / 2) and aimd.paused_until == 12.0
    assert aimd.room(12.0, 1) == int(before / 2) - 1
    aimd.refused(12.0, None)
    assert aimd.paused_until == 12.5
    for _ in range(1000):
        aimd.succeeded()
    assert aimd.window == 8


def test_lines_are_checked_one_by_one_and_named_by_number() -> None:
    content = jsonl([request_line("a"), b"{not json", b"", request_line("a"), request_line("b", url="/v1/embeddings"),
                     json.dumps({"custom_id": "c", "method": "POST", "url": CHAT, "body": {"stream": True}}).encode(),
                     b'"a string"', request_line("d")])
    lines = parse_lines(content, CHAT)
    assert [line.number for line in lines] == [1, 2, 4, 5, 6, 7, 8]
    assert [line.error["code"] if line.error else None for line in lines] == [
        None, "invalid_json_line", "duplicate_custom_id", "invalid_url", "invalid_body", "invalid_json_line", None]
    assert lines[1].error is not None and lines[1].error["message"].startswith("line 2:")
    assert window_seconds("24h") == 86400 and window_seconds("90m") == 5400 and window_seconds("3s") == 3
    assert window_seconds("0h") is None and window_seconds("1d") is None


# -- the store: SQLite and Redis -----------------------------------------------------------------------------

async def test_store_keeps_batches_one_claim_wins_and_a_line_is_recorded_once(store: Store) -> None:
    await store.add_batch(BatchRecord("batch_1", "validating", 1.0, detail={"endpoint": CHAT}))
    await store.add_batch(BatchRecord("batch_2", "completed", 2.0))
    assert [b.id for b in await store.list_batches()] == ["batch_2", "batch_1"]

    def claim(who: str) -> Any:
        return lambda b: BatchRecord(b.id, b.status, b.created_at, who, 10.0, b.detail) if not b.runner else None

    won = await asyncio.gather(store.change_batch("batch_1", claim("a")), store.change_batch("batch_1", claim("b")))
    assert sum(w is not None for w in won) == 1
    stored = await store.get_batch("batch_1")
    assert stored is not None and stored.runner in ("a", "b") and stored.detail == {"endpoint": CHAT}
    assert await store.change_batch("nope", claim("a")) is None
    first = [BatchLineRecord(2, "x", 200, {"a": 1}), BatchLineRecord(1, "y", 0, {"error": {}})]
    assert await store.add_batch_lines("batch_1", first) == 2
    again = [BatchLineRecord(2, "x", 500, {}), BatchLineRecord(3, "z", 200, {})]
    assert await store.add_batch_lines("batch_1", again) == 1
    lines = await store.batch_lines("batch_1")
    assert [(r.line, r.custom_id, r.status_code) for r in lines] == [(1, "y", 0), (2, "x", 200), (3, "z", 200)]
    assert await store.batch_lines("batch_2") == []


# -- the runner with a fake executor: a router that dies holding a batch, refusals ----------------------------

class Clock:
    """Real time plus an offset a test moves forward (a lease lapses at once, pauses still end)."""

    def __init__(self) -> None:
        self.offset = 0.0

    @property
    def now(self) -> float:
        return time.time() + self.offset

    def __call__(self) -> float:
        return self.now


async def _poll(predicate: Any, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_a_batch_whose_router_died_is_resumed_elsewhere_with_every_custom_id_once(tmp_path: Path,
                                                                                      store: Store) -> None:
    files = FileStore(tmp_path / "files")
    clock = Clock()
    content = jsonl([request_line(f"r{i}") for i in range(30)] + [b"{bad"])
    upload = await files.save(content, "in.jsonl", "batch", None)
    batch = Batch(endpoint=CHAT, input_file_id=upload.id, completion_window="24h", created_at=clock.now,
                  expires_at=clock.now + 86400)
    await store.add_batch(batch.to_record())
    calls: dict[str, int] = {}
    gate = asyncio.Event()
    refused_once: set[str] = set()

    async def slow_after_ten(b: Batch, line: Line, request_id: str) -> LineAnswer:
        calls[line.custom_id] = calls.get(line.custom_id, 0) + 1
        if sum(calls.values()) > 10:
            await gate.wait()  # router A hangs here until it "dies"
        return LineAnswer(200, {"ok": line.custom_id})

    async def refuse_each_once(b: Batch, line: Line, request_id: str) -> LineAnswer:
        calls[line.custom_id] = calls.get(line.custom_id, 0) + 1
        if line.custom_id not in refused_once:
            refused_once.add(line.custom_id)
            return LineAnswer(429, {"error": {"code": "overloaded"}}, retry_after_s=0.01)
        return LineAnswer(200, {"ok": line.custom_id})

    settings = BatchesSettings(scan_interval_s=0.05, progress_interval_s=0.05, lease_s=5, max_concurrency=4,
                               min_pause_s=0.01)
    a = BatchRunner(settings, store, files, slow_after_ten, clock=clock, runner="a")
    await a.scan()

    async def a_recorded_some() -> bool:
        return len(await store.batch_lines(batch.id)) >= 8

    await _poll(a_recorded_some)

    async def no_release(batch_id: str) -> None:  # killed: the lease is not given back
        return None

    a._release = no_release  # type: ignore[method-assign]
    await a.close()
    b = BatchRunner(settings, store, files, refuse_each_once, clock=clock, runner="b")
    await b.scan()
    assert b.active == []  # a's lease still holds
    clock.offset += 6  # a's lease lapsed
    await b.scan()
    assert b.active == [batch.id]

    async def finished() -> bool:
        record = await store.get_batch(batch.id)
        return record is not None and record.status == "completed"

    await _poll(finished)
    done = Batch.of(await store.get_batch(batch.id))  # type: ignore[arg-type]
    assert done.total == 31 and done.completed == 30 and done.failed == 1 and done.runner == "b"
    assert done.output_file_id is not None and done.error_file_id is not None
    out = [json.loads(line) for line in (await files.content(done.output_file_id) or b"").splitlines()]
    assert sorted(o["custom_id"] for o in out) == sorted(f"r{i}" for i in range(30))
    errors = [json.loads(line) for line in (await files.content(done.error_file_id) or b"").splitlines()]
    assert [(e["error"]["code"], e["error"]["line"]) for e in errors] == [("invalid_json_line", 31)]
    assert all(calls[f"r{i}"] <= 3 for i in range(30))  # at most: a's in-flight try, b's refusal, b's run
    await b.close()


async def test_the_batch_nearest_its_deadline_is_claimed_first(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "db")
    files = FileStore(tmp_path / "files")
    upload = await files.save(jsonl([request_line("only")]), "in.jsonl", "batch", None)
    now = time.time()
    relaxed = Batch(endpoint=CHAT, input_file_id=upload.id, completion_window="24h", created_at=now,
                    expires_at=now + 86400)
    urgent = Batch(endpoint=CHAT, input_file_id=upload.id, completion_window="1h", created_at=now + 1,
                   expires_at=now + 3600)
    for batch in (relaxed, urgent):
        await store.add_batch(batch.to_record())
    gate = asyncio.Event()

    async def held(b: Batch, line: Line, request_id: str) -> LineAnswer:
        await gate.wait()
        return LineAnswer(200, {})

    runner = BatchRunner(BatchesSettings(max_active=1), store, files, held, runner="r")
    await runner.scan()
    assert runner.active == [urgent.id]
    await runner.close()
    await store.close()


# -- the openai client against a router over simulated engines ------------------------------------------------

@asynccontextmanager
async def batch_router(tmp_path: Path, admission: AdmissionSettings | None = None
                       ) -> AsyncIterator[tuple[RunningRouter, str]]:
    """Auth on; ``chat`` (fast), ``slow`` (300 ms a line) and ``secret`` (a model the batch key may not use)."""
    settings = RouterSettings(port=free_port(), retry_after_s=1, batches=FAST,
                              admission=admission or AdmissionSettings(),
                              auth=AuthSettings(enabled=True, admin_key=SecretStr(ADMIN)))
    versions = [StaticVersion(SimEngineProgram("chat", "v1", ttft_ms=2, itl_ms=1)),
                StaticVersion(SimEngineProgram("slow", "v1", ttft_ms=300, itl_ms=1)),
                StaticVersion(SimEngineProgram("secret", "v1", ttft_ms=2, itl_ms=1))]
    async with run_router(versions, tmp_path, router_settings=settings, store=SQLiteStore(tmp_path / "db")) as router:
        async with httpx.AsyncClient(base_url=router.url, timeout=30) as client:
            key = (await create_key(client, name=f"batch-{uuid.uuid4().hex[:6]}", scopes=["inference"],
                                    models=["chat", "slow"]))["key"]
        yield router, key


def client_of(router: RunningRouter, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{router.url}/v1", api_key=key, max_retries=0, timeout=30)


async def settled(client: openai.AsyncOpenAI, batch_id: str, timeout_s: float = 60) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        batch = await client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            return batch
        assert time.monotonic() < deadline, batch
        await asyncio.sleep(0.1)


async def jsonl_of(client: openai.AsyncOpenAI, file_id: str | None) -> list[dict[str, Any]]:
    assert file_id is not None
    return [json.loads(line) for line in (await client.files.content(file_id)).text.splitlines()]


async def test_openai_client_round_trip_with_bad_lines_limits_cancel_and_expiry(tmp_path: Path) -> None:
    async with batch_router(tmp_path) as (router, key):
        client = client_of(router, key)
        good = [request_line(f"req-{i}") for i in range(40)]
        bad = [b"{oops", request_line("wrong-url", url="/v1/embeddings"), request_line("no-model", model="secret")]
        content = jsonl(good[:10] + [bad[0]] + good[10:20] + [bad[1]] + good[20:] + [bad[2]])
        upload = await client.files.create(file=("in.jsonl", content), purpose="batch")
        assert upload.purpose == "batch" and upload.bytes == len(content)
        assert (await client.files.retrieve(upload.id)).filename == "in.jsonl"
        created = await client.batches.create(input_file_id=upload.id, endpoint=CHAT, completion_window="24h",
                                              metadata={"job": "nightly"})
        assert created.status == "validating" and created.metadata == {"job": "nightly"}
        batch = await settled(client, created.id)
        assert batch.status == "completed", batch
        assert batch.request_counts is not None
        assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (43, 40, 3)
        assert batch.in_progress_at and batch.finalizing_at and batch.completed_at
        out = await jsonl_of(client, batch.output_file_id)
        assert sorted(o["custom_id"] for o in out) == sorted(f"req-{i}" for i in range(40))
        assert all(o["response"]["status_code"] == 200 and o["error"] is None and
                   o["response"]["body"]["object"] == "chat.completion" for o in out)
        errors = {e["custom_id"]: e for e in await jsonl_of(client, batch.error_file_id)}
        assert errors[None]["error"]["line"] == 11 and errors[None]["error"]["code"] == "invalid_json_line"
        assert errors["wrong-url"]["error"]["code"] == "invalid_url" and errors["wrong-url"]["error"]["line"] == 22
        assert errors["no-model"]["response"]["status_code"] == 404  # the key may not use it: unknown to it
        assert batch.errors is not None and {e.line for e in batch.errors.data} == {11, 22}
        async with httpx.AsyncClient(base_url=router.url, timeout=30) as raw:
            exposition = (await raw.get("/metrics")).text
        assert 'llmserve_batch_lines_total{outcome="completed"} 40.0' in exposition
        assert 'llmserve_batches_finished_total{status="completed"} 1.0' in exposition
        assert "llmserve_batches_running 0.0" in exposition and "llmserve_batch_window 0.0" in exposition
        listed = await client.batches.list(limit=10)
        assert [b.id for b in listed.data] == [created.id]

        # refused up front: an unknown file, a file over the limits, another key's batch
        with pytest.raises(openai.NotFoundError):
            await client.batches.create(input_file_id="file-nope", endpoint=CHAT, completion_window="24h")
        with pytest.raises(openai.APIStatusError) as too_big:
            await client.files.create(file=("big.jsonl", jsonl([request_line(f"x{i}") for i in range(201)])),
                                      purpose="batch")
        assert too_big.value.status_code == 413 and "max_lines" in str(too_big.value.body).lower()
        with pytest.raises(openai.APIStatusError) as too_many_bytes:
            await client.files.create(file=("huge.jsonl", b"x" * (70 << 10) + b"\n"), purpose="batch")
        assert too_many_bytes.value.status_code == 413 and "max_file_bytes" in str(too_many_bytes.value.body).lower()
        with pytest.raises(openai.BadRequestError):
            await client.batches.create(input_file_id=upload.id, endpoint="/v1/embeddings", completion_window="24h")
        empty = await client.files.create(file=("empty.jsonl", b"\n"), purpose="batch")
        failed = await settled(client, (await client.batches.create(input_file_id=empty.id, endpoint=CHAT,
                                                                     completion_window="24h")).id)
        assert failed.status == "failed" and failed.failed_at is not None and failed.errors is not None
        assert failed.errors.data[0].code == "empty_file"
        spare = await client.files.create(file=("spare.jsonl", good[0] + b"\n"), purpose="batch")
        assert (await client.files.delete(spare.id)).deleted
        with pytest.raises(openai.NotFoundError):
            await client.files.retrieve(spare.id)
        admin = client_of(router, ADMIN)
        assert (await admin.batches.retrieve(created.id)).id == created.id
        other = client_of(router, (await _key(router)))
        with pytest.raises(openai.NotFoundError):
            await other.batches.retrieve(created.id)

        # cancel: what finished is kept, the rest is reported as cancelled
        slow = await client.files.create(file=("slow.jsonl", jsonl([request_line(f"s{i}", "slow") for i in range(30)])),
                                         purpose="batch")
        running = await client.batches.create(input_file_id=slow.id, endpoint=CHAT, completion_window="24h")
        await _until_some_done(client, running.id)
        with pytest.raises(openai.ConflictError):
            await client.files.delete(slow.id)  # its batch still reads it
        cancelling = await client.batches.cancel(running.id)
        assert cancelling.status in ("cancelling", "cancelled")
        cancelled = await settled(client, running.id)
        assert cancelled.status == "cancelled" and cancelled.cancelled_at is not None
        finished = await jsonl_of(client, cancelled.output_file_id)
        unrun = await jsonl_of(client, cancelled.error_file_id)
        assert 1 <= len(finished) < 30 and len(finished) + len(unrun) == 30
        assert {e["error"]["code"] for e in unrun} == {"batch_cancelled"}

        # expiry: a tiny window ends the batch with what finished
        late = await client.batches.create(input_file_id=slow.id, endpoint=CHAT, completion_window="2s")
        expired = await settled(client, late.id)
        assert expired.status == "expired" and expired.expired_at is not None
        unfinished = await jsonl_of(client, expired.error_file_id)
        done = await jsonl_of(client, expired.output_file_id) if expired.output_file_id else []
        assert len(done) + len(unfinished) == 30 and {e["error"]["code"] for e in unfinished} == {"batch_expired"}

        # the listing: newest first, pages by after and limit
        first = await client.batches.list(limit=2)
        assert [b.id for b in first.data] == [late.id, running.id] and first.has_more
        rest = await client.batches.list(limit=2, after=running.id)
        assert [b.id for b in rest.data] == [failed.id, created.id] and not rest.has_more



async def _key(router: RunningRouter) -> str:
    async with httpx.AsyncClient(base_url=router.url, timeout=30) as client:
        return str((await create_key(client, name=f"other-{uuid.uuid4().hex[:6]}", scopes=["inference"]))["key"])


async def _until_some_done(client: openai.AsyncOpenAI, batch_id: str, at_least: int = 2) -> None:
    deadline = time.monotonic() + 30
    while True:
        batch = await client.batches.retrieve(batch_id)
        assert batch.request_counts is not None
        if batch.request_counts.completed >= at_least:
            return
        assert batch.status == "in_progress" or batch.status == "validating", batch
        assert time.monotonic() < deadline, batch
        await asyncio.sleep(0.05)


async def test_a_router_restarted_mid_batch_resumes_it_with_every_custom_id_once(tmp_path: Path) -> None:
    lines = jsonl([request_line(f"s{i}", "slow") for i in range(30)])
    async with batch_router(tmp_path) as (router, key):
        client = client_of(router, key)
        upload = await client.files.create(file=("in.jsonl", lines), purpose="batch")
        batch = await client.batches.create(input_file_id=upload.id, endpoint=CHAT, completion_window="24h")
        await _until_some_done(client, batch.id, at_least=3)
    async with batch_router(tmp_path) as (router, _):
        client = client_of(router, key)
        resumed = (await client.batches.retrieve(batch.id)).request_counts
        assert resumed is not None and 3 <= resumed.completed < 30  # stopped mid-batch
        done = await settled(client, batch.id)
        assert done.status == "completed" and done.request_counts is not None
        assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (30, 30, 0)
        out = await jsonl_of(client, done.output_file_id)
        assert sorted(o["custom_id"] for o in out) == sorted(f"s{i}" for i in range(30))
        assert done.error_file_id is None


async def test_a_batch_backs_off_while_online_load_saturates_the_version_and_still_runs_every_line(
        tmp_path: Path) -> None:
    """Online requests keep ``slow`` saturated (two in flight is its limit here) for a while: admission sheds the
    batch's lines (429 with Retry-After), the batch pauses and halves its window, and every line still runs once."""
    admission = AdmissionSettings(max_outstanding_per_replica=2, min_hold_s=0.1)
    async with batch_router(tmp_path, admission) as (router, key):
        client = client_of(router, key)
        stop = asyncio.Event()

        async def online_user() -> None:
            while not stop.is_set():
                await client.chat.completions.create(model="slow", messages=[{"role": "user", "content": "hi"}],
                                                     max_tokens=2)

        users = [asyncio.create_task(online_user()) for _ in range(3)]
        await asyncio.sleep(0.5)
        upload = await client.files.create(file=("in.jsonl", jsonl([request_line(f"s{i}", "slow") for i in range(8)])),
                                           purpose="batch")
        batch = await client.batches.create(input_file_id=upload.id, endpoint=CHAT, completion_window="24h")
        await asyncio.sleep(2.0)
        stop.set()
        await asyncio.gather(*users)
        done = await settled(client, batch.id, timeout_s=90)
        assert done.status == "completed" and done.request_counts is not None and done.request_counts.completed == 8
        out = await jsonl_of(client, done.output_file_id)
        assert sorted(o["custom_id"] for o in out) == sorted(f"s{i}" for i in range(8))
        async with httpx.AsyncClient(base_url=router.url, timeout=30) as raw:
            exposition = (await raw.get("/metrics")).text
        refused = [line for line in exposition.splitlines()
                   if line.startswith('llmserve_batch_lines_total{outcome="refused"}')]
        assert refused and float(refused[0].split()[-1]) >= 1
        shed = [line for line in exposition.splitlines()
                if line.startswith('llmserve_admission_total{model="slow",outcome="rejected",priority="batch"}')]
        assert shed and float(shed[0].split()[-1]) >= 1
