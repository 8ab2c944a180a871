"""A naive OpenAI-compatible server: Hugging Face transformers, one request at a time.

The baseline the engine is measured against (``loadtest.naive_bench``; README,
"vLLM against a naive server"). It is what serving a model looks like without
an inference engine:

- the model in fp32 with transformers, torch using every core;
- each request decoded greedily, one forward pass a token, reusing the
  model's own contiguous KV cache (``past_key_values``): no paged KV cache;
- requests served strictly one after another behind one FIFO lock: no
  batching, continuous or static; the others wait for their turn.

It speaks enough of vLLM's HTTP surface for ``python -m loadtest bench`` to
drive it unchanged: ``/health``, ``/v1/models``, ``/v1/completions`` and
``/v1/chat/completions`` (streaming or not, ``stream_options.include_usage``,
``ignore_eos``), and ``/metrics`` with how many requests ran at once (never
more than one) and waited. Only greedy decoding: a request with a positive
temperature is refused with 400, as is any other bad input (4xx JSON in
OpenAI's error shape).

Run: ``python -m loadtest.naive_server --model-dir DIR --served-model-name NAME --port 8300``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from llmserve.errors import LLMServeError


class RequestRefused(LLMServeError):
    """A request this server will not run; ``status`` and ``param`` go into the 4xx JSON body."""

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        self.message, self.status, self.param = message, status, param
        super().__init__(message)


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI's other fields: accepted, not acted on

    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    temperature: float | None = Field(None, ge=0)
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Common):
    prompt: str = Field(min_length=1)


@dataclass(frozen=True)
class NaiveConfig:
    served_names: tuple[str, ...]
    max_model_len: int = 2048
    default_max_tokens: int = 16


class Model:
    """A causal LM and its tokenizer, decoded greedily one token a forward pass."""

    def __init__(self, model_dir: Path, threads: int | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads or os.cpu_count() or 1)
        self._torch = torch
        self.tokenizer: Any = AutoTokenizer.from_pretrained(str(model_dir))
        self.model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        eos = self.model.generation_config.eos_token_id
        self.stop_ids = frozenset(eos if isinstance(eos, list) else [] if eos is None else [eos])

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        ids = self.tokenizer.apply_chat_template([m.model_dump() for m in messages], add_generation_prompt=True,
                                                 tokenize=True, return_dict=False)
        return list(ids)

    def encode(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt)["input_ids"])

    def greedy(self, ids: list[int], max_tokens: int, ignore_eos: bool) -> Iterator[int]:
        """Token ids, one a step; the cache grows by one position a step (transformers' DynamicCache).

        Each step enters ``inference_mode`` itself (it is thread-local, and the
        steps may run on different worker threads).
        """
        torch = self._torch
        step_input = torch.tensor([ids])
        past = None
        for _ in range(max_tokens):
            with torch.inference_mode():
                out = self.model(input_ids=step_input, past_key_values=past, use_cache=True)
                past = out.past_key_values
                token = int(out.logits[0, -1].argmax())
            yield token
            if token in self.stop_ids and not ignore_eos:
                return
            step_input = torch.tensor([[token]])

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))


class _Detokenizer:
    """Text deltas of a growing id list (the whole list decoded each time: 64 tokens cost nothing)."""

    def __init__(self, model: Model) -> None:
        self._model = model
        self._ids: list[int] = []
        self._sent = ""

    def push(self, token: int) -> str:
        self._ids.append(token)
        text = self._model.decode(self._ids)
        if text.endswith("\ufffd"):  # a character cut between tokens: wait for its other bytes
            return ""
        delta, self._sent = text[len(self._sent):], text
        return delta


@dataclass
class _State:
    running: int = 0
    waiting: int = 0
    max_running: int = 0  # the serialisation check: stays 1
    finished: int = 0
    aborted: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # FIFO: waiters are woken in arrival order


async def _step(tokens: Iterator[int]) -> int | None:
    """The next token, computed on a worker thread so the event loop keeps answering.

    A cancelled request (the client went away) still waits for the step in
    flight, so the lock is never released while a forward pass runs.
    """
    work = asyncio.ensure_future(asyncio.to_thread(next, tokens, None))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        await asyncio.wait({work})
        raise


def _error(exc: RequestRefused) -> JSONResponse:
    kind = "NotFoundError" if exc.status == 404 else "BadRequestError"
    return JSONResponse({"error": {"message": exc.message, "type": kind, "param": exc.param, "code": exc.status}},
                        status_code=exc.status)


def _parse(body: object, chat: bool) -> ChatRequest | CompletionRequest:
    try:
        return (ChatRequest if chat else CompletionRequest).model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise RequestRefused(f"{param}: {first['msg']}" if param else str(first["msg"]), 400, param) from None


def build_app(model: Model, config: NaiveConfig) -> Starlette:
    state = _State()
    name = config.served_names[0]

    async def health(request: Request) -> Response:
        return Response(status_code=200)  # the model is loaded before the server starts

    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [
            {"id": n, "object": "model", "owned_by": "naive", "max_model_len": config.max_model_len}
            for n in config.served_names]})

    async def metrics(request: Request) -> PlainTextResponse:
        return PlainTextResponse(
            f"naive_requests_running {state.running}\nnaive_requests_waiting {state.waiting}\n"
            f"naive_requests_max_running {state.max_running}\nnaive_requests_finished_total {state.finished}\n"
            f"naive_requests_aborted_total {state.aborted}\n")

    def admit(body: object, chat: bool) -> tuple[ChatRequest | CompletionRequest, list[int], int]:
        req = _parse(body, chat)
        if req.model not in config.served_names:
            raise RequestRefused(f"The model `{req.model}` does not exist.", 404, "model")
        if req.temperature:
            raise RequestRefused("this server decodes greedily only: send temperature 0", 400, "temperature")
        ids = model.encode_chat(req.messages) if isinstance(req, ChatRequest) else model.encode(req.prompt)
        max_tokens = req.max_completion_tokens or req.max_tokens or config.default_max_tokens
        if len(ids) + max_tokens > config.max_model_len:
            raise RequestRefused(f"{len(ids)} prompt tokens + max_tokens={max_tokens} exceed max_model_len="
                                 f"{config.max_model_len}", 400, "max_tokens")
        return req, ids, max_tokens

    async def generated(ids: list[int], max_tokens: int, ignore_eos: bool) -> AsyncIterator[tuple[int, str]]:
        """(token, text delta) pairs, produced only while this request holds the lock."""
        state.waiting += 1
        try:
            await state.lock.acquire()
        finally:
            state.waiting -= 1
        state.running += 1
        state.max_running = max(state.max_running, state.running)
        finished = False
        try:
            detok = _Detokenizer(model)
            tokens = model.greedy(ids, max_tokens, ignore_eos)
            while (token := await _step(tokens)) is not None:
                yield token, detok.push(token)
            finished = True
        finally:
            state.running -= 1
            state.lock.release()
            state.finished += finished
            state.aborted += not finished

    async def complete(request: Request) -> Response:
        chat = request.url.path.endswith("/chat/completions")
        try:
            try:
                body = await request.json()
            except ValueError:
                raise RequestRefused("the body is not valid JSON") from None
            req, ids, max_tokens = admit(body, chat)
        except RequestRefused as exc:
            return _error(exc)
        completion_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        base = {"id": completion_id, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": name}
        if req.stream:
            usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(stream(base, chat, ids, max_tokens, req.ignore_eos, usage),
                                     media_type="text/event-stream")
        out: list[int] = []
        text = ""
        async for token, delta in generated(ids, max_tokens, req.ignore_eos):
            out.append(token)
            text += delta
        reason = _finish_reason(out, max_tokens, req.ignore_eos)
        choice: dict[str, Any] = {"index": 0, "finish_reason": reason}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        return JSONResponse({**base, "object": "chat.completion" if chat else "text_completion",
                             "choices": [choice], "usage": _usage(len(ids), len(out))})

    def _finish_reason(out: list[int], max_tokens: int, ignore_eos: bool) -> str:
        return "stop" if out and out[-1] in model.stop_ids and not ignore_eos else "length"

    async def stream(base: dict[str, Any], chat: bool, ids: list[int], max_tokens: int, ignore_eos: bool,
                     include_usage: bool) -> AsyncIterator[bytes]:
        out: list[int] = []
        async for token, delta in generated(ids, max_tokens, ignore_eos):
            out.append(token)
            last = len(out) == max_tokens or (token in model.stop_ids and not ignore_eos)
            if not delta and not last:
                continue  # a held-back partial character or a special token: nothing to show yet
            choice: dict[str, Any] = {"index": 0, "finish_reason": _finish_reason(out, max_tokens, ignore_eos)
                                      if last else None}
            if chat:
                choice["delta"] = {"content": delta} if len(out) > 1 else {"role": "assistant", "content": delta}
            else:
                choice["text"] = delta
            yield _event({**base, "choices": [choice]})
        if include_usage:
            yield _event({**base, "choices": [], "usage": _usage(len(ids), len(out))})
        yield b"data: [DONE]\n\n"

    return Starlette(routes=[
        Route("/health", health),
        Route("/v1/models", models),
        Route("/metrics", metrics),
        Route("/v1/completions", complete, methods=["POST"]),
        Route("/v1/chat/completions", complete, methods=["POST"]),
    ])


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m loadtest.naive_server", description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True, help="a Hugging Face model folder")
    parser.add_argument("--served-model-name", nargs="+", required=True, help="the first goes in responses")
    parser.add_argument("--port", type=int, default=8300)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    args = parser.parse_args(argv)
    if not (args.model_dir / "config.json").is_file():
        parser.error(f"--model-dir {args.model_dir}: not a Hugging Face model folder (no config.json)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = Model(args.model_dir, args.threads)
    config = NaiveConfig(served_names=tuple(args.served_model_name), max_model_len=args.max_model_len)
    # loopback only, as every server of the project
    uvicorn.run(build_app(model, config), host="127.0.0.1", port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
