"""Shadow traffic: the report's statistics (pure, fake clock), and shadows through the router over simulated engines."""

from __future__ import annotations

import asyncio
import contextlib
import math
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from llmserve.replicas.spec import EngineSpec
from llmserve.settings import AdmissionSettings, AuthSettings, RouterSettings
from loadtest.sim import SimEngineProgram
from router.store.sqlite import SQLiteStore
from router.traffic.shadow import answer_text
from router.traffic.shadow_report import EXAMPLE_CHARS, Outcome, Pair, ShadowReport, similarity
from router.traffic.shadow_stats import mean_ci, ratio_ci, wilson
from tests.conftest import RunningRouter, free_port, run_router
from tests.test_control_plane import MODEL, deploy, make_version, wait_status

ADMIN = "sk-admin-shadow-test"
AUTH = {"authorization": f"Bearer {ADMIN}"}


# -- the statistics -----------------------------------------------------------------


def test_wilson_matches_the_textbook_values_and_stays_inside_0_1() -> None:
    low, high = wilson(8, 10) or (0, 0)
    assert math.isclose(low, 0.4902, abs_tol=1e-3) and math.isclose(high, 0.9433, abs_tol=1e-3)
    assert wilson(0, 5) is not None and wilson(0, 5)[0] == 0.0  # type: ignore[index]
    assert wilson(5, 5)[1] == 1.0  # type: ignore[index]
    assert wilson(0, 0) is None
    with pytest.raises(ValueError):
        wilson(3, 2)


def test_a_paired_ratio_is_a_geometric_mean_with_a_positive_interval() -> None:
    primary = [10.0, 20.0, 40.0, 10.0]
    estimate, interval = ratio_ci([12.0, 24.0, 48.0, 12.0], primary) or (0, None)
    assert math.isclose(estimate, 1.2) and interval is not None and math.isclose(interval[0], 1.2)
    estimate, interval = ratio_ci([11.0, 26.0, 44.0, 13.0, 0.0], [*primary, 5.0]) or (0, None)  # a 0 is left out
    assert interval is not None and 0 < interval[0] < estimate < interval[1]
    assert ratio_ci([], []) is None and mean_ci([3.0]) == (3.0, None)
    with pytest.raises(ValueError):
        ratio_ci([1.0], [])


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _pair(n: int, slower: float = 1.0, text: str = "the quick brown fox", shadow_text: str | None = None,
          shadow_ok: bool = True) -> Pair:
    wobble = 1 + 0.05 * ((n % 5) - 2)
    primary = Outcome(True, 100 * wobble, ttft_ms=20 * wobble, tpot_ms=5 * wobble, text=text, output_tokens=4)
    shadow = Outcome(shadow_ok, 100 * wobble * slower, ttft_ms=20 * wobble * slower * (1 + 0.01 * (n % 3)),
                     tpot_ms=5 * wobble * slower, text=text if shadow_text is None else shadow_text,
                     output_tokens=4, error=None if shadow_ok else "status 500")
    return Pair(f"r{n}", "v1", primary, shadow, greedy=True)


def test_the_report_finds_a_20_percent_slower_shadow_and_different_greedy_answers() -> None:
    clock = FakeClock()
    slow = ShadowReport(MODEL, "v2", 10, clock=clock)
    for n in range(40):
        slow.add(_pair(n, slower=1.2))
    clock.now += 30
    report = slow.to_dict()
    assert report["age_s"] == 30 and report["counts"]["compared"] == 40
    assert report["ttft_ratio"]["ci95"][0] > 1.0 and report["tpot_ratio"]["ci95"][0] > 1.0
    assert math.isclose(report["tpot_ratio"]["ratio"], 1.2, rel_tol=1e-3)
    assert report["exact_match_greedy"]["rate"] == 1.0 and report["text_similarity"]["mean"] == 1.0
    assert report["output_length_ratio"]["ratio"] == 1.0

    differs = ShadowReport(MODEL, "v3", 10, clock=clock)
    for n in range(40):
        differs.add(_pair(n, shadow_text="over a lazy dog" + "x" * 500, shadow_ok=n % 10 != 0))
    report = differs.to_dict()
    assert report["exact_match_greedy"]["rate"] == 0.0 and report["exact_match_greedy"]["ci95"][1] < 0.15
    assert report["text_similarity"]["mean"] < 0.5
    assert report["shadow_error_rate"]["rate"] == 0.1 and report["primary_error_rate"]["rate"] == 0.0
    assert 0 < len(report["examples"]) <= 5
    assert len(report["examples"][0]["shadow"]["text"]) <= EXAMPLE_CHARS + 3


def test_a_predict_report_counts_label_agreement_and_score_differences() -> None:
    report = ShadowReport("fraud", "v2", 50, predict=True, clock=FakeClock())
    for n in range(10):
        primary = Outcome(True, 2.0, labels=[0, 1], scores=[0.1, 0.9])
        shadow = Outcome(True, 3.0, labels=[0, 1 if n % 2 else 0], scores=[0.1, 0.7 if n % 2 else 0.4])
        report.add(Pair(f"p{n}", "v1", primary, shadow))
    summary = report.to_dict()
    assert summary["label_agreement"]["n"] == 20 and summary["label_agreement"]["rate"] == 0.75
    assert summary["score_abs_diff"]["max"] == 0.5 and math.isclose(summary["latency_ratio"]["ratio"], 1.5)


def test_answer_text_reads_bodies_and_stream_events_and_similarity_is_difflibs() -> None:
    stream = [b'{"choices":[{"delta":{"role":"assistant","content":"the"}}]}',
              b'{"choices":[{"delta":{"content":" fox"}}]}', b'{"choices":[],"usage":{}}', b"[DONE]"]
    assert answer_text(stream) == "the fox"
    assert answer_text([b'{"choices":[{"message":{"content":"hi"}}]}']) == "hi"
    assert answer_text([b'{"choices":[{"text":"a b"}]}']) == "a b"
    assert similarity("abcd", "abcd") == 1.0 and 0 < similarity("abcd", "abxd") < 1


# -- through the router --------------------------------------------------------------


def factory(shadow_slower: float = 1.0, word_offset: int = 0):
    def make(spec: EngineSpec) -> SimEngineProgram:
        shadow = spec.version != "v1"
        scale = shadow_slower if shadow else 1.0
        args = ["--jitter-cv", "0.05", "--seed", str(len(spec.version))]
        if shadow and word_offset:
            args += ["--word-offset", str(word_offset)]
        return SimEngineProgram(spec.model_name, spec.version, ttft_ms=40 * scale, itl_ms=10 * scale,
                                extra_args=tuple(args))
    return make


@contextlib.asynccontextmanager
async def v1_serving(tmp_path: Path, make: Any) -> AsyncIterator[tuple[RunningRouter, httpx.AsyncClient]]:
    """A router with auth, v1 at 100% and v2, v3 on disk; a client with the admin key."""
    for version in ("v1", "v2", "v3"):
        make_version(tmp_path / "models", version)
    settings = RouterSettings(port=free_port(), retry_after_s=2, admission=AdmissionSettings(enabled=False),
                              auth=AuthSettings(enabled=True, admin_key=SecretStr(ADMIN)))
    async with run_router([], tmp_path, router_settings=settings, store=SQLiteStore(tmp_path / "db"),
                          program_factory=make) as r, httpx.AsyncClient(timeout=30, headers=AUTH) as client:
        assert (await client.post(f"{r.url}/api/v1/models", json={"model_name": MODEL})).status_code == 201
        await deploy(client, r.url, "v1", 100)
        yield r, client


async def deploy_shadow(client: httpx.AsyncClient, url: str, version: str, sample_percent: int = 100) -> None:
    response = await client.post(f"{url}/api/v1/deployments", json={
        "model_name": MODEL, "version": version, "strategy": {"type": "shadow", "sample_percent": sample_percent}})
    assert response.status_code == 202, response.text
    await wait_status(client, url, version, "active")
    deadline = time.monotonic() + 10
    while (await client.get(f"{url}/api/v1/deployments/{MODEL}/shadow")).status_code != 200:
        assert time.monotonic() < deadline, "the shadow never registered"
        await asyncio.sleep(0.02)


async def chat(client: httpx.AsyncClient, url: str, key: str | None = None, n: int = 0) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": f"hi {n}"}], "max_tokens": 6,
            "temperature": 0, "stream": True, "user": f"u{n}"}
    headers = {"authorization": f"Bearer {key}"} if key else {}
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as response:
        await response.aread()
    return response


async def test_a_slower_shadow_never_answers_a_client_costs_no_quota_and_its_report_shows_it(tmp_path: Path) -> None:
    async with v1_serving(tmp_path, factory(shadow_slower=1.2)) as (r, client):
        await deploy_shadow(client, r.url, "v2")
        v2_replicas = {rep.id for rep in r.app.state.router.catalog.find(MODEL).versions["v2"].replicas}
        created = await client.post(f"{r.url}/api/v1/keys", json={"name": "k", "scopes": ["inference"], "rpm": 60})
        key = created.json()["key"]
        shadows = r.app.state.router.shadows
        remaining: list[int] = []
        for n in range(40):
            response = await chat(client, r.url, key, n)
            assert response.status_code == 200, response.text
            assert response.headers["x-model-version"] == "v1" and response.headers["x-served-by"] not in v2_replicas
            assert b"error" not in response.content
            remaining.append(int(response.headers["x-ratelimit-remaining-requests"]))
            await shadows.drain()  # the replay is done before the next request: had it taken quota, it shows
        # the bucket refills (1/s) but never drops by more than the client's own request: replays take nothing
        assert all(a - b <= 1 for a, b in zip(remaining, remaining[1:], strict=False)), remaining
        assert remaining[0] == 59 and remaining[-1] >= 20
        pinned = await client.post(f"{r.url}/v1/chat/completions", headers={"x-model-version": "v2"},
                                   json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
        assert pinned.status_code == 404 and "shadow" in pinned.json()["error"]["message"]
        metrics = (await client.get(f"{r.url}/metrics")).text
        report = (await client.get(f"{r.url}/api/v1/deployments/{MODEL}/shadow")).json()
    # replays are counted apart, labelled; none is in the request metrics (the primary's and the SLO's)
    assert f'llmserve_shadow_replays_total{{model="{MODEL}",outcome="compared",version="v2"}} 40.0' in metrics
    assert f'llmserve_shadow_ratio{{model="{MODEL}",signal="ttft",version="v2"}}' in metrics
    assert not [line for line in metrics.splitlines()
                if line.startswith("llmserve_requests_total") and 'version="v2"' in line]
    assert report["counts"]["sampled"] == 40 and report["counts"]["compared"] == 40, report["counts"]
    assert report["ttft_ratio"]["ci95"][0] > 1.0, report["ttft_ratio"]
    assert report["tpot_ratio"]["ci95"][0] > 1.0, report["tpot_ratio"]
    assert report["exact_match_greedy"]["rate"] == 1.0 and report["shadow_error_rate"]["rate"] == 0.0
    assert report["output_length_ratio"]["ratio"] == 1.0 and report["examples"]


async def test_a_shadow_with_other_answers_is_found_then_promoted_to_a_canary_and_bad_input_is_refused(
        tmp_path: Path) -> None:
    async with v1_serving(tmp_path, factory(word_offset=3)) as (r, client):
        url = f"{r.url}/api/v1/deployments"
        for strategy, status in [({"type": "shadow", "sample_percent": 0}, 400),
                                 ({"type": "shadow", "sample_percent": 101}, 400)]:
            bad = await client.post(url, json={"model_name": MODEL, "version": "v2", "strategy": strategy})
            assert bad.status_code == status and "sample_percent" in bad.text, bad.text
        bad = await client.post(url, json={"model_name": MODEL, "version": "v2", "traffic_percent": 10,
                                           "strategy": {"type": "shadow"}})
        assert bad.status_code == 400 and "traffic_percent" in bad.json()["error"]["message"]
        bad = await client.post(url, json={"model_name": "nope", "version": "v2", "strategy": {"type": "shadow"}})
        assert bad.status_code == 404, bad.text
        assert (await client.get(f"{url}/{MODEL}/shadow")).status_code == 404
        missing = await client.post(f"{url}/{MODEL}/shadow/promote", json={})
        assert missing.status_code == 404 and "no shadow" in missing.json()["error"]["message"]

        await deploy_shadow(client, r.url, "v2", sample_percent=100)
        again = await client.post(url, json={"model_name": MODEL, "version": "v3", "strategy": {"type": "shadow"}})
        assert again.status_code == 409 and "already the shadow" in again.json()["error"]["message"]
        as_canary = await client.post(url, json={"model_name": MODEL, "version": "v2", "traffic_percent": 0,
                                                 "strategy": {"type": "canary"}})
        assert as_canary.status_code == 409, as_canary.text  # one version: a shadow, or a canary, never both
        for n in range(25):
            response = await chat(client, r.url, n=n)
            assert response.status_code == 200 and response.headers["x-model-version"] == "v1"
        await r.app.state.router.shadows.drain()
        report = (await client.get(f"{url}/{MODEL}/shadow")).json()
        assert report["counts"]["compared"] == 25
        assert report["exact_match_greedy"]["rate"] == 0.0 and report["exact_match_greedy"]["ci95"][1] < 0.2
        assert report["text_similarity"]["mean"] < 0.9
        assert report["examples"][0]["primary"]["text"] != report["examples"][0]["shadow"]["text"]

        promoted = await client.post(f"{url}/{MODEL}/shadow/promote", json={"steps": [20, 100], "bake_s": 60})
        assert promoted.status_code == 200, promoted.text
        assert promoted.json()["canary_version"] == "v2" and promoted.json()["stable_version"] == "v1"
        assert (await client.get(f"{url}/{MODEL}/shadow")).status_code == 404
        deadline = time.monotonic() + 10
        while (await client.get(f"{url}/{MODEL}")).json()["split"].get("v2") != 20:
            assert time.monotonic() < deadline, "the canary never took its first step"
            await asyncio.sleep(0.05)
        canary = (await client.get(f"{url}/{MODEL}/canary")).json()
        assert canary["status"] == "running" and canary["step_percent"] == 20
        both = await client.post(url, json={"model_name": MODEL, "version": "v3", "strategy": {"type": "shadow"}})
        assert both.status_code == 409 and "canary" in both.json()["error"]["message"]
        history = [h["action"] for h in (await client.get(f"{url}/{MODEL}")).json()["history"]]
        assert "shadow" in history and "shadow_promote" in history


async def test_a_predict_shadow_reports_label_agreement_and_score_differences(tmp_path: Path,
                                                                              example_models: Path) -> None:
    from tests.test_predict_api import XGB, features, predict_router
    from tests.test_predict_api import deploy as deploy_predict

    async with predict_router(tmp_path, example_models) as (router, client):
        repo = tmp_path / "models" / XGB
        shutil.copytree(repo / "v1", repo / "v2")
        await deploy_predict(client, XGB, "v2", 0, strategy={"type": "shadow", "sample_percent": 100})
        deadline = time.monotonic() + 10
        while (await client.get(f"/api/v1/deployments/{XGB}/shadow")).status_code != 200:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        rows = features(3)
        for n in range(10):
            response = await client.post(f"/api/v1/models/{XGB}/predict",
                                         json={"inputs": [{"features": row} for row in rows]},
                                         headers={"x-user-id": f"u{n}"})
            assert response.status_code == 200 and response.json()["version"] == "v1"
        await router.app.state.router.shadows.drain()
        report = (await client.get(f"/api/v1/deployments/{XGB}/shadow")).json()
    assert report["kind"] == "predict" and report["counts"]["compared"] == 10
    assert report["label_agreement"]["n"] == 30 and report["label_agreement"]["rate"] == 1.0  # the same model
    assert report["score_abs_diff"]["max"] == 0.0 and report["latency_ratio"]["n"] == 10
    assert report["examples"][0]["shadow"]["labels"] == report["examples"][0]["primary"]["labels"]


class HangingRelay:
    """A relay whose upstream never answers: a shadow that hangs."""

    def __init__(self) -> None:
        self.opened = 0

    def deadline(self) -> float:
        return time.monotonic() + 60

    async def open(self, *args: Any, **kwargs: Any) -> Any:
        self.opened += 1
        await asyncio.Event().wait()


async def test_a_hanging_shadow_never_delays_the_request_and_a_full_queue_drops_and_counts() -> None:
    import random
    from types import SimpleNamespace

    from router.observe.request_record import RequestRecord
    from router.traffic.shadow import Shadows

    served = SimpleNamespace(can_answer=True, versioned_name=f"{MODEL}:v2")
    catalog = SimpleNamespace(find=lambda _name: SimpleNamespace(versions={"v2": served}))
    relay = HangingRelay()
    shadows = Shadows(queue_size=2, workers=1, rng=random.Random(0))
    shadows.start(relay, None, catalog)  # type: ignore[arg-type]
    target = shadows.add(MODEL, "v2", 100)
    try:
        for n in range(5):
            record = RequestRecord(f"r{n}", "/v1/chat/completions", model=MODEL, version="v1")
            assert shadows.sample(record, "/v1/chat/completions", {"model": MODEL}, stream=True) is not None
            started = time.perf_counter()
            record.finish(200)  # the client's answer is complete: the replay is queued, never awaited
            assert time.perf_counter() - started < 0.05
            await asyncio.sleep(0.01)  # the worker takes the first and hangs in it
        counts = target.report.to_dict()["counts"]
        assert relay.opened == 1 and counts["sampled"] == 5
        assert counts["dropped_queue_full"] == 2  # one replaying, two queued, two dropped
    finally:
        await shadows.close()


async def test_a_shadow_outlives_a_router_restart(tmp_path: Path) -> None:
    async with v1_serving(tmp_path, factory()) as (r, client):
        await deploy_shadow(client, r.url, "v2", sample_percent=100)
    settings = RouterSettings(port=free_port(), retry_after_s=2, admission=AdmissionSettings(enabled=False),
                              auth=AuthSettings(enabled=True, admin_key=SecretStr(ADMIN)))
    async with run_router([], tmp_path, router_settings=settings, store=SQLiteStore(tmp_path / "db"),
                          program_factory=factory()) as r, httpx.AsyncClient(timeout=30, headers=AUTH) as client:
        shadow = await client.get(f"{r.url}/api/v1/deployments/{MODEL}/shadow")
        assert shadow.status_code == 200 and shadow.json()["sample_percent"] == 100, shadow.text
        deadline = time.monotonic() + 20
        while not r.app.state.router.catalog.find(MODEL).versions["v2"].can_answer:
            assert time.monotonic() < deadline, "the shadow's replica never got ready after the restart"
            await asyncio.sleep(0.05)
        for n in range(5):
            response = await chat(client, r.url, n=n)
            assert response.status_code == 200 and response.headers["x-model-version"] == "v1"
        await r.app.state.router.shadows.drain()
        assert (await client.get(f"{r.url}/api/v1/deployments/{MODEL}/shadow")).json()["counts"]["compared"] == 5
        deleted = await client.delete(f"{r.url}/api/v1/deployments/{MODEL}/versions/v2")
        assert deleted.status_code == 200
        assert (await client.get(f"{r.url}/api/v1/deployments/{MODEL}/shadow")).status_code == 404
