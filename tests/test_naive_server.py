"""The naive baseline server: a valid stream the load runner reads, one request at a time, 4xx on bad input.

A tiny random Llama (two layers, width 16) with the bundled model's tokenizer
stands in for the real model, so each request takes milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import httpx
import pytest
import uvicorn

from llmserve.models.repository import ModelRepository
from llmserve.settings import Settings
from loadtest.naive_server import ChatMessage, Model, NaiveConfig, build_app
from loadtest.runner import Record, Target, send
from loadtest.workload import RequestSpec
from tests.conftest import free_port

NAME = "tiny"
CONFIG = NaiveConfig(served_names=(NAME, "tiny:v1"), max_model_len=256)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Model:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    settings = Settings()
    repository = ModelRepository(settings.model_repository)
    bundled = repository.version_dir(settings.model.name, "v1")
    if not (bundled / "tokenizer.json").is_file():  # only its tokenizer is needed: prepare it once per machine
        bundled = repository.prepare(settings.model.name, "v1").folder
    tokenizer = AutoTokenizer.from_pretrained(str(bundled))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return Model(folder, threads=1)


@contextlib.asynccontextmanager
async def serve(model: Model) -> AsyncIterator[str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(model, CONFIG), host="127.0.0.1", port=port, log_config=None))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


def gauge(text: str, name: str) -> float:
    return float(next(line for line in text.splitlines() if line.startswith(name + " ")).split()[1])


def events(body: str) -> list[str]:
    return [line.removeprefix("data: ") for line in body.split("\n\n") if line.startswith("data: ")]


async def test_a_chat_stream_is_valid_sse_with_usage_and_done(model: Model) -> None:
    async with serve(model) as url, httpx.AsyncClient(timeout=30) as client:
        assert (await client.get(f"{url}/health")).status_code == 200
        listed = (await client.get(f"{url}/v1/models")).json()
        assert [m["id"] for m in listed["data"]] == [NAME, "tiny:v1"]
        response = await client.post(f"{url}/v1/chat/completions", json={
            "model": NAME, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True, "temperature": 0})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    data = events(response.text)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    tokens, usage = chunks[:-1], chunks[-1]
    assert tokens and all(c["object"] == "chat.completion.chunk" and c["model"] == NAME for c in tokens)
    assert tokens[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [c["choices"][0]["finish_reason"] for c in tokens] == [None] * (len(tokens) - 1) + ["length"]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 8
    assert usage["usage"]["prompt_tokens"] == len(model.encode_chat([ChatMessage(role="user", content="hello")]))


async def test_greedy_streamed_and_unstreamed_completions_agree(model: Model) -> None:
    body = {"model": NAME, "prompt": "Once upon a time", "max_tokens": 6, "ignore_eos": True}
    async with serve(model) as url, httpx.AsyncClient(timeout=30) as client:
        whole = (await client.post(f"{url}/v1/completions", json=body)).json()
        streamed = await client.post(f"{url}/v1/completions", json={**body, "stream": True})
    pieces = [json.loads(d)["choices"][0]["text"] for d in events(streamed.text) if d != "[DONE]"]
    assert whole["usage"]["completion_tokens"] == 6 and whole["choices"][0]["finish_reason"] == "length"
    assert "".join(pieces) == whole["choices"][0]["text"]


async def test_concurrent_requests_are_served_one_at_a_time(model: Model) -> None:
    loop = asyncio.get_running_loop()
    async with serve(model) as url, aiohttp.ClientSession() as session:
        target = Target("naive", f"{url}/v1", api_key=None)
        records = [Record(index=i, target="naive", intended_s=0, sent_s=loop.time()) for i in range(4)]
        await asyncio.gather(*(
            send(session, target, NAME, RequestSpec(None, f"question {r.index}", 12, None, None), r, loop.time,
                 {"temperature": 0.0}) for r in records))
        async with session.get(f"{url}/metrics") as response:
            metrics = await response.text()
    # the load runner reads every stream in full: the server is a drop-in target for `loadtest bench`
    assert all(r.ok and r.complete and r.output_tokens == 12 for r in records), [r.error for r in records]
    assert gauge(metrics, "naive_requests_max_running") == 1
    assert gauge(metrics, "naive_requests_finished_total") == 4
    assert gauge(metrics, "naive_requests_running") == gauge(metrics, "naive_requests_waiting") == 0
    # and the streams did not interleave: each began only after the one before it had sent its last token
    spans = sorted((r.first_token_s or 0.0, (r.first_token_s or 0.0) + sum(r.itl_s)) for r in records)
    assert all(later[0] >= earlier[1] for earlier, later in zip(spans, spans[1:], strict=False))


@pytest.mark.parametrize(("path", "body", "status", "param"), [
    ("/v1/chat/completions", {"model": NAME}, 400, "messages"),
    ("/v1/chat/completions", {"model": NAME, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ("/v1/completions", {"model": "nope", "prompt": "hi"}, 404, "model"),
    ("/v1/completions", {"model": NAME}, 400, "prompt"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "temperature": 0.7}, 400, "temperature"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": 1000}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "robot", "content": "hi"}]}, 400,
     "messages.0.role"),
])
async def test_bad_input_is_a_4xx_json_error(model: Model, path: str, body: dict[str, object], status: int,
                                             param: str) -> None:
    transport = httpx.ASGITransport(app=build_app(model, CONFIG))
    async with httpx.AsyncClient(transport=transport, base_url="http://naive") as client:
        response = await client.post(path, json=body)
        not_json = await client.post(path, content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert error["param"] == param and error["code"] == status and error["message"]
    assert not_json.status_code == 400 and "JSON" in not_json.json()["error"]["message"]


def test_the_command_refuses_a_folder_without_a_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from loadtest.naive_server import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--model-dir", str(tmp_path), "--served-model-name", NAME])
    assert exit_info.value.code == 2
    assert "not a Hugging Face model folder" in capsys.readouterr().err
