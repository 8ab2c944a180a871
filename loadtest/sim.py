"""A simulated OpenAI-compatible engine: vLLM's HTTP surface, no model.

It answers ``/health``, ``/v1/models``, ``/v1/completions`` and
``/v1/chat/completions`` (streaming or not, ``stream_options.include_usage``)
and exposes ``vllm:num_requests_running`` on ``/metrics``, with a chosen
time to first token and inter-token latency. Tests use it to exercise the
router's routing, relay and failure handling in milliseconds; capacity
planning can use it to load the router alone.

Run: ``python -m loadtest.sim --port 8200 --model demo:v1 demo --ttft-ms 20 --itl-ms 5``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route


@dataclass(frozen=True)
class SimConfig:
    served_names: tuple[str, ...] = ("sim",)
    ttft_ms: float = 20.0
    itl_ms: float = 5.0
    default_max_tokens: int = 16
    max_model_len: int = 2048


@dataclass
class _Counters:
    running: int = 0
    finished: int = 0
    aborted: int = 0


_WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "and", "runs", "far")


def _error(message: str, status: int = 400, param: str | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": "BadRequestError", "param": param, "code": status}}, status_code=status
    )


def build_app(config: SimConfig) -> Starlette:
    counters = _Counters()
    model_name = config.served_names[0]

    async def health(request: Request) -> Response:
        return Response(status_code=200)

    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [
            {"id": n, "object": "model", "owned_by": "sim", "max_model_len": config.max_model_len}
            for n in config.served_names]})

    async def metrics(request: Request) -> PlainTextResponse:
        lines = [
            f'vllm:num_requests_running{{model_name="{model_name}"}} {float(counters.running)}',
            f'vllm:num_requests_waiting{{model_name="{model_name}"}} 0.0',
            f'sim_requests_finished_total {counters.finished}',
            f'sim_requests_aborted_total {counters.aborted}',
        ]
        return PlainTextResponse("\n".join(lines) + "\n")

    async def generate(request: Request) -> Response:
        try:
            body: dict[str, Any] = await request.json()
        except ValueError:
            return _error("invalid JSON")
        if body.get("model") not in config.served_names:
            return _error(f"The model `{body.get('model')}` does not exist.", 404, "model")
        chat = request.url.path.endswith("/chat/completions")
        max_tokens = int(body.get("max_completion_tokens") or body.get("max_tokens") or config.default_max_tokens)
        if max_tokens > config.max_model_len:
            return _error(f"max_tokens={max_tokens} cannot be greater than max_model_len", 400, "max_tokens")
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        completion_id = ("chatcmpl-" if chat else "cmpl-") + request_id
        prompt_tokens = len(json.dumps(body.get("messages") or body.get("prompt") or "").split())
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(
                _stream(completion_id, chat, max_tokens, prompt_tokens, include_usage),
                media_type="text/event-stream",
            )
        counters.running += 1
        try:
            await asyncio.sleep((config.ttft_ms + config.itl_ms * (max_tokens - 1)) / 1000)
        finally:
            counters.running -= 1
        counters.finished += 1
        text = " ".join(_WORDS[i % len(_WORDS)] for i in range(max_tokens))
        choice: dict[str, Any] = {"index": 0, "finish_reason": "length"}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return JSONResponse({
            "id": completion_id, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model_name, "choices": [choice],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": max_tokens,
                      "total_tokens": prompt_tokens + max_tokens},
        })

    async def _stream(
        completion_id: str, chat: bool, max_tokens: int, prompt_tokens: int, include_usage: bool
    ) -> AsyncIterator[bytes]:
        counters.running += 1
        finished = False
        try:
            base = {"id": completion_id, "object": "chat.completion.chunk" if chat else "text_completion",
                    "created": int(time.time()), "model": model_name}
            await asyncio.sleep(config.ttft_ms / 1000)
            for i in range(max_tokens):
                if i:
                    await asyncio.sleep(config.itl_ms / 1000)
                word = ("" if i == 0 else " ") + _WORDS[i % len(_WORDS)]
                last = i == max_tokens - 1
                choice: dict[str, Any] = {"index": 0, "finish_reason": "length" if last else None}
                if chat:
                    choice["delta"] = {"content": word} if i else {"role": "assistant", "content": word}
                else:
                    choice["text"] = word
                yield b"data: " + json.dumps({**base, "choices": [choice]}).encode() + b"\n\n"
            if include_usage:
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": max_tokens,
                         "total_tokens": prompt_tokens + max_tokens}
                yield b"data: " + json.dumps({**base, "choices": [], "usage": usage}).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"
            finished = True
        finally:
            counters.running -= 1
            if finished:
                counters.finished += 1
            else:
                counters.aborted += 1

    return Starlette(routes=[
        Route("/health", health),
        Route("/v1/models", models),
        Route("/metrics", metrics),
        Route("/v1/completions", generate, methods=["POST"]),
        Route("/v1/chat/completions", generate, methods=["POST"]),
    ])


@dataclass(frozen=True)
class SimEngineProgram:
    """A ReplicaProgram that runs the simulated engine, for the supervisor and router tests."""

    model_name: str
    version: str
    ttft_ms: float = 20.0
    itl_ms: float = 5.0
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def versioned_name(self) -> str:
        return f"{self.model_name}:{self.version}"

    def command(self, host: str, port: int) -> list[str]:
        return [sys.executable, "-m", "loadtest.sim", "--host", host, "--port", str(port),
                "--model", self.versioned_name, self.model_name,
                "--ttft-ms", str(self.ttft_ms), "--itl-ms", str(self.itl_ms)]

    def environment(self) -> dict[str, str]:
        return dict(self.extra_env)


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m loadtest.sim", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8200)
    parser.add_argument("--model", nargs="+", default=["sim"], help="served names; the first goes in responses")
    parser.add_argument("--ttft-ms", type=float, default=20.0)
    parser.add_argument("--itl-ms", type=float, default=5.0)
    parser.add_argument("--max-model-len", type=int, default=2048)
    args = parser.parse_args(argv)
    config = SimConfig(tuple(args.model), args.ttft_ms, args.itl_ms, max_model_len=args.max_model_len)
    uvicorn.run(build_app(config), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
