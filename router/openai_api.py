"""OpenAI-compatible endpoints: /v1/models, /v1/chat/completions, /v1/completions."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sse_starlette import EventSourceResponse

from router.admission import admit_request
from router.catalog import Catalog
from router.context import RequestRecord, served_headers, user_key
from router.errors import UpstreamFailed
from router.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    check_output_limit,
    parse_json_object,
    read_body,
    validate,
)
from router.relay import Upstream, UpstreamBroken, engine_failure, error_event, sse_bytes, sse_data
from router.state import RouterState

router = APIRouter(prefix="/v1", tags=["openai"])

VERSION_HEADER = "x-model-version"


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    catalog: Catalog = request.app.state.router.catalog
    created = int(request.app.state.router.started_at)
    data: list[dict[str, Any]] = []
    for model in catalog.models():
        if model.is_predict:
            continue  # traditional models are not OpenAI models; GET /v2/models/{name} describes them
        data.append({"id": model.name, "object": "model", "created": created, "owned_by": "llmserve",
                     "default_version": model.default_version})
        for served in model.versions.values():
            data.append({
                "id": served.versioned_name,
                "object": "model",
                "created": created,
                "owned_by": "llmserve",
                "root": model.name,
                "version": served.version,
                "max_model_len": served.max_model_len,
                "ready_replicas": len(served.ready_replicas),
                "traffic_percent": model.split.get(served.version, 0),
            })
    return {"object": "list", "data": data}


@router.post("/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await _relay_openai(request, "/v1/chat/completions", ChatCompletionRequest)


@router.post("/completions")
async def completions(request: Request) -> Response:
    return await _relay_openai(request, "/v1/completions", CompletionRequest)


async def _relay_openai(
    request: Request, path: str, schema: type[ChatCompletionRequest] | type[CompletionRequest]
) -> Response:
    state: RouterState = request.app.state.router
    request_id: str = request.state.request_id
    record = RequestRecord(request_id, path, sink=state.log_sink, metrics=state.metrics, samples=state.samples)
    body = await read_body(request.stream(), request.headers.get("content-length"), state.settings.max_body_bytes)
    payload = parse_json_object(body)
    parsed = validate(schema, payload)
    pinned = request.headers.get(VERSION_HEADER) or None
    user = record.user = user_key(request.headers, parsed.user)
    served = state.catalog.resolve(parsed.model, pinned, user)
    served, admission_headers = await admit_request(state.admission, request.headers, served, user)
    check_output_limit(
        parsed.output_limit(),
        served.max_model_len,
        "max_completion_tokens" if getattr(parsed, "max_completion_tokens", None) else "max_tokens",
    )
    payload["model"] = served.versioned_name
    record.begin(served.model_name, served.version, parsed.stream)
    upstream = await state.relay.open(served, path, payload, request_id)
    record.replica = upstream.replica.id
    headers = {**served_headers(request_id, served.version, upstream.replica.id), **admission_headers}
    if upstream.status_code != 200 or not parsed.stream:
        return await _buffered(upstream, record, headers)
    return EventSourceResponse(
        _relay_stream(upstream, record),
        headers=headers,
        sep="\n",
        ping=state.sse_ping_s,
    )


async def _buffered(upstream: Upstream, record: RequestRecord, headers: dict[str, str]) -> Response:
    try:
        content = await upstream.read()
    except UpstreamBroken as exc:
        record.error = str(exc)
        record.finish(502)
        message = f"replica {upstream.replica.id} failed while answering ({exc}); retry the request"
        return UpstreamFailed(message, headers=headers).response()
    finally:
        await upstream.aclose()
    if upstream.status_code >= 500:
        failure = engine_failure(upstream, content)
        failure.headers = headers
        record.finish(failure.status_code)
        return failure.response()
    record.note_usage(content)
    record.finish(upstream.status_code)
    return Response(content, status_code=upstream.status_code, media_type="application/json", headers=headers)


async def _relay_stream(upstream: Upstream, record: RequestRecord) -> AsyncIterator[bytes]:
    status = 200
    try:
        async for data in sse_data(upstream):
            record.mark_chunk(data)
            record.note_usage(data)
            yield sse_bytes(data)
    except UpstreamBroken as exc:
        # The replica died or stalled mid-stream: tell the client in-band (the
        # status line is long gone) and end the stream, never leave it hanging.
        status = 502
        record.error = str(exc)
        yield sse_bytes(
            error_event(
                f"replica {upstream.replica.id} failed mid-stream after {record.chunks} chunks "
                f"({exc}); the output is incomplete, retry the request",
                "replica_failed",
            )
        )
        yield sse_bytes(b"[DONE]")
    except BaseException:
        status = 499  # client went away: closing the upstream below aborts the engine request
        raise
    finally:
        await upstream.aclose()
        record.finish(status)

