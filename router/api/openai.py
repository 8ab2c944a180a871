"""OpenAI-compatible endpoints: /v1/models, /v1/chat/completions, /v1/completions."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from router.access.auth import Caller
from router.api.held import HeldStream
from router.errors import APIError
from router.gateway.authorize import inference_or_read
from router.gateway.openapi import json_body
from router.gateway.pipeline import InferenceCall, State, inference
from router.gateway.protocol import ChatCompletionRequest, CompletionRequest, check_output_limit, drop_tools
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
from router.traffic.catalog import Catalog, ServedVersion
from router.traffic.cold_start import Hold

router = APIRouter(prefix="/v1", tags=["openai"])

VERSION_HEADER = "x-model-version"
ChatCall = Annotated[InferenceCall, Depends(inference("/v1/chat/completions"))]
CompletionCall = Annotated[InferenceCall, Depends(inference("/v1/completions"))]


@router.get("/models")
async def list_models(state: State, caller: Annotated[Caller, Depends(inference_or_read)]) -> dict[str, Any]:
    """Each generative model once, with what its default version does when a request leaves things out;
    ``name:version`` aliases too when ``list_version_aliases`` is on (pinning works either way)."""
    catalog: Catalog = state.catalog
    created = int(state.started_at)
    data: list[dict[str, Any]] = []
    for model in catalog.models():
        if model.is_predict or not caller.may_use(model.name):
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


@router.post("/chat/completions", openapi_extra=json_body(ChatCompletionRequest))
async def chat_completions(call: ChatCall) -> Response:
    return await _relay_openai(call, "/v1/chat/completions", ChatCompletionRequest)


@router.post("/completions", openapi_extra=json_body(CompletionRequest))
async def completions(call: CompletionCall) -> Response:
    return await _relay_openai(call, "/v1/completions", CompletionRequest)


SCHEMAS: dict[str, type[ChatCompletionRequest] | type[CompletionRequest]] = {
    "/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest}


async def relay(call: InferenceCall, path: str) -> Response:
    """The whole of an OpenAI call to ``path`` (a batch line runs it too)."""
    return await _relay_openai(call, path, SCHEMAS[path])


async def _relay_openai(
    call: InferenceCall, path: str, schema: type[ChatCompletionRequest] | type[CompletionRequest]
) -> Response:
    with call.failures():
        payload = await call.read_json()
        parsed = call.parse(schema, payload)
        call.identify(parsed.user)
        await call.limit_generation(parsed.output_limit())
        served = await call.admit(call.resolve(parsed.model, call.request.headers.get(VERSION_HEADER) or None))
        check_output_limit(
            parsed.output_limit(), served,
            "max_completion_tokens" if getattr(parsed, "max_completion_tokens", None) else "max_tokens",
        )
        dropped = 0 if served.generation.can_call_tools else drop_tools(payload)
        if dropped:
            call.headers["x-tools-dropped"] = str(dropped)
        payload["model"] = served.versioned_name
        call.record.begin(served.model_name, served.version, parsed.stream)
        call.state.shadows.sample(call.record, path, payload, parsed.stream)
        hold = call.cold_start(served)
        if hold is not None and parsed.stream:
            return _held(call, hold, served, path, payload)
        if hold is not None:
            await hold.wait_quietly()  # 503 with Retry-After past the bound
        upstream = await call.state.relay.open(served, path, payload, call.request_id, call.deadline,
                                               stream=parsed.stream)
    call.record.replica = upstream.replica.id
    headers = call.answer_headers(served, upstream.replica.id)
    if upstream.status_code != 200 or not parsed.stream:
        return await buffered_response(upstream, call.record, headers)
    return EventStream(_relay_stream(upstream, call.record), headers, call.state.sse_ping_s, upstream.on_client_gone)


def _held(call: InferenceCall, hold: Hold, served: ServedVersion, path: str, payload: dict[str, Any]) -> Response:
    """A stream for a version starting from zero: answered now, kept alive, relayed once a replica is up."""

    def error_events(error: APIError) -> list[bytes]:
        return [sse_bytes(error_event(error.message, error.code, error.error_type)), sse_bytes(b"[DONE]")]

    held = HeldStream(call, hold,
                      lambda: call.state.relay.open(served, path, payload, call.request_id, call.deadline),
                      lambda upstream: _relay_stream(upstream, call.record), error_events)
    return EventStream(held.events(), call.answer_headers(served, "pending"), call.state.sse_ping_s,
                       held.on_client_gone)


async def _relay_stream(upstream: Upstream, record: RequestRecord) -> AsyncIterator[bytes]:
    status = 200
    tap = record.tap  # a request a shadow replays: its answer is compared with the shadow's
    try:
        async for data in sse_data(upstream):
            record.mark_chunk(data)
            record.note_usage(data)
            if tap is not None:
                tap.append(data)
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
