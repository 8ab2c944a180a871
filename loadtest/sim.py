"""A simulated OpenAI-compatible engine: vLLM's HTTP surface, no model.

It answers ``/health``, ``/v1/models``, ``/v1/completions`` and
``/v1/chat/completions`` (streaming or not, ``stream_options.include_usage``)
and exposes vLLM's metric names on ``/metrics`` (running and waiting requests,
KV-cache usage). Its timing follows a capacity model, so saturation behaves
like a real engine:

- at most ``max_running`` sequences run; the rest wait in a FIFO queue;
- TTFT and inter-token latency are drawn from log-normal distributions with
  the given means and coefficient of variation, and both grow with the
  number of running sequences (``load_slowdown`` at full capacity);
- fault knobs: an error rate (500 before anything is sent), a hang before the
  first token, dropping the stream after k tokens, and a slow start (503 on
  ``/health`` for the first seconds).

Like vLLM it refuses ``tools`` with an automatic tool choice unless started
with ``--enable-auto-tool-choice``, takes ``max_tokens`` from its generation
defaults (``--default-max-tokens``) when a request sets none, and aborts a
non-streaming request whose client disconnects.

Tests use it to exercise the router's routing, relay and failure handling in
milliseconds; capacity planning can run many of them on one machine.

Run: ``python -m loadtest.sim --port 8200 --model demo:v1 demo --ttft-ms 20 --itl-ms 5``
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import random
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

from llmserve.generation import GenerationDefaults


@dataclass(frozen=True)
class SimConfig:
    served_names: tuple[str, ...] = ("sim",)
    ttft_ms: float = 20.0
    itl_ms: float = 5.0
    jitter_cv: float = 0.0  # coefficient of variation of TTFT and ITL (0: fixed)
    default_max_tokens: int = 16
    max_model_len: int = 2048
    max_running: int = 256
    load_slowdown: float = 0.0  # latency multiplier added at full capacity (1.0: twice as slow)
    kv_cache_tokens: int = 1_000_000
    error_rate: float = 0.0
    hang_rate: float = 0.0
    hang_s: float = 3600.0
    drop_rate: float = 0.0
    drop_after_tokens: int = 3
    slow_start_s: float = 0.0
    enable_auto_tool_choice: bool = False
    seed: int | None = None
    word_offset: int = 0  # where in its word cycle the text starts: another offset, another greedy answer


@dataclass
class _State:
    running: int = 0
    waiting: int = 0
    running_tokens: int = 0
    finished: int = 0
    aborted: int = 0
    started_at: float = field(default_factory=time.monotonic)
    queue: collections.deque[asyncio.Future[None]] = field(default_factory=collections.deque)


_WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "and", "runs", "far")


class _DropStream(Exception):
    """Raised inside a stream to cut the connection, as a crashing engine would."""


def _error(message: str, status: int = 400, param: str | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": "BadRequestError", "param": param, "code": status}}, status_code=status
    )


class _Engine:
    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.state = _State()
        self.rng = random.Random(config.seed)

    def draw_ms(self, mean_ms: float) -> float:
        """A log-normal delay with the configured mean and CV, slowed by the current load."""
        load = self.state.running / max(1, self.config.max_running)
        mean = mean_ms * (1 + self.config.load_slowdown * load)
        cv = self.config.jitter_cv
        if cv <= 0 or mean <= 0:
            return mean
        sigma2 = math.log(1 + cv * cv)
        return self.rng.lognormvariate(math.log(mean) - sigma2 / 2, math.sqrt(sigma2))

    async def admit(self) -> None:
        """Wait for a running slot (FIFO), as the engine's scheduler queues requests."""
        if self.state.running < self.config.max_running and not self.state.queue:
            self.state.running += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.state.queue.append(waiter)
        self.state.waiting += 1
        try:
            await waiter
        except BaseException:
            if waiter in self.state.queue:
                self.state.queue.remove(waiter)
            elif not waiter.cancelled():
                self.release()  # the slot was handed over as we were cancelled
            raise
        finally:
            self.state.waiting -= 1

    def release(self) -> None:
        while self.state.queue:
            waiter = self.state.queue.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes straight to the next in line
                return
        self.state.running -= 1


def build_app(config: SimConfig) -> Starlette:
    engine = _Engine(config)
    state = engine.state
    model_name = config.served_names[0]

    async def health(request: Request) -> Response:
        starting = time.monotonic() - state.started_at < config.slow_start_s
        return Response(status_code=503 if starting else 200)

    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [
            {"id": n, "object": "model", "owned_by": "sim", "max_model_len": config.max_model_len}
            for n in config.served_names]})

    async def metrics(request: Request) -> PlainTextResponse:
        label = f'{{model_name="{model_name}"}}'
        usage = min(1.0, state.running_tokens / config.kv_cache_tokens)
        lines = [
            f"vllm:num_requests_running{label} {float(state.running)}",
            f"vllm:num_requests_waiting{label} {float(state.waiting)}",
            f"vllm:kv_cache_usage_perc{label} {usage}",
            f"sim_requests_finished_total {state.finished}",
            f"sim_requests_aborted_total {state.aborted}",
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
        if chat and body.get("tools") and body.get("tool_choice", "auto") == "auto" \
                and not config.enable_auto_tool_choice:
            return _error('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set')
        max_tokens = int(body.get("max_completion_tokens") or body.get("max_tokens") or config.default_max_tokens)
        if max_tokens > config.max_model_len:
            return _error(f"max_tokens={max_tokens} cannot be greater than max_model_len", 400, "max_tokens")
        if config.error_rate and engine.rng.random() < config.error_rate:
            return JSONResponse({"error": {"message": "simulated engine error", "type": "InternalServerError",
                                           "param": None, "code": 500}}, status_code=500)
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        completion_id = ("chatcmpl-" if chat else "cmpl-") + request_id
        prompt_tokens = len(json.dumps(body.get("messages") or body.get("prompt") or "").split())
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(
                _stream(completion_id, chat, max_tokens, prompt_tokens, include_usage),
                media_type="text/event-stream",
            )
        await engine.admit()
        state.running_tokens += prompt_tokens + max_tokens
        try:
            delay = engine.draw_ms(config.ttft_ms) + sum(engine.draw_ms(config.itl_ms) for _ in range(max_tokens - 1))
            if not await _sleep_unless_disconnected(request, delay / 1000):
                state.aborted += 1  # vLLM's with_cancellation: a gone client aborts the request
                return Response(status_code=499)
        finally:
            state.running_tokens -= prompt_tokens + max_tokens
            engine.release()
        state.finished += 1
        text = " ".join(_WORDS[(i + config.word_offset) % len(_WORDS)] for i in range(max_tokens))
        choice: dict[str, Any] = {"index": 0, "finish_reason": "length"}
        forced = _forced_tool(body) if chat else None
        if forced is not None:  # a required or named tool choice: the engine answers with a call
            choice["finish_reason"] = "tool_calls"
            choice["message"] = {"role": "assistant", "content": None, "tool_calls": [{
                "id": f"call-{request_id[:8]}", "type": "function", "function": {"name": forced, "arguments": "{}"}}]}
        elif chat:
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
        finished = False
        admitted = False
        drop_at = config.drop_after_tokens if config.drop_rate and engine.rng.random() < config.drop_rate else None
        try:
            await engine.admit()
            admitted = True
            state.running_tokens += prompt_tokens + max_tokens
            base = {"id": completion_id, "object": "chat.completion.chunk" if chat else "text_completion",
                    "created": int(time.time()), "model": model_name}
            if config.hang_rate and engine.rng.random() < config.hang_rate:
                await asyncio.sleep(config.hang_s)
            await asyncio.sleep(engine.draw_ms(config.ttft_ms) / 1000)
            for i in range(max_tokens):
                if i:
                    await asyncio.sleep(engine.draw_ms(config.itl_ms) / 1000)
                if drop_at is not None and i == drop_at:
                    raise _DropStream()
                word = ("" if i == 0 else " ") + _WORDS[(i + config.word_offset) % len(_WORDS)]
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
            if admitted:
                state.running_tokens -= prompt_tokens + max_tokens
                engine.release()
            if finished:
                state.finished += 1
            else:
                state.aborted += 1

    return Starlette(routes=[
        Route("/health", health),
        Route("/v1/models", models),
        Route("/metrics", metrics),
        Route("/v1/completions", generate, methods=["POST"]),
        Route("/v1/chat/completions", generate, methods=["POST"]),
    ])


def _forced_tool(body: dict[str, Any]) -> str | None:
    """The tool a request forces (``required``: the first; a named function: that one), if any."""
    tools, choice = body.get("tools") or [], body.get("tool_choice")
    if not tools:
        return None
    if choice == "required":
        return str(tools[0]["function"]["name"])
    if isinstance(choice, dict):
        return str(choice["function"]["name"])
    return None


async def _sleep_unless_disconnected(request: Request, seconds: float) -> bool:
    """Sleep; False as soon as the client disconnects (the body is read, so receive() waits for that)."""
    sleep = asyncio.ensure_future(asyncio.sleep(seconds))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({sleep, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        sleep.cancel()
        gone.cancel()
    return not gone.done()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


@dataclass(frozen=True)
class SimEngineProgram:
    """A ReplicaProgram that runs the simulated engine, for the supervisor and router tests."""

    model_name: str
    version: str
    ttft_ms: float = 20.0
    itl_ms: float = 5.0
    extra_args: tuple[str, ...] = ()
    extra_env: dict[str, str] = field(default_factory=dict)
    generation: GenerationDefaults = field(default_factory=lambda: GenerationDefaults(max_tokens=16))
    footprint_gib: float = 0.08  # what one simulated engine process takes (``llmserve.replicas.capacity``)
    replicas_per_core: int = 16  # it sleeps instead of computing: many share a core

    @property
    def versioned_name(self) -> str:
        return f"{self.model_name}:{self.version}"

    def command(self, host: str, port: int) -> list[str]:
        # the generation defaults reach the simulated engine as they reach vLLM: as its own settings
        tools = ["--enable-auto-tool-choice"] if self.generation.can_call_tools else []
        return [sys.executable, "-m", "loadtest.sim", "--host", host, "--port", str(port),
                "--model", self.versioned_name, self.model_name,
                "--ttft-ms", str(self.ttft_ms), "--itl-ms", str(self.itl_ms),
                "--default-max-tokens", str(self.generation.max_tokens), *tools, *self.extra_args]

    def environment(self) -> dict[str, str]:
        return dict(self.extra_env)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, SimConfig]:
    parser = argparse.ArgumentParser(prog="python -m loadtest.sim", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8200)
    parser.add_argument("--model", nargs="+", default=["sim"], help="served names; the first goes in responses")
    parser.add_argument("--ttft-ms", type=float, default=20.0, help="mean time to first token")
    parser.add_argument("--itl-ms", type=float, default=5.0, help="mean inter-token latency")
    parser.add_argument("--jitter-cv", type=float, default=0.0, help="coefficient of variation of TTFT and ITL")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--max-running", type=int, default=256, help="sequences run at once; the rest wait")
    parser.add_argument("--load-slowdown", type=float, default=0.0,
                        help="extra latency factor at full capacity (1.0: twice as slow when full)")
    parser.add_argument("--error-rate", type=float, default=0.0, help="fraction of requests answered with 500")
    parser.add_argument("--hang-rate", type=float, default=0.0, help="fraction of streams that hang before token 1")
    parser.add_argument("--drop-rate", type=float, default=0.0, help="fraction of streams cut after k tokens")
    parser.add_argument("--drop-after-tokens", type=int, default=3)
    parser.add_argument("--slow-start-s", type=float, default=0.0, help="/health answers 503 this long")
    parser.add_argument("--default-max-tokens", type=int, default=16, help="max_tokens when a request sets none")
    parser.add_argument("--enable-auto-tool-choice", action="store_true",
                        help="accept tools with an automatic tool choice (else 400, as vLLM without a parser)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--word-offset", type=int, default=0, help="start the answers' words here (other text)")
    args = parser.parse_args(argv)
    for name in ("error_rate", "hang_rate", "drop_rate"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            parser.error(f"--{name.replace('_', '-')} must be between 0 and 1")
    config = SimConfig(
        served_names=tuple(args.model), ttft_ms=args.ttft_ms, itl_ms=args.itl_ms, jitter_cv=args.jitter_cv,
        max_model_len=args.max_model_len, max_running=args.max_running, load_slowdown=args.load_slowdown,
        error_rate=args.error_rate, hang_rate=args.hang_rate, drop_rate=args.drop_rate,
        drop_after_tokens=args.drop_after_tokens, slow_start_s=args.slow_start_s, seed=args.seed,
        default_max_tokens=args.default_max_tokens, enable_auto_tool_choice=args.enable_auto_tool_choice,
        word_offset=args.word_offset,
    )
    return args, config


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    args, config = parse_args(argv)
    uvicorn.run(build_app(config), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
