"""Priority classes, saturation with hysteresis, and shedding to the fallback model."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from llmserve.replicas.backend import Endpoint, EndpointState
from llmserve.settings import AdmissionSettings, AuthSettings, RouterSettings
from loadtest.sim import SimEngineProgram
from loadtest.simstack import StaticVersion
from router.access.auth import Caller
from router.admission.shedding import Admission, resolve_priority
from router.errors import InvalidRequest, PriorityForbidden
from router.observe.samples import SampleWindows
from router.store.sqlite import SQLiteStore
from router.traffic.catalog import Catalog, ServedVersion
from tests.conftest import free_port, run_router
from tests.test_predict_api import deploy, features

NIGHTLY = Caller("key_nightly", "nightly-jobs", frozenset({"inference"}), priority="batch",
                 priorities=("batch", "standard"))
CHECKOUT = Caller("key_checkout", "checkout", frozenset({"inference"}), priority="critical")
ADMIN = "sk-ls-" + "b" * 43


def test_priority_comes_from_the_key_and_the_header_within_what_it_allows() -> None:
    assert resolve_priority({}, Caller("key_app", "app", frozenset())) == "standard"
    assert resolve_priority({}, NIGHTLY) == "batch"
    assert resolve_priority({"x-priority": "Standard"}, NIGHTLY) == "standard"
    assert resolve_priority({}, CHECKOUT) == "critical"
    with pytest.raises(PriorityForbidden) as forbidden:
        resolve_priority({"x-priority": "critical"}, NIGHTLY)
    assert forbidden.value.status_code == 403 and "nightly-jobs" in forbidden.value.message
    with pytest.raises(InvalidRequest):
        resolve_priority({"x-priority": "urgent!"}, CHECKOUT)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def served_with(outstanding: int) -> ServedVersion:
    replica = Endpoint("chat:v1/0", "chat", "v1", state=EndpointState.READY)
    replica.outstanding = outstanding
    return ServedVersion("chat", "v1", 2048, [replica])


def test_saturation_has_hysteresis() -> None:
    clock = Clock()
    served = served_with(0)
    catalog = Catalog()
    catalog.add_version(served)
    admission = Admission(AdmissionSettings(max_outstanding_per_replica=10, clear_ratio=0.7, min_hold_s=2),
                          catalog, SampleWindows(clock=clock), clock=clock)

    def at(outstanding: int, advance: float = 0.1) -> bool:
        clock.now += advance
        served.replicas[0].outstanding = outstanding
        return admission.saturation(served).saturated

    assert not at(9)
    assert at(10)  # at the threshold
    assert at(8)  # below the threshold but above 70% of it: still saturated
    assert at(5, advance=0.5)  # below 70%, but it has held only 0.7 s
    assert not at(5, advance=2.0)
    assert not at(9)  # not saturated again until the threshold itself
    assert admission.saturation(served).reasons == []


async def test_under_saturation_critical_keeps_the_full_model_standard_gets_the_fallback_batch_a_429(
        tmp_path: Path) -> None:
    settings = RouterSettings(port=free_port(), retry_after_s=2, admission=AdmissionSettings(
        fallbacks={"chat": "chat-small"}, max_outstanding_per_replica=3, queue_wait_s=0.4,
        min_hold_s=0, clear_ratio=0.5), auth=AuthSettings(admin_key=SecretStr(ADMIN)))
    deployments = [StaticVersion(SimEngineProgram("chat", "v1", ttft_ms=5, itl_ms=20), 2048),
                   StaticVersion(SimEngineProgram("chat-small", "v1", ttft_ms=5, itl_ms=2), 2048)]
    async with run_router(deployments, tmp_path, router_settings=settings, store=SQLiteStore(tmp_path / "db")
                          ) as router, httpx.AsyncClient(base_url=router.url, timeout=30) as client:
        keys = {}
        for name, body in (("app", {}), ("nightly-jobs", {"priority": "batch", "priorities": ["batch", "standard"]})):
            created = await client.post("/api/v1/keys", headers={"authorization": f"Bearer {ADMIN}"},
                                        json={"name": name, "scopes": ["inference"], **body})
            keys[name] = created.json()["key"]
        batch_key = f"Bearer {keys['nightly-jobs']}"

        def ask(model: str = "chat", priority: str | None = None, max_tokens: int = 2, **headers: str):
            extra = {"x-priority": priority} if priority else {}
            headers = {"authorization": f"Bearer {keys['app']}", **headers}
            return client.post("/v1/chat/completions", headers={**extra, **headers}, json={
                "model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hi"}]})

        calm = await ask()
        assert calm.status_code == 200 and "x-fallback" not in calm.headers
        assert calm.headers["x-priority"] == "standard"
        # Four long critical requests saturate chat's only replica (threshold 3 in flight).
        hogs = [asyncio.create_task(ask(priority="critical", max_tokens=100)) for _ in range(4)]
        await asyncio.sleep(0.3)
        standard = await ask()
        assert standard.status_code == 200
        assert standard.headers["x-fallback"] == "chat-small:v1"
        assert standard.json()["model"] == "chat-small:v1"
        batch = await ask(authorization=batch_key)
        assert batch.status_code == 429 and int(batch.headers["retry-after"]) >= 1
        assert "batch traffic is refused" in batch.json()["error"]["message"]
        critical = await ask(priority="critical")
        assert critical.status_code == 200 and "x-fallback" not in critical.headers
        forbidden = await ask(priority="critical", authorization=batch_key)
        assert forbidden.status_code == 403

        # The fallback saturated too: standard waits (bounded), then 429; with a short deadline, 503.
        small_hogs = [asyncio.create_task(ask("chat-small", priority="critical", max_tokens=1000))
                      for _ in range(4)]
        await asyncio.sleep(0.3)
        waited = await ask()
        assert waited.status_code == 429 and "its fallback are saturated" in waited.json()["error"]["message"]
        assert "retry-after" in waited.headers
        late = await ask(**{"x-deadline-ms": "100"})
        assert late.status_code == 503 and "deadline" in late.json()["error"]["message"]
        assert "retry-after" in late.headers

        results = await asyncio.gather(*hogs, *small_hogs)
        assert all(r.status_code == 200 for r in results)
        await asyncio.sleep(0.2)
        after = await ask()
        assert after.status_code == 200 and "x-fallback" not in after.headers
        metrics = (await client.get("/metrics")).text
        for outcome in ("full", "fallback", "rejected", "expired"):
            assert f'outcome="{outcome}"' in metrics, outcome


async def test_a_full_predict_queue_is_answered_by_the_fallback_model(tmp_path: Path, example_models: Path) -> None:
    settings = RouterSettings(port=free_port(), admission=AdmissionSettings(
        fallbacks={"fraud-xgboost": "fraud-onnx"}))
    for name in ("fraud-xgboost", "fraud-onnx"):
        shutil.copytree(example_models / name, tmp_path / "models" / name)
    async with run_router([], tmp_path, router_settings=settings, store=SQLiteStore(tmp_path / "db")) as router, \
            httpx.AsyncClient(base_url=router.url, timeout=30) as client:
        for name, framework in (("fraud-xgboost", "xgboost"), ("fraud-onnx", "onnx")):
            await client.post("/api/v1/models", json={"model_name": name, "framework": framework})
        await deploy(client, "fraud-onnx", "v1", 100)
        await deploy(client, "fraud-xgboost", "v1", 100, batching={"max_queue_rows": 2, "max_batch_size": 1,
                                                                   "enabled": False})
        rows = features(1)

        async def predict(priority: str = "standard") -> httpx.Response:
            return await client.post("/api/v1/models/fraud-xgboost/predict", headers={"x-priority": priority},
                                     content=json.dumps({"inputs": [{"features": r} for r in rows]}))

        answers = await asyncio.gather(*(predict() for _ in range(60)))
        assert {a.status_code for a in answers} == {200}
        served_by = [a.headers.get("x-fallback") for a in answers]
        assert "fraud-onnx:v1" in served_by and None in served_by
        assert {a.json()["model_name"] for a in answers} == {"fraud-xgboost", "fraud-onnx"}
        batch = await asyncio.gather(*(predict("batch") for _ in range(60)))
        assert {b.status_code for b in batch} <= {200, 429}
        assert not any(b.headers.get("x-fallback") for b in batch)
        assert all("retry-after" in b.headers for b in batch if b.status_code == 429)


def test_the_shedding_benchmark_runs_on_a_tiny_spike(tmp_path: Path) -> None:
    from loadtest.shedding_bench import main

    output = tmp_path / "report.json"
    assert main(["--quick", "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    on = report["shedding_on"]
    for priority, figures in on.items():
        assert figures["status_5xx"] == 0 and figures["other_failures"] == 0, priority
        refused = round(figures["share_429"] * figures["requests"])
        assert figures["refusals_with_retry_after"] == refused, priority
    assert on["critical"]["share_429"] == 0 and on["critical"]["share_fallback"] == 0
    assert on["standard"]["share_fallback"] > 0
    assert report["standard_goodput_ratio"] > 1


def test_slow_answers_count_only_while_work_queues() -> None:
    clock = Clock()
    served = served_with(1)
    catalog = Catalog()
    catalog.add_version(served)
    samples = SampleWindows(clock=clock)
    for _ in range(20):
        samples.record("chat", "v1", 900.0, 200)  # TTFT p90 far over the 500 ms SLO
    admission = Admission(AdmissionSettings(max_outstanding_per_replica=10), catalog, samples, clock=clock)
    assert not admission.saturation(served).saturated  # one request in flight: slow hardware, not overload
    clock.now += 0.1
    served.replicas[0].outstanding = 5
    state = admission.saturation(served)
    assert state.saturated and state.reasons == ["ttft_p90"]


async def test_waiters_released_when_saturation_clears_fill_the_version_only_to_the_clear_ratio() -> None:
    clock = Clock()
    served = served_with(0)
    catalog = Catalog()
    catalog.add_version(served)
    settings = AdmissionSettings(max_outstanding_per_replica=10, clear_ratio=0.7, min_hold_s=0, queue_wait_s=5,
                                 recheck_s=0.01)
    admission = Admission(settings, catalog, SampleWindows(clock=clock), clock=clock)
    replica = served.replicas[0]
    replica.outstanding = 10
    assert admission.saturation(served).saturated

    async def waiter(user: str) -> None:
        await admission.admit(served, "standard", user)
        replica.outstanding += 1  # what the relay does before its first await: the next waiter sees it

    waiters = [asyncio.create_task(waiter(f"u{i}")) for i in range(30)]
    await asyncio.sleep(0.05)
    assert not any(w.done() for w in waiters)  # still saturated: everybody waits
    replica.outstanding = 2  # drained below 70%: clear
    clock.now += 1
    await asyncio.sleep(0.05)
    assert sum(w.done() for w in waiters) == 5 and replica.outstanding == 7  # up to 70% of 10, not all 30
    replica.outstanding = 4  # three finished: three more go
    await asyncio.sleep(0.05)
    assert sum(w.done() for w in waiters) == 8 and replica.outstanding == 7
    for task in waiters:
        task.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
