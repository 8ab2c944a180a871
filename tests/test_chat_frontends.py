"""What a chat frontend does to the router, against simulated engines that behave as vLLM does.

The four defects a frontend pointed at ``/v1`` found: its tools refused, a long
non-streaming answer ejecting the only replica, answers without ``max_tokens``
running to the end of the context, and the router's own refusals missing from
metrics and logs.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
import time
from pathlib import Path

import httpx
import openai
import pytest

from llmserve.generation import GenerationDefaults
from llmserve.replicas.spec import EngineSpec
from llmserve.settings import AdmissionSettings, RouterSettings
from loadtest.sampling_quality import OPEN_PROMPTS, QUESTIONS, measure, parse_setting, repeated_share
from loadtest.sampling_quality import main as sampling_main
from loadtest.sim import SimEngineProgram
from loadtest.simstack import StaticVersion
from router.gateway.protocol import drop_tools
from router.store import InferenceLog
from router.store.sqlite import SQLiteStore
from tests.conftest import ScriptProgram, free_port, run_router
from tests.frontend_tools import frontend_tools
from tests.test_control_plane import MODEL, deploy, make_version, wait_status

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def sim(itl_ms: float = 2, generation: GenerationDefaults | None = None, *extra: str) -> list[StaticVersion]:
    program = SimEngineProgram("demo", "v1", ttft_ms=5, itl_ms=itl_ms, extra_args=tuple(extra),
                               generation=generation or GenerationDefaults(max_tokens=16))
    return [StaticVersion(program, 2048, 1)]


def settings(**overrides: object) -> RouterSettings:
    return RouterSettings(port=free_port(), retry_after_s=2, **overrides)  # type: ignore[arg-type]


def client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)


async def engine_counter(replica_url: str, name: str) -> float:
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{replica_url}/metrics")).text
    match = re.search(rf"^{name} ([0-9.]+)$", text, re.M)
    assert match, text
    return float(match.group(1))


# -- 1. tools ---------------------------------------------------------------------


async def test_a_chat_with_36_tools_gets_text_from_a_model_that_cannot_call_tools(tmp_path: Path) -> None:
    # The simulated engine answers tools with vLLM's 400 unless it runs with a tool-call parser: without
    # one the router must drop them, and the answer is text.
    async with run_router(sim(), tmp_path) as router:
        chat = await client(router.url).chat.completions.with_raw_response.create(
            model="demo", messages=QUESTION, tools=frontend_tools())
        assert chat.headers["x-tools-dropped"] == "36"
        assert chat.parse().choices[0].message.content
        stream = await client(router.url).chat.completions.create(
            model="demo", messages=QUESTION, tools=frontend_tools(), stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text


async def test_tools_reach_a_version_with_a_tool_call_parser(tmp_path: Path) -> None:
    tools = GenerationDefaults(max_tokens=16, tool_call_parser="hermes")
    async with run_router(sim(generation=tools), tmp_path) as router:
        plain = await client(router.url).chat.completions.with_raw_response.create(
            model="demo", messages=QUESTION, tools=frontend_tools())
        assert "x-tools-dropped" not in plain.headers and plain.parse().choices[0].message.content
        forced = await client(router.url).chat.completions.create(
            model="demo", messages=QUESTION, tools=frontend_tools(),
            tool_choice={"type": "function", "function": {"name": "get_weather"}})
        call = forced.choices[0].message.tool_calls
        assert forced.choices[0].finish_reason == "tool_calls" and call and call[0].function.name == "get_weather"
        models = (await client(router.url).models.list()).data
        assert [m.model_extra["tool_calling"] for m in models] == [True]


# -- 2. a slow answer ---------------------------------------------------------------


async def test_a_non_streaming_answer_past_its_budget_is_504_and_the_replica_stays(tmp_path: Path) -> None:
    # 300 tokens 20 ms apart: six seconds, against a one-second budget. Socket read timeouts as short
    # as the budget: before the fix, the socket timeout took the "refused: eject" path.
    short = settings(request_timeout_s=1.0, first_token_timeout_s=1.0, idle_stream_timeout_s=1.0)
    async with run_router(sim(itl_ms=20), tmp_path, router_settings=short) as router, \
            httpx.AsyncClient(timeout=30) as http:
        replica = router.backend.supervisor.replicas[0]
        started = time.perf_counter()
        slow = await http.post(f"{router.url}/v1/chat/completions",
                               json={"model": "demo", "messages": QUESTION, "max_tokens": 300})
        assert slow.status_code == 504, slow.text
        assert 0.9 < time.perf_counter() - started < 3
        error = slow.json()["error"]
        assert error["code"] == "request_timeout" and "max_tokens" in error["message"]
        assert slow.headers["x-served-by"] == "demo:v1/0"
        assert replica.state.value == "ready"
        after = await http.post(f"{router.url}/v1/chat/completions",
                                json={"model": "demo", "messages": QUESTION, "max_tokens": 3})
        assert after.status_code == 200, after.text
        deadline = time.monotonic() + 5  # the engine learns of the abort when the connection closes
        while await engine_counter(replica.base_url, "sim_requests_aborted_total") < 1:
            assert time.monotonic() < deadline, "the engine request was not aborted"
            await asyncio.sleep(0.05)


async def test_a_stream_past_its_budget_ends_with_a_timeout_event(tmp_path: Path) -> None:
    async with run_router(sim(itl_ms=20), tmp_path, router_settings=settings(request_timeout_s=0.5)) as router:
        stream = await client(router.url).chat.completions.create(
            model="demo", messages=QUESTION, max_tokens=300, stream=True)
        chunks = []
        with pytest.raises(openai.APIError) as raised:
            async for chunk in stream:
                chunks.append(chunk)
        assert len(chunks) > 3 and "time budget" in str(raised.value)
        assert router.backend.supervisor.replicas[0].state.value == "ready"
        generate = await httpx.AsyncClient(timeout=30).post(
            f"{router.url}/api/v1/models/demo/generate", json={"prompt": "hi", "max_tokens": 300})
        assert generate.status_code == 504 and generate.json()["error"]["code"] == "request_timeout"


async def test_a_stream_with_no_first_token_in_time_ends_with_an_error_without_ejecting(tmp_path: Path) -> None:
    hangs = sim(2, None, "--hang-rate", "1")
    quick = settings(first_token_timeout_s=0.5, idle_stream_timeout_s=0.5)
    async with run_router(hangs, tmp_path, router_settings=quick) as router, httpx.AsyncClient(timeout=30) as http:
        replica = router.backend.supervisor.replicas[0]
        body = {"model": "demo", "messages": QUESTION, "stream": True}
        # Nothing has reached the client while the router waits for the first token, so the answer
        # is a 504 it can act on (with Retry-After), as when no status line comes in time.
        response = await http.post(f"{router.url}/v1/chat/completions", json=body)
        assert response.status_code == 504 and response.headers["retry-after"]
        error = response.json()["error"]
        assert error["code"] == "first_token_timeout" and "retry" in error["message"]
        assert replica.state.value == "ready"
        deadline = time.monotonic() + 5
        while await engine_counter(replica.base_url, "sim_requests_aborted_total") < 1:
            assert time.monotonic() < deadline, "the engine request was not aborted"
            await asyncio.sleep(0.05)


# -- 3. max_tokens ------------------------------------------------------------------


async def test_requests_without_max_tokens_end_at_the_versions_default(tmp_path: Path) -> None:
    defaults = GenerationDefaults(max_tokens=7, max_tokens_limit=100)
    async with run_router(sim(generation=defaults), tmp_path) as router, httpx.AsyncClient(timeout=30) as http:
        chat = await client(router.url).chat.completions.create(model="demo", messages=QUESTION)
        assert chat.usage.completion_tokens == 7 and chat.choices[0].finish_reason == "length"
        generate = await http.post(f"{router.url}/api/v1/models/demo/generate", json={"prompt": "hi"})
        assert generate.json()["usage"]["completion_tokens"] == 7
        too_many = await http.post(f"{router.url}/v1/chat/completions",
                                   json={"model": "demo", "messages": QUESTION, "max_tokens": 101})
        assert too_many.status_code == 400
        error = too_many.json()["error"]
        assert error["code"] == "max_tokens_too_large" and error["param"] == "max_tokens"
        assert "at most 100" in error["message"]
        models = (await http.get(f"{router.url}/v1/models")).json()["data"]
        assert [(m["id"], m["max_tokens_default"], m["max_tokens_limit"]) for m in models] == [("demo", 7, 100)]


async def test_version_aliases_are_listed_only_when_asked(tmp_path: Path) -> None:
    async with run_router(sim(), tmp_path, router_settings=settings(list_version_aliases=True)) as router:
        ids = [m.id for m in (await client(router.url).models.list()).data]
        assert ids == ["demo", "demo:v1"]
        pinned = await client(router.url).chat.completions.create(model="demo:v1", messages=QUESTION, max_tokens=2)
        assert pinned.model == "demo:v1"


# -- 4. every response counted ------------------------------------------------------


async def test_every_status_is_counted_logged_and_written_once(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="router")
    store = SQLiteStore(tmp_path / "db")
    never_ready = StaticVersion(ScriptProgram("import time; time.sleep(120)", model_name="cold"), 2048, 1)
    config = settings(request_timeout_s=1.0, max_body_bytes=2048,
                      admission=AdmissionSettings(max_outstanding_per_replica=1, queue_wait_s=0))
    async with run_router([*sim(itl_ms=20), never_ready], tmp_path, router_settings=config, store=store,
                          wait_ready=False) as router, httpx.AsyncClient(timeout=30) as http:
        await router.backend.supervisor.wait_ready(router.backend.supervisor.replicas[0])
        chat = f"{router.url}/v1/chat/completions"
        body = {"model": "demo", "messages": QUESTION, "max_tokens": 2}
        statuses = {
            200: await http.post(chat, json=body),
            400: await http.post(chat, content=b"{not json"),
            404: await http.post(chat, json={**body, "model": "nope"}),
            413: await http.post(chat, content=b"x" * 4096),
            503: await http.post(chat, json={**body, "model": "cold"}),
            504: await http.post(chat, json={**body, "max_tokens": 300}),
        }
        # one request in flight saturates demo (max 1 per replica): batch traffic is refused
        holding = asyncio.create_task(http.post(chat, json={**body, "max_tokens": 40}))
        await asyncio.sleep(0.3)
        statuses[429] = await http.post(chat, json=body, headers={"x-priority": "batch"})
        await holding
        assert {code: r.status_code for code, r in statuses.items()} == {code: code for code in statuses}
        ids = {code: r.headers["x-request-id"] for code, r in statuses.items()}
        metrics = (await http.get(f"{router.url}/metrics")).text
        await asyncio.sleep(0.8)  # the inference log writer flushes every 0.5 s
        rows = {row.request_id: row for row in await store.inference_logs(time.strftime("%Y%m%d", time.gmtime()))}
    for code in statuses:
        counted = re.findall(rf'^llmserve_requests_total{{[^}}]*status="{code}"[^}}]*}} ([0-9.]+)$', metrics, re.M)
        assert sum(float(c) for c in counted) == (2 if code == 200 else 1), (code, counted)
        request_lines = [r for r in caplog.records if r.name == "router.requests" and ids[code] in r.getMessage()]
        assert len(request_lines) == 1 and f"status={code}" in request_lines[0].getMessage(), code
        access = [r for r in caplog.records if r.name == "router.access" and ids[code] in r.getMessage()]
        assert len(access) == 1 and f" {code} " in access[0].getMessage(), (code, [a.getMessage() for a in access])
    reasons = {code: (rows[ids[code]].status_code, rows[ids[code]].reason) for code in statuses}
    assert reasons == {200: (200, None), 400: (400, "invalid_json"), 404: (404, "model_not_found"),
                       413: (413, "payload_too_large"), 503: (503, "no_replica_ready"),
                       504: (504, "request_timeout"), 429: (429, "overloaded")}
    assert rows[ids[503]].model_name == "cold" and rows[ids[404]].model_name == ""
    assert all(rows[ids[code]].route == "/v1/chat/completions" for code in statuses)


# -- per-version generation settings through the control plane ------------------------


def generation_factory(spec: EngineSpec) -> SimEngineProgram:
    """As ``llmserve up`` builds an engine: the router's engine settings with the version's overrides."""
    return SimEngineProgram(spec.model_name, spec.version, ttft_ms=5, itl_ms=2, generation=spec.generation)


async def test_a_deployment_sets_its_own_generation_defaults(tmp_path: Path) -> None:
    async with run_router([], tmp_path, store=SQLiteStore(tmp_path / "db"), program_factory=generation_factory) \
            as router, httpx.AsyncClient(timeout=30) as http:
        for version in ("v1", "v2"):
            make_version(tmp_path / "models", version)
        assert (await http.post(f"{router.url}/api/v1/models", json={"model_name": MODEL})).status_code == 201
        await deploy(http, router.url, "v1", 100, engine={"max_tokens_default": 9, "tool_call_parser": "none"})
        answer = await http.post(f"{router.url}/v1/chat/completions",
                                 json={"model": MODEL, "messages": QUESTION, "tools": frontend_tools()})
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 9
        assert answer.headers["x-tools-dropped"] == "36"
        # overrides that do not fit the router's settings fail the deployment, with the reason
        refused = await http.post(f"{router.url}/api/v1/deployments", json={
            "model_name": MODEL, "version": "v2", "engine": {"max_tokens_default": 4000}})
        assert refused.status_code == 202
        state = await wait_status(http, router.url, "v2", "failed")
        failed = next(v for v in state["versions"] if v["version"] == "v2")
        assert "max_tokens_default" in failed["reason"]
        contradictory = await http.post(f"{router.url}/api/v1/deployments", json={
            "model_name": MODEL, "version": "v2", "engine": {"max_tokens_default": 90, "max_tokens_limit": 80}})
        assert contradictory.status_code == 400 and "max_tokens_limit" in contradictory.json()["error"]["message"]


# -- the pieces -----------------------------------------------------------------------


def test_drop_tools_takes_out_every_tool_field() -> None:
    payload = {"model": "m", "messages": QUESTION, "tools": frontend_tools(), "tool_choice": "auto",
               "parallel_tool_calls": True, "functions": [{"name": "f"}], "function_call": "auto"}
    assert drop_tools(payload) == 37
    assert payload == {"model": "m", "messages": QUESTION}
    assert drop_tools({"model": "m"}) == 0


async def test_inference_log_tables_of_an_older_version_gain_the_new_columns(tmp_path: Path) -> None:
    path = tmp_path / "db"
    old = sqlite3.connect(path)
    day = time.strftime("%Y%m%d", time.gmtime())
    old.execute(f"CREATE TABLE inference_logs_{day} (request_id TEXT, model_name TEXT, version TEXT, replica TEXT, "
                "user_bucket INTEGER, ttft_ms REAL, latency_ms REAL, output_tokens INTEGER, status_code INTEGER, "
                "timestamp REAL)")
    old.execute(f"INSERT INTO inference_logs_{day} VALUES ('old', 'm', 'v1', 'm:v1/0', 1, 5.0, 9.0, 3, 200, ?)",
                (time.time() - 1,))
    old.commit()
    old.close()
    store = SQLiteStore(path)
    await store.write_inference_logs([InferenceLog("new", "", "", "", None, None, 1.0, None, 404,
                                                   route="/v1/chat/completions", reason="model_not_found")])
    rows = await store.inference_logs(day)
    assert [(r.request_id, r.status_code, r.route, r.reason) for r in rows] == [
        ("old", 200, "", None), ("new", 404, "/v1/chat/completions", "model_not_found")]
    await store.close()


async def test_the_sampling_measurement_runs_on_a_tiny_configuration(tmp_path: Path) -> None:
    async with run_router(sim(), tmp_path) as router:
        results = await measure(f"{router.url}/v1", "demo", [parse_setting("temperature=0"), parse_setting("")],
                                samples=2, open_samples=1, concurrency=4, fact_tokens=4, open_tokens=8,
                                questions=QUESTIONS[:2], open_prompts=OPEN_PROMPTS[:1])
    assert [r["setting"] for r in results] == ["temperature=0", "engine default"]
    assert all(r["accuracy"] == 0.0 for r in results)  # the simulated engine knows no capitals
    assert repeated_share("a b c d a b c d a b c d") == pytest.approx(1 - 4 / 9)
    for bad in ("temperature", "beam=2", "temperature=hot"):
        with pytest.raises(ValueError, match="bad setting"):
            parse_setting(bad)
    with pytest.raises(SystemExit) as exited:
        sampling_main(["--url", "http://127.0.0.1:9", "--model", "m", "--samples", "0"])
    assert exited.value.code == 2
