"""Every bad input gets the right 4xx and an OpenAI-shaped JSON error; nothing reaches a 500."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio

from loadtest.sim import SimEngineProgram
from loadtest.simstack import StaticVersion
from tests.conftest import RunningRouter, run_router

pytestmark = pytest.mark.asyncio(loop_scope="module")

CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def router(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningRouter]:
    deployments = [StaticVersion(SimEngineProgram("demo", "v1"), 2048, 1)]
    async with run_router(deployments, tmp_path_factory.mktemp("bad-input")) as running:
        yield running


@pytest.mark.parametrize(
    ("path", "body", "status", "code", "param"),
    [
        ("/v1/chat/completions", b"{not json", 400, "invalid_json", None),
        ("/v1/chat/completions", b"[1, 2]", 400, "invalid_json", None),
        ("/v1/chat/completions", b"", 400, "invalid_json", None),
        ("/v1/chat/completions", {"model": "demo", "messages": []}, 400, "invalid_request", "messages"),
        ("/v1/chat/completions", {"model": "demo"}, 400, "invalid_request", "messages"),
        ("/v1/chat/completions", {**CHAT, "max_tokens": 0}, 400, "invalid_request", "max_tokens"),
        ("/v1/chat/completions", {**CHAT, "max_tokens": "5"}, 400, "invalid_request", "max_tokens"),
        ("/v1/chat/completions", {**CHAT, "max_tokens": 100000}, 400, "context_length_exceeded", "max_tokens"),
        ("/v1/chat/completions", {**CHAT, "temperature": "hot"}, 400, "invalid_request", "temperature"),
        ("/v1/chat/completions", {**CHAT, "stream": "yes"}, 400, "invalid_request", "stream"),
        ("/v1/chat/completions", {"model": "demo", "messages": [{"role": "robot", "content": "x"}]}, 400,
         "invalid_request", "messages[0].role"),
        ("/v1/chat/completions", {**CHAT, "model": "nope"}, 404, "model_not_found", "model"),
        ("/v1/chat/completions", {**CHAT, "model": "demo:v9"}, 404, "version_not_found", "version"),
        ("/v1/completions", {"model": "demo", "prompt": "x", "max_tokens": -1}, 400, "invalid_request", "max_tokens"),
        ("/v1/completions", {"model": "demo"}, 400, "invalid_request", "prompt"),
        ("/api/v1/models/demo/generate", {"prompt": "", "max_tokens": 5}, 400, "invalid_request", "prompt"),
        ("/api/v1/models/demo/generate", {"prompt": "x", "max_tokens": 0}, 400, "invalid_request", "max_tokens"),
        ("/api/v1/models/nope/generate", {"prompt": "x"}, 404, "model_not_found", "model"),
        ("/api/v1/models/demo/generate", {"prompt": "x", "bogus": 1}, 400, "invalid_request", "bogus"),
    ],
)
async def test_bad_input_gets_a_clear_4xx(
    router: RunningRouter, path: str, body: object, status: int, code: str, param: str | None
) -> None:
    async with httpx.AsyncClient() as client:
        if isinstance(body, bytes):
            response = await client.post(router.url + path, content=body, headers={"content-type": "application/json"})
        else:
            response = await client.post(router.url + path, json=body)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["code"] == code
        assert error["param"] == param
        assert error["type"] == "invalid_request_error"
        assert error["message"] and "Traceback" not in response.text


async def test_oversized_body_is_413(router: RunningRouter) -> None:
    async with httpx.AsyncClient() as client:
        big = {**CHAT, "messages": [{"role": "user", "content": "x" * (2 << 20)}]}
        response = await client.post(f"{router.url}/v1/chat/completions", json=big)
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "payload_too_large"

        async def chunks():  # no Content-Length: the limit is enforced while reading
            for _ in range(40):
                yield b"x" * 65536

        response = await client.post(f"{router.url}/v1/chat/completions", content=chunks())
        assert response.status_code == 413
