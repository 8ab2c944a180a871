"""The design's generate API: ``POST /api/v1/models/{model_name}/generate``.

Body: ``{"prompt", "max_tokens", "stream", "user", "params": {"version",
"temperature", "top_p", "stop", "raw", ...}}``; what it leaves out, the
version's generation defaults fill in. The prompt is sent as one
user turn through the model's chat template, or as plain text with
``params.raw``. Streaming answers are SSE events:

- ``event: token`` with ``{"text": "<delta>"}`` for each piece of output;
- ``event: done`` with ``{"finish_reason", "usage", "model", "version", "replica", "request_id"}``;
- ``event: error`` with ``{"error": {...}}`` if the replica fails mid-stream.

With ``Prefer: respond-async`` or ``params.async`` the call is an async job (``router.api.jobs``): 202 at
once, the non-streaming answer later at its status URL.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from router.api.held import HeldStream
from router.api.jobs import accept, async_requested, callback_of, patiently
from router.errors import APIError, InvalidRequest, RequestTimedOut, UpstreamFailed
from router.gateway.openapi import json_body
from router.gateway.pipeline import InferenceCall, inference
from router.gateway.protocol import GenerateRequest, check_output_limit
from router.observe.request_record import RequestRecord
from router.relay.event_stream import EventStream
from router.relay.failures import StreamFailure, error_event
from router.relay.relay import (
    Upstream,
    UpstreamBroken,
    buffered_response,
    sse_bytes,
    sse_data,
)
from router.traffic.catalog import ServedVersion

router = APIRouter(prefix="/api/v1", tags=["generate"])
GenerateCall = Annotated[InferenceCall, Depends(inference("generate"))]


@dataclass
class _Outcome:
    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None


@router.post("/models/{model_name}/generate", openapi_extra=json_body(GenerateRequest))
async def generate(model_name: str, call: GenerateCall) -> Response:
    state, record, request_id = call.state, call.record, call.request_id
    with call.failures():
        parsed = call.parse(GenerateRequest, await call.read_json())
        asynchronous = async_requested(call.request.headers, parsed.params.async_)
        callback_url = callback_of(call, parsed.params.callback_url, asynchronous)
        if asynchronous:
            if parsed.stream:
                raise InvalidRequest("an async request cannot stream: leave out stream, or 'Prefer: "
                                     "respond-async' and params.async", param="stream")
            call.priority = "batch"
        call.identify(parsed.user)
        await call.limit_generation(parsed.max_tokens)
        resolved = call.resolve(model_name, parsed.params.version)
        if asynchronous:
            check_output_limit(parsed.max_tokens, resolved)  # refused now, not as a failed job
            return await accept(call, "generate", model_name, callback_url, lambda: _job(call, parsed, resolved))
        served = await call.admit(resolved)
        check_output_limit(parsed.max_tokens, served)
        path, payload = _engine_request(parsed, served)
        record.begin(served.model_name, served.version, parsed.stream)
        hold = call.cold_start(served)
        summary = {"model": served.model_name, "version": served.version, "request_id": request_id}
        if hold is not None and parsed.stream:
            held = HeldStream(call, hold, lambda: state.relay.open(served, path, payload, request_id, call.deadline),
                              lambda upstream: _stream(upstream, record, {**summary, "replica": upstream.replica.id}),
                              _error_events)
            return EventStream(held.events(), call.answer_headers(served, "pending"), state.sse_ping_s,
                               held.on_client_gone)
        if hold is not None:
            await hold.wait_quietly()  # 503 with Retry-After past the bound
        upstream = await state.relay.open(served, path, payload, request_id, call.deadline)
    return await _answer(call, served, upstream, parsed.stream)


async def _job(call: InferenceCall, parsed: GenerateRequest, resolved: ServedVersion) -> Response:
    """An async request's work, in the background: the synchronous call's steps from admission on (the
    batch band; a refusal with Retry-After is tried again), answered without streaming."""
    state = call.state
    with call.failures():
        served = await patiently(call, lambda: call.admit(resolved))
        check_output_limit(parsed.max_tokens, served)
        path, payload = _engine_request(parsed, served)
        call.record.begin(served.model_name, served.version, False)
        hold = call.cold_start(served)
        if hold is not None:
            await hold.wait_quietly()
        upstream = await patiently(
            call, lambda: state.relay.open(served, path, payload, call.request_id, call.deadline))
    return await _answer(call, served, upstream, False)


async def _answer(call: InferenceCall, served: ServedVersion, upstream: Upstream, stream: bool) -> Response:
    """The answer from an opened upstream: relayed as SSE events, or collected into one JSON body."""
    state, record, request_id = call.state, call.record, call.request_id
    record.replica = upstream.replica.id
    headers = call.answer_headers(served, upstream.replica.id)
    if upstream.status_code != 200:
        return await buffered_response(upstream, record, headers)

    summary = {"model": served.model_name, "version": served.version, "request_id": request_id,
               "replica": upstream.replica.id}
    if stream:
        return EventStream(_stream(upstream, record, summary), headers, state.sse_ping_s, upstream.on_client_gone)

    outcome = _Outcome()
    try:
        async for _ in _consume(upstream, record, outcome):
            pass
    except UpstreamBroken as exc:
        failure = StreamFailure.of(upstream, exc, len(outcome.text))
        kind = RequestTimedOut if failure.status == 504 else UpstreamFailed
        error: APIError = kind(failure.message, headers=headers, code=failure.code)
        record.fail(error)
        return error.response()
    except BaseException as exc:
        record.fail(exc)
        raise
    finally:
        await upstream.aclose()
    record.finish(200)
    return JSONResponse(
        {"id": request_id, **summary, "text": "".join(outcome.text), "finish_reason": outcome.finish_reason,
         "usage": outcome.usage},
        headers=headers,
    )


def _error_events(error: APIError) -> list[bytes]:
    return [sse_bytes(error_event(error.message, error.code, error.error_type), event="error")]


def _engine_request(parsed: GenerateRequest, served: ServedVersion) -> tuple[str, dict[str, Any]]:
    """The engine path and body: one chat user turn, or a plain completion with ``params.raw``."""
    sampling = parsed.params.model_dump(exclude_unset=True, exclude=set(parsed.params.ROUTER_FIELDS))
    payload: dict[str, Any] = {
        "model": served.versioned_name,
        "stream": True,
        "stream_options": {"include_usage": True},
        **sampling,
    }
    if parsed.max_tokens is not None:  # else the engine's default for this version
        payload["max_tokens"] = parsed.max_tokens
    if parsed.user:
        payload["user"] = parsed.user
    if parsed.params.raw:
        payload["prompt"] = parsed.prompt
        return "/v1/completions", payload
    payload["messages"] = [{"role": "user", "content": parsed.prompt}]
    return "/v1/chat/completions", payload


async def _consume(upstream: Upstream, record: RequestRecord, outcome: _Outcome) -> AsyncIterator[str]:
    """Yield text deltas from an engine stream, filling in finish reason and usage."""
    async for data in sse_data(upstream):
        if data == b"[DONE]":
            break
        chunk = json.loads(data)
        if chunk.get("usage"):
            outcome.usage = chunk["usage"]
            record.output_tokens = int(chunk["usage"].get("completion_tokens") or 0)
        for choice in chunk.get("choices") or ():
            delta = choice.get("text")
            if delta is None:
                delta = (choice.get("delta") or {}).get("content")
            if choice.get("finish_reason"):
                outcome.finish_reason = choice["finish_reason"]
            if delta:
                record.mark_chunk()
                outcome.text.append(delta)
                yield delta


async def _stream(upstream: Upstream, record: RequestRecord, summary: dict[str, Any]) -> AsyncIterator[bytes]:
    outcome = _Outcome()
    status = 200
    try:
        async for delta in _consume(upstream, record, outcome):
            yield sse_bytes(json.dumps({"text": delta}), event="token")
        yield sse_bytes(
            json.dumps({**summary, "finish_reason": outcome.finish_reason, "usage": outcome.usage}), event="done"
        )
    except UpstreamBroken as exc:
        failure = StreamFailure.of(upstream, exc, len(outcome.text))
        status = failure.status
        record.failed(failure.code, failure.message)
        yield sse_bytes(failure.event(), event="error")
    except BaseException:
        status = 499
        record.failed("client_disconnected", "the client went away")
        raise
    finally:
        await upstream.aclose()
        record.finish(status)
