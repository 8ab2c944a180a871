"""Predict APIs for traditional models: the design's ``/api/v1/models/{name}/predict`` and the
Open Inference Protocol v2 (``/v2/...``) that KServe, Triton and MLServer clients speak.

Both resolve the version like the LLM APIs (traffic split by user, or a pinned
version), validate the tensors against the version's schema (400 naming the
field), and queue them on the version's dynamic batcher. A full queue is a 429
and a deadline the queue cannot meet a 503, both with Retry-After, at once.
Priority: ``X-Priority: critical|standard|batch``; deadline: ``X-Deadline-Ms``. The design's call can
be an async job (``Prefer: respond-async`` or ``params.async``: ``router.api.jobs``).
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import numpy as np
import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from router.access.auth import Caller
from router.admission.shedding import parse_deadline_ms, resolve_priority
from router.api.jobs import accept, async_requested, callback_of, patiently
from router.errors import InvalidRequest, ModelNotFound, PayloadTooLarge, PredictorOverloaded, QueueFull
from router.gateway.authorize import inference_or_read
from router.gateway.fast_routes import FastRoute
from router.gateway.openapi import json_body
from router.gateway.pipeline import InferenceCall, begin_call, inference
from router.observe.request_record import user_key
from router.predict.codec import (
    NPY_TYPES,
    decode_npy,
    decode_rows,
    decode_v2,
    encode_v2,
    may_hold_booleans,
    parse_object,
    unknown_outputs,
)
from router.predict.errors import InvalidInput, Overloaded
from router.predict.host import Predictor
from router.state import RouterState
from router.traffic.catalog import ServedVersion

router = APIRouter(tags=["predict"])
_ROW = {"type": "object", "description": "input name -> value (a number, or a list for a tensor input)",
        "additionalProperties": {"oneOf": [{"type": "number"}, {"type": "array"}]}}
PREDICT_BODY = {"type": "object", "required": ["inputs"], "properties": {
    "inputs": {"type": "array", "minItems": 1, "items": _ROW},
    "params": {"type": "object", "properties": {"version": {"type": "string"},
                                                "deadline_ms": {"type": "number", "exclusiveMinimum": 0},
                                                "async": {"type": "boolean"}, "callback_url": {"type": "string"}}},
    "user": {"type": "string"}}}
V2_INFER_BODY = {"type": "object", "required": ["inputs"], "properties": {
    "id": {"type": "string"},
    "inputs": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["name", "shape", "datatype"],
               "properties": {"name": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer"}},
                              "datatype": {"type": "string", "enum": ["BOOL", "INT8", "INT16", "INT32", "INT64",
                                                                      "UINT8", "FP16", "FP32", "FP64", "BYTES"]},
                              "data": {"type": "array"}, "parameters": {"type": "object"}}}},
    "outputs": {"type": "array", "items": {"type": "object", "required": ["name"],
                                           "properties": {"name": {"type": "string"}}}},
    "parameters": {"type": "object"}}}
PREDICT_PATH = "/api/v1/models/{model_name}/predict"
V2_INFER_PATH = "/v2/models/{model_name}/infer"
V2_VERSION_INFER_PATH = "/v2/models/{model_name}/versions/{version}/infer"
PredictCall = Annotated[InferenceCall, Depends(inference("predict"))]
V2InferCall = Annotated[InferenceCall, Depends(inference("v2_infer"))]


def _deadline_ms(request: Request, params: dict[str, Any]) -> float | None:
    return parse_deadline_ms(request.headers.get("x-deadline-ms", params.get("deadline_ms")),
                             "X-Deadline-Ms or params.deadline_ms", "deadline_ms")


def _predictor(served: ServedVersion) -> Predictor:
    assert served.predictor is not None  # resolve(predict=True) only returns predict versions
    return served.predictor


async def _run(call: InferenceCall, served: ServedVersion, inputs: dict[str, np.ndarray],
               deadline_ms: float | None) -> tuple[ServedVersion, dict[str, np.ndarray]]:
    """Admit, validate and predict; when the version's queue is full, its fallback model answers if it has one.

    Admission for a predictor is its batcher's queue (bounded rows, deadlines), so this is the
    pipeline's admit step for traditional models; returns the version that answered and the outputs.
    """
    priority, rows = await _check(call, served, inputs)
    _begin(call, served, rows)
    return await _submit(call, served, inputs, priority, deadline_ms)


async def _check(call: InferenceCall, served: ServedVersion, inputs: dict[str, np.ndarray]) -> tuple[str, int]:
    """The request's class, its rows checked against the model and the row limit, and its key's limits."""
    priority = call.priority or resolve_priority(call.request.headers, call.who)
    call.headers["x-priority"] = priority
    rows = _predictor(served).check(inputs)
    limit = call.state.settings.predict.max_request_rows
    if rows > limit:
        raise PayloadTooLarge(f"the request has {rows} rows; the limit is {limit} "
                              "(LLMSERVE_ROUTER__PREDICT__MAX_REQUEST_ROWS); split it")
    await call.limit(rows, counts_rows=True)  # a prediction's tokens are its rows
    return priority, rows


def _begin(call: InferenceCall, served: ServedVersion, rows: int) -> None:
    call.record.begin(served.model_name, served.version, False)
    call.record.output_tokens = rows


async def _submit(call: InferenceCall, served: ServedVersion, inputs: dict[str, np.ndarray], priority: str,
                  deadline_ms: float | None) -> tuple[ServedVersion, dict[str, np.ndarray]]:
    state, record, predictor = call.state, call.record, _predictor(served)
    try:
        return served, await predictor.batcher.submit(inputs, priority, deadline_ms)
    except Overloaded as exc:
        state.metrics.predict_refused(served.model_name, served.version, exc.status)
        fallback = _fallback(state, served, record.user, priority, call.who) if exc.status == 429 else None
        if fallback is not None:
            try:
                outputs = await _predictor(fallback).batcher.submit(inputs, priority, deadline_ms)
            except Overloaded:
                pass
            else:
                state.admission.count(served.model_name, priority, "fallback")
                call.headers["x-fallback"] = fallback.versioned_name
                return fallback, outputs
        error = QueueFull if exc.status == 429 else PredictorOverloaded
        raise error(f"{served.versioned_name} is overloaded: {exc.reason}; retry in {exc.retry_after_s}s",
                    exc.retry_after_s) from None


def _fallback(state: RouterState, served: ServedVersion, user: str | None, priority: str,
              caller: Caller) -> ServedVersion | None:
    """The predict fallback for a full queue: a model with the same inputs, that the caller may use;
    never for batch traffic."""
    if not state.settings.admission.enabled or priority == "batch":
        return None
    candidate = state.admission.fallback_for(served, user, caller.may_use)
    if candidate is None or candidate.predictor is None \
            or candidate.predictor.manifest.inputs != _predictor(served).manifest.inputs:
        return None
    return candidate


# -- the design's API ---------------------------------------------------------------


def _predictions(outputs: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    columns = {name: value.tolist() for name, value in outputs.items()}
    rows = len(next(iter(columns.values())))
    binary = "probabilities" in columns and len(columns["probabilities"][0]) == 2 if rows else False
    result = []
    for i in range(rows):
        row = {name: column[i] for name, column in columns.items()}
        if binary:
            row["score"] = row["probabilities"][1]  # the positive class's probability
        result.append(row)
    return result


@router.post(PREDICT_PATH, openapi_extra=json_body(PREDICT_BODY))
async def predict(model_name: str, call: PredictCall) -> Response:
    """``{"inputs": [{"features": [...]}, ...], "params": {"version": "v3"}}`` or an ``.npy`` body."""
    return await answer_predict(call, model_name)


async def answer_predict(call: InferenceCall, model_name: str) -> Response:
    """The design's predict call, after authentication (the FastAPI route and the fast route)."""
    state, request = call.state, call.request
    with call.failures():
        raw = await call.read(state.settings.max_predict_body_bytes)
        content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        npy = content_type in NPY_TYPES or raw[:6] == b"\x93NUMPY"
        params: dict[str, Any] = {}
        body: dict[str, Any] = {}
        if not npy:
            try:
                body = parse_object(raw)
            except InvalidInput as exc:  # the one input error with its own code
                raise InvalidRequest(str(exc), param=exc.param, code="invalid_json") from None
            params = body.get("params") or {}
            if not isinstance(params, dict):
                raise InvalidRequest('"params" must be an object such as {"version": "v3"}', param="params")
        version = params.get("version") or request.query_params.get("version") or \
            request.headers.get("x-model-version")
        call.identify(body.get("user") if isinstance(body.get("user"), str) else None)
        asynchronous = async_requested(request.headers, params.get("async"))
        callback_url = callback_of(call, params.get("callback_url"), asynchronous)
        if asynchronous:
            call.priority = "batch"
        served = call.resolve(model_name, version, predict=True)
        manifest = _predictor(served).manifest
        inputs = decode_npy(raw, manifest) if npy else decode_rows(body, manifest, may_hold_booleans(raw))
        deadline_ms = _deadline_ms(request, params)
        if asynchronous:
            priority, rows = await _check(call, served, inputs)
            chosen = served

            async def work() -> Response:
                with call.failures():
                    call.record.priority = priority  # batch: a job's samples never count as online traffic
                    _begin(call, chosen, rows)
                    answering, outputs = await patiently(
                        call, lambda: _submit(call, chosen, inputs, priority, deadline_ms))
                return _answer(call, answering, outputs, npy)

            return await accept(call, "predict", model_name, callback_url, work)
        began = time.perf_counter()
        served, outputs = await _run(call, served, inputs, deadline_ms)
        # replayed once the answer is done; timed as the shadow's will be: the prediction, not the body's decoding
        state.shadows.sample_predict(call.record, inputs, outputs, (time.perf_counter() - began) * 1000)
    return _answer(call, served, outputs, npy)


def _answer(call: InferenceCall, served: ServedVersion, outputs: dict[str, np.ndarray], npy: bool) -> Response:
    record = call.record
    headers = call.answer_headers(served, "router")
    record.finish(200)
    answer: dict[str, Any] = {"model_name": served.model_name, "version": served.version, "id": record.request_id}
    if npy:  # a columnar answer: no per-row objects at high row counts
        answer["outputs"] = {name: np.ascontiguousarray(value) for name, value in outputs.items()}
    else:
        answer["predictions"] = _predictions(outputs)
    return Response(orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json",
                    headers=headers)


# -- Open Inference Protocol v2 ---------------------------------------------------


def _v2_served(state: RouterState, model_name: str, version: str | None, request: Request,
               caller: Caller) -> ServedVersion:
    unknown = ModelNotFound(f"model {model_name!r} does not exist", param="model")
    if not caller.may_use(model_name):  # as unknown as a model that does not exist
        raise unknown
    try:
        return state.catalog.resolve(model_name, version, user_key(request.headers, None, caller.key_id),
                                     retry_after_s=state.settings.retry_after_s, predict=True)
    except ModelNotFound:
        if caller.models is None:
            raise
        raise unknown from None  # the catalog's message lists every served model


def _metadata(served: ServedVersion, versions: list[str]) -> dict[str, Any]:
    manifest = _predictor(served).manifest
    return {"name": served.model_name, "versions": versions, "platform": manifest.framework,
            "inputs": [t.to_dict() for t in manifest.inputs], "outputs": [t.to_dict() for t in manifest.outputs]}


@router.get("/v2")
async def v2_server_metadata() -> dict[str, Any]:
    return {"name": "llmserve", "version": "0.1.0", "extensions": ["binary_tensor_data"]}


@router.get("/v2/health/live")
async def v2_live() -> dict[str, bool]:
    return {"live": True}


@router.get("/v2/health/ready")
async def v2_ready(request: Request) -> JSONResponse:
    state: RouterState = request.app.state.router
    ready = any(v.can_answer for m in state.catalog.models() for v in m.versions.values())
    return JSONResponse({"ready": ready}, status_code=200 if ready else 503)


@router.get("/v2/models/{model_name}")
@router.get("/v2/models/{model_name}/versions/{version}")
async def v2_model_metadata(model_name: str, request: Request, caller: Annotated[Caller, Depends(inference_or_read)],
                            version: str | None = None) -> JSONResponse:
    state: RouterState = request.app.state.router
    served = _v2_served(state, model_name, version, request, caller)  # errors: the handler answers in the /v2 shape
    model = state.catalog.get_model(model_name)
    return JSONResponse(_metadata(served, sorted(model.versions)))


@router.get("/v2/models/{model_name}/ready")
@router.get("/v2/models/{model_name}/versions/{version}/ready")
async def v2_model_ready(model_name: str, request: Request, caller: Annotated[Caller, Depends(inference_or_read)],
                         version: str | None = None) -> JSONResponse:
    state: RouterState = request.app.state.router
    served = _v2_served(state, model_name, version, request, caller)  # errors: the handler answers in the /v2 shape
    return JSONResponse({"name": model_name, "ready": served.can_answer})


@router.post(V2_INFER_PATH, openapi_extra=json_body(V2_INFER_BODY))
@router.post(V2_VERSION_INFER_PATH, openapi_extra=json_body(V2_INFER_BODY))
async def v2_infer(model_name: str, call: V2InferCall, version: str | None = None) -> Response:
    return await answer_v2_infer(call, model_name, version)


async def answer_v2_infer(call: InferenceCall, model_name: str, version: str | None) -> Response:
    """The Open Inference Protocol's infer call, after authentication (the FastAPI routes and the fast routes)."""
    state, record, request = call.state, call.record, call.request
    with call.failures():  # the error handler answers in the /v2 shape
        raw = await call.read(state.settings.max_predict_body_bytes)
        call.identify()
        served = call.resolve(model_name, version, predict=True)
        header_length = request.headers.get("inference-header-content-length")
        try:
            length = int(header_length) if header_length is not None else None
        except ValueError:
            raise InvalidRequest("Inference-Header-Content-Length must be a number of bytes") from None
        parsed = decode_v2(raw, length, _predictor(served).manifest, binary_default=False)
        served, outputs = await _run(call, served, parsed.inputs, _deadline_ms(request, parsed.parameters))
        missing = unknown_outputs(parsed.outputs, outputs)
        if missing:
            raise InvalidRequest(f"unknown outputs {missing}; this model gives {sorted(outputs)}", param="outputs")
    body, headers = encode_v2(served.model_name, served.version, parsed.id, outputs, parsed.outputs,
                              parsed.binary_outputs)
    record.finish(200)
    return Response(body, headers={**headers, **call.answer_headers(served, "router")})


# -- the same calls without FastAPI's routing and dependency injection (router.gateway.fast_routes) --------


async def _fast_predict(request: Request, params: dict[str, str]) -> Response:
    return await answer_predict(begin_call(request, "predict"), params["model_name"])


async def _fast_v2_infer(request: Request, params: dict[str, str]) -> Response:
    return await answer_v2_infer(begin_call(request, "v2_infer"), params["model_name"], params.get("version"))


FAST_ROUTES = (FastRoute("POST", PREDICT_PATH, _fast_predict), FastRoute("POST", V2_INFER_PATH, _fast_v2_infer),
               FastRoute("POST", V2_VERSION_INFER_PATH, _fast_v2_infer))
