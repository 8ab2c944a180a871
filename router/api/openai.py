"""OpenAI-compatible endpoints: /v1/models, /v1/chat/completions, /v1/completions."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sse_starlette import EventSourceResponse

from router.admission.shedding import admit_request
from router.gateway.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    check_output_limit,
    drop_tools,
    parse_json_object,
    read_body,
    validate,
)
from router.observe.request_record import RequestRecord, served_headers, user_key
from router.relay.relay import StreamFailure, Upstream, UpstreamBroken, buffered_response, sse_bytes, sse_data
from router.state import RouterState
from router.traffic.catalog import Catalog

router = APIRouter(prefix="/v1", tags=["openai"])

VERSION_HEADER = "x-model-version"


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    """Each generative model once, with what its default version does when a request leaves things out;
    ``name:version`` aliases too when ``list_version_aliases`` is on (pinning works either way)."""
    state: RouterState = request.app.state.router
    catalog: Catalog = state.catalog
    created = int(state.started_at)
    data: list[dict[str, Any]] = []
    for model in catalog.models():
        if model.is_predict:
            continue  # traditional models are not OpenAI models; GET /v2/models/{name} describes them
        default = model.versions.get(model.default_version or "")
        data.append({"id": model.name, "object": "model", "created": created, "owned_by": "llmserve",
                     "default_version": model.default_version,
                     "versions": {v: model.split.get(v, 0) for v in model.versions},  # traffic percent each
                     **(default.generation.describe(default.max_model_len) if default else {})})
        if not state.settings.list_version_aliases:
            continue
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
                **served.generation.describe(served.max_model_len),
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
    deadline = state.relay.deadline()
    record = RequestRecord(request_id, path, sink=state.log_sink, metrics=state.metrics, samples=state.samples)
    extra: dict[str, str] = {}  # admission's headers and what the router changed, on errors too
    with record.failures(extra):
        body = await read_body(request.stream(), request.headers.get("content-length"),
                               state.settings.max_body_bytes)
        payload = parse_json_object(body)
        parsed = validate(schema, payload)
        pinned = request.headers.get(VERSION_HEADER) or None
        user = record.user = user_key(request.headers, parsed.user)
        served = state.catalog.resolve(parsed.model, pinned, user)
        record.resolved(served.model_name, served.version)
        served, admission_headers = await admit_request(state.admission, request.headers, served, user)
        extra.update(admission_headers)
        check_output_limit(
            parsed.output_limit(), served,
            "max_completion_tokens" if getattr(parsed, "max_completion_tokens", None) else "max_tokens",
        )
        dropped = 0 if served.generation.can_call_tools else drop_tools(payload)
        if dropped:
            extra["x-tools-dropped"] = str(dropped)
        payload["model"] = served.versioned_name
        record.begin(served.model_name, served.version, parsed.stream)
        upstream = await state.relay.open(served, path, payload, request_id, deadline, stream=parsed.stream)
    record.replica = upstream.replica.id
    headers = {**served_headers(request_id, served.version, upstream.replica.id), **extra}
    if upstream.status_code != 200 or not parsed.stream:
        return await buffered_response(upstream, record, headers)
    return EventSourceResponse(
        _relay_stream(upstream, record),
        headers=headers,
        sep="\n",
        ping=state.sse_ping_s,
    )


async def _relay_stream(upstream: Upstream, record: RequestRecord) -> AsyncIterator[bytes]:
    status = 200
    try:
        async for data in sse_data(upstream):
            record.mark_chunk(data)
            record.note_usage(data)
            yield sse_bytes(data)
    except UpstreamBroken as exc:
        # The replica died, stalled or ran past the budget mid-stream: tell the client in-band
        # (the status line is long gone) and end the stream, never leave it hanging.
        failure = StreamFailure.of(upstream, exc, record.chunks)
        status = failure.status
        record.failed(failure.code, failure.message)
        yield sse_bytes(failure.event())
        yield sse_bytes(b"[DONE]")
    except BaseException:
        status = 499  # client went away: closing the upstream below aborts the engine request
        record.failed("client_disconnected", "the client went away")
        raise
    finally:
        await upstream.aclose()
        record.finish(status)
