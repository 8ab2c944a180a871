"""End to end through the router to a real vLLM engine serving SmolLM2-135M-Instruct.

The replica-kill test restarts the engine, so it comes last in this file.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time

import httpx
import openai
import pytest

from tests.e2e.conftest import MAX_TOKENS_DEFAULT, MODEL, Stack
from tests.frontend_tools import frontend_tools

pytestmark = pytest.mark.engine

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def engine_gauge(base_url: str, name: str) -> float:
    text = httpx.get(f"{base_url}/metrics", timeout=5).text
    match = re.search(rf"^{re.escape(name)}\{{[^}}]*\}} ([0-9.eE+-]+)$", text, re.M)
    assert match, f"{name} not in the engine's metrics"
    return float(match.group(1))


def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=stack.key, max_retries=0, timeout=120)


def test_the_replicas_api_and_the_engine_log_say_which_settings_the_hardware_chose(stack: Stack) -> None:
    from llmserve.replicas.hardware import Hardware
    from llmserve.replicas.tuning import choose

    replica = stack.replica()
    chosen = replica["engine_settings"]
    assert isinstance(chosen, dict) and set(chosen) == {"dtype", "enforce_eager", "kv_cache_gib", "cpu_threads"}
    expected = choose(Hardware.detect())
    assert chosen["dtype"] == {"value": expected.dtype.value, "reason": expected.dtype.reason, "source": "hardware"}
    assert chosen["kv_cache_gib"]["source"] == "set"  # the test stack sets LLMSERVE_ENGINE__KV_CACHE_GIB
    assert replica["cpus"]["cores"] and float(replica["start_s"]) > 0  # type: ignore[index, arg-type]
    log = next((stack.data_dir / "logs" / "replicas").glob("*.log")).read_text(errors="replace")
    assert f"dtype = {expected.dtype.value} (hardware: " in log and f"--dtype {expected.dtype.value}" in log


def test_openai_client_streams_a_chat_completion_token_by_token(stack: Stack) -> None:
    stream = client(stack).chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=32, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) > 1
    assert "Paris" in text
    # usage counts the end-of-sequence token too, which carries no text
    assert chunks[-1].usage is not None
    assert len(content_chunks) <= chunks[-1].usage.completion_tokens <= len(content_chunks) + 1
    assert {c.model for c in chunks} == {f"{MODEL}:v1"}


def test_the_raw_stream_ends_with_done(stack: Stack) -> None:
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 8, "stream": True}
    with stack.http.stream("POST", f"{stack.url}/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-model-version"] == "v1"
        # the one live replica (v1/0, or v1/1 once the autoscaling test has scaled v1 up and back down)
        assert response.headers["x-served-by"] == stack.replica()["id"]
        data = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]" and len(data) > 2


def test_non_streaming_chat_and_completions(stack: Stack) -> None:
    raw = client(stack).chat.completions.with_raw_response.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=32
    )
    chat = raw.parse()
    assert "Paris" in chat.choices[0].message.content
    assert chat.model == f"{MODEL}:v1"
    assert raw.headers["x-model-version"] == "v1" and raw.headers["x-request-id"]
    completion = client(stack).completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5,
                                                  temperature=0)
    assert completion.choices[0].text.strip()
    assert completion.usage.completion_tokens > 0
    models = {m.id for m in client(stack).models.list().data}
    assert MODEL in models and f"{MODEL}:v1" not in models  # a chat frontend's picker shows each model once


def test_generate_api_streams_deltas_and_reports_usage_and_version(stack: Stack) -> None:
    body = {"prompt": "What is the capital of France?", "max_tokens": 24, "stream": True,
            "params": {"temperature": 0}}
    events: list[tuple[str, dict[str, object]]] = []
    with stack.http.stream("POST", f"{stack.url}/api/v1/models/{MODEL}/generate", json=body, timeout=120) as response:
        assert response.status_code == 200
        event = ""
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                events.append((event, json.loads(line[6:])))
    tokens = [d["text"] for e, d in events if e == "token"]
    done = [d for e, d in events if e == "done"]
    assert len(tokens) > 1 and "Paris" in "".join(tokens)
    assert len(done) == 1 and done[0]["version"] == "v1"
    assert len(tokens) <= done[0]["usage"]["completion_tokens"] <= len(tokens) + 1


def test_client_disconnect_aborts_the_engine_request(stack: Stack) -> None:
    engine = str(stack.replica()["url"])
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with stack.http.stream("POST", f"{stack.url}/v1/chat/completions", json=body, timeout=120) as response:
        lines = response.iter_lines()  # kept open: the connection stays up while we look
        data = [line for line in (next(lines) for _ in range(6)) if line.startswith("data: ")]
        assert len(data) >= 2
        # The engine's gauges lag its first steps a little; wait for it to show the request.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and engine_gauge(engine, "vllm:num_requests_running") != 1.0:
            time.sleep(0.1)
        assert engine_gauge(engine, "vllm:num_requests_running") == 1.0
        generated_before = engine_gauge(engine, "vllm:generation_tokens_total")
    # The client hung up with ~1,500 tokens still to go.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and engine_gauge(engine, "vllm:num_requests_running") != 0.0:
        time.sleep(0.2)
    assert engine_gauge(engine, "vllm:num_requests_running") == 0.0
    generated_after = engine_gauge(engine, "vllm:generation_tokens_total")
    assert generated_after - generated_before < 1000, "the engine kept generating after the disconnect"
    assert stack.replica()["outstanding"] == 0


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": MODEL, "messages": []}, 400, "messages"),
        ({"model": MODEL, "messages": QUESTION, "max_tokens": 0}, 400, "max_tokens"),
        ({"model": MODEL, "messages": QUESTION, "max_tokens": 4096}, 400, "max_tokens"),
        ({"model": "gpt-4", "messages": QUESTION}, 404, "model"),
        ({"model": f"{MODEL}:v0", "messages": QUESTION}, 404, "version"),
    ],
)
def test_bad_input_against_the_real_stack(stack: Stack, body: dict[str, object], status: int, param: str) -> None:
    response = stack.http.post(f"{stack.url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == status
    assert response.json()["error"]["param"] == param


def test_a_prompt_longer_than_the_context_gets_the_engines_400(stack: Stack) -> None:
    long_prompt = "word " * 2500
    response = stack.http.post(
        f"{stack.url}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": long_prompt}], "max_tokens": 10},
        timeout=60,
    )
    assert response.status_code == 400
    assert "error" in response.json() and "Traceback" not in response.text
    # and the engine is still fine
    ok = stack.http.post(f"{stack.url}/v1/chat/completions",
                    json={"model": MODEL, "messages": QUESTION, "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200


def test_a_chat_frontends_request_with_36_tools_gets_an_answer(stack: Stack) -> None:
    # as a frontend sends it on every browser chat: its tools, no tool_choice, no max_tokens, no temperature
    raw = client(stack).chat.completions.with_raw_response.create(model=MODEL, messages=QUESTION,
                                                                  tools=frontend_tools())
    assert raw.status_code == 200 and "x-tools-dropped" not in raw.headers  # the engine parses tool calls
    message = raw.parse().choices[0].message
    # the chat template does not render tools, so the model answers in text, greedily by default
    assert "Paris" in (message.content or "")
    chunks = list(client(stack).chat.completions.create(model=MODEL, messages=QUESTION, tools=frontend_tools(),
                                                        stream=True))
    assert any(c.choices and (c.choices[0].delta.content or c.choices[0].delta.tool_calls) for c in chunks)


def test_an_answer_without_max_tokens_ends_at_the_versions_default(stack: Stack) -> None:
    listed = stack.http.get(f"{stack.url}/v1/models", timeout=10).json()["data"]
    default = next(m["max_tokens_default"] for m in listed if m["id"] == MODEL)
    essay = [{"role": "user", "content": "Write a long essay about the history of Rome."}]
    answer = client(stack).chat.completions.create(model=MODEL, messages=essay, extra_body={"ignore_eos": True})
    assert answer.usage.completion_tokens == default == MAX_TOKENS_DEFAULT
    assert answer.choices[0].finish_reason == "length"


def engine_pid(guard_pid: int) -> int:
    with open(f"/proc/{guard_pid}/task/{guard_pid}/children") as fh:
        return int(fh.read().split()[0])


def test_killed_replica_is_restarted_and_in_flight_requests_fail_clearly(stack: Stack) -> None:
    replica = stack.replica()
    victim = engine_pid(int(replica["pid"]))
    outcome: dict[str, object] = {}

    def in_flight() -> None:
        try:
            stream = client(stack).chat.completions.create(
                model=MODEL, messages=QUESTION, max_tokens=1500, stream=True, extra_body={"ignore_eos": True}
            )
            for _ in stream:
                outcome.setdefault("first_chunk", time.monotonic())
            outcome["result"] = "completed"
        except openai.APIError as exc:
            outcome["result"] = f"error: {exc}"

    thread = threading.Thread(target=in_flight)
    thread.start()
    deadline = time.monotonic() + 60
    while "first_chunk" not in outcome and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(victim, signal.SIGKILL)
    thread.join(timeout=30)
    assert not thread.is_alive(), "the in-flight stream hung after its replica died"
    assert str(outcome["result"]).startswith("error:") and "incomplete" in str(outcome["result"])

    # While it restarts, requests are refused quickly and clearly.
    during = stack.http.post(f"{stack.url}/v1/chat/completions",
                        json={"model": MODEL, "messages": QUESTION, "max_tokens": 2}, timeout=30)
    assert during.status_code in (200, 503)
    if during.status_code == 503:
        assert during.headers["retry-after"] == "2"

    deadline = time.monotonic() + 600
    restarted = stack.replica()
    while time.monotonic() < deadline and not (
        restarted["restarts"] == int(replica["restarts"]) + 1 and restarted["state"] == "ready"
    ):
        time.sleep(0.5)
        restarted = stack.replica()
    assert restarted["state"] == "ready"
    assert restarted["restarts"] == int(replica["restarts"]) + 1
    assert restarted["pid"] != replica["pid"]
    answer = client(stack).chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=32)
    assert "Paris" in answer.choices[0].message.content
