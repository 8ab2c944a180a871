"""The design's generate API: ``POST /api/v1/models/{model_name}/generate``.

Body: ``{"prompt", "max_tokens", "stream", "user", "params": {"version",
"temperature", "top_p", "stop", "raw", ...}}``. The prompt is sent as one
user turn through the model's chat template, or as plain text with
``params.raw``. Streaming answers are SSE events:

- ``event: token`` with ``{"text": "<delta>"}`` for each piece of output;
- ``event: done`` with ``{"finish_reason", "usage", "model", "version", "replica", "request_id"}``;
- ``event: error`` with ``{"error": {...}}`` if the replica fails mid-stream.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse

from router.admission import admit_request
from router.context import RequestRecord, served_headers, user_key
from router.errors import UpstreamFailed
from router.protocol import GenerateRequest, check_output_limit, parse_json_object, read_body, validate
from router.relay import Upstream, UpstreamBroken, engine_failure, error_event, sse_bytes, sse_data
from router.state import RouterState

router = APIRouter(prefix="/api/v1", tags=["generate"])


@dataclass
class _Outcome:
    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None


@router.post("/models/{model_name}/generate")
async def generate(model_name: str, request: Request) -> Response:
    state: RouterState = request.app.state.router
    request_id: str = request.state.request_id
    record = RequestRecord(request_id, "generate", sink=state.log_sink, metrics=state.metrics,
                           samples=state.samples)
    body = await read_body(request.stream(), request.headers.get("content-length"), state.settings.max_body_bytes)
    parsed: GenerateRequest = validate(GenerateRequest, parse_json_object(body))
    record.user = user_key(request.headers, parsed.user)
    served = state.catalog.resolve(model_name, parsed.params.version, record.user)
    served, admission_headers = await admit_request(state.admission, request.headers, served, record.user)
    check_output_limit(parsed.max_tokens, served.max_model_len)

    sampling = parsed.params.model_dump(exclude_unset=True, exclude={"version", "raw"})
    payload: dict[str, Any] = {
        "model": served.versioned_name,
        "max_tokens": parsed.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        **sampling,
    }
    if parsed.user:
        payload["user"] = parsed.user
    if parsed.params.raw:
        path = "/v1/completions"
        payload["prompt"] = parsed.prompt
    else:
        path = "/v1/chat/completions"
        payload["messages"] = [{"role": "user", "content": parsed.prompt}]

    record.begin(served.model_name, served.version, parsed.stream)
    upstream = await state.relay.open(served, path, payload, request_id)
    record.replica = upstream.replica.id
    headers = {**served_headers(request_id, served.version, upstream.replica.id), **admission_headers}
    if upstream.status_code != 200:
        content = await upstream.read()
        await upstream.aclose()
        if upstream.status_code >= 500:
            failure = engine_failure(upstream, content)
            failure.headers = headers
            record.finish(failure.status_code)
            return failure.response()
        record.finish(upstream.status_code)
        return Response(content, status_code=upstream.status_code, media_type="application/json", headers=headers)

    summary = {"model": served.model_name, "version": served.version, "replica": upstream.replica.id,
               "request_id": request_id}
    if parsed.stream:
        return EventSourceResponse(_stream(upstream, record, summary), headers=headers, sep="\n", ping=state.sse_ping_s)

    outcome = _Outcome()
    try:
        async for _ in _consume(upstream, record, outcome):
            pass
    except UpstreamBroken as exc:
        record.error = str(exc)
        record.finish(502)
        raise UpstreamFailed(
            f"replica {upstream.replica.id} failed while generating ({exc}); retry the request"
        ) from exc
    finally:
        await upstream.aclose()
    record.finish(200)
    return JSONResponse(
        {"id": request_id, **summary, "text": "".join(outcome.text), "finish_reason": outcome.finish_reason,
         "usage": outcome.usage},
        headers=headers,
    )


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
        status = 502
        record.error = str(exc)
        yield sse_bytes(
            error_event(
                f"replica {upstream.replica.id} failed mid-stream after {len(outcome.text)} tokens "
                f"({exc}); the output is incomplete, retry the request",
                "replica_failed",
            ),
            event="error",
        )
    except BaseException:
        status = 499
        raise
    finally:
        await upstream.aclose()
        record.finish(status)
