"""OpenAI's Batch API: ``POST /v1/batches``, ``GET /v1/batches/{id}``, ``GET /v1/batches`` (``after`` and
``limit``), ``POST /v1/batches/{id}/cancel``; and ``line_executor``, how a batch line runs.

A line is the online call itself: ``router.api.openai.relay`` with the batch owner's key (rate limits,
the models it may use), the line's body as the request body, and the ``batch`` priority class forced,
so admission sheds it first. The runner (``router.batches.runner``) decides when lines run.

Predict bulk scoring is the same API with ``endpoint`` ``/api/v1/models/{m}/predict`` and an input file of
rows (``router.batches.rows``); its chunks run through the predict handler (``router.api.batch_predict``).
"""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, FastAPI, Request
from pydantic import BaseModel, Field

from router.access.auth import Caller
from router.api import _inprocess as inprocess
from router.api import openai as openai_api
from router.api.batch_predict import score_chunk
from router.api.files import files_of, visible_file
from router.batches.errors import BatchNotCancellable, BatchNotFound
from router.batches.models import ENDPOINTS, Batch, Line, window_seconds
from router.batches.rows import predict_model
from router.batches.runner import BatchRunner, LineAnswer, LineExecutor
from router.errors import InvalidRequest, ModelNotFound
from router.gateway.authorize import scoped
from router.state import RouterState
from router.store.base import BatchRecord

router = APIRouter(prefix="/v1", tags=["batches"])
Inference = Annotated[Caller, Depends(scoped("inference"))]


class CreateBatch(BaseModel):
    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = Field(None, max_length=16)


def _runner(request: Request) -> BatchRunner:
    state: RouterState = request.app.state.router
    files_of(state)  # BatchesUnavailable without a store
    assert state.batches is not None
    return state.batches


async def _visible(runner: BatchRunner, batch_id: str, caller: Caller) -> Batch:
    record = await runner.store.get_batch(batch_id)
    batch = None if record is None else Batch.of(record)
    if batch is None or not batch.visible_to(caller.key_id, caller.may("admin")):
        raise BatchNotFound(f"no batch {batch_id!r}: unknown, or made with another API key", param="batch_id")
    return batch


def _predict_chunk_rows(request: Request, endpoint: str, caller: Caller) -> int:
    """A predict batch's rows a chunk (0: not a predict endpoint). Its model must be a predict model the
    caller may use (else 404, as unknown as a model that does not exist, or 400)."""
    model = predict_model(endpoint)
    if model is None:
        return 0
    state: RouterState = request.app.state.router
    served = state.catalog.find(model) if caller.may_use(model) else None
    if served is None:
        raise ModelNotFound(f"model {model!r} does not exist", param="endpoint")
    if not served.is_predict:
        raise InvalidRequest(f"model {model!r} is generative, not a predict model; batch its requests with "
                             "endpoint /v1/chat/completions or /v1/completions", param="endpoint")
    return min(state.settings.batches.predict_chunk_rows, state.settings.predict.max_request_rows)


@router.post("/batches")
async def create_batch(body: CreateBatch, request: Request, caller: Inference) -> dict[str, Any]:
    runner = _runner(request)
    chunk_rows = _predict_chunk_rows(request, body.endpoint, caller)
    if body.endpoint not in ENDPOINTS and not chunk_rows:
        raise InvalidRequest(f"endpoint {body.endpoint!r} is not supported; use one of {', '.join(ENDPOINTS)}, "
                             "or /api/v1/models/{model}/predict for a predict model", param="endpoint")
    window = window_seconds(body.completion_window)
    if window is None or window > runner.settings.max_window_s:
        raise InvalidRequest(f"completion_window {body.completion_window!r} must be hours or minutes ('24h', '90m'),"
                             f" at most {runner.settings.max_window_s:g}s", param="completion_window")
    record = await visible_file(runner.files, body.input_file_id, caller)
    if record.purpose != "batch":
        raise InvalidRequest(f"file {record.id} has purpose {record.purpose!r}, not 'batch'", param="input_file_id")
    now = runner.now()
    batch = Batch(endpoint=body.endpoint, input_file_id=record.id, completion_window=body.completion_window,
                  created_at=now, expires_at=now + window, owner=caller.key_id, metadata=body.metadata,
                  chunk_rows=chunk_rows)
    await runner.store.add_batch(batch.to_record())
    runner.wake()
    return batch.view()


@router.get("/batches/{batch_id}")
async def get_batch(batch_id: str, request: Request, caller: Inference) -> dict[str, Any]:
    return (await _visible(_runner(request), batch_id, caller)).view()


@router.get("/batches")
async def list_batches(request: Request, caller: Inference, after: str | None = None, limit: int = 20
                       ) -> dict[str, Any]:
    """The caller's batches, newest first; ``after``: the last id of the previous page."""
    if not 1 <= limit <= 100:
        raise InvalidRequest(f"limit must be 1 to 100, got {limit}", param="limit")
    batches = [b for b in map(Batch.of, await _runner(request).store.list_batches())
               if b.visible_to(caller.key_id, caller.may("admin"))]
    if after is not None:
        ids = [b.id for b in batches]
        if after not in ids:
            raise BatchNotFound(f"no batch {after!r} to list after", param="after")
        batches = batches[ids.index(after) + 1:]
    page = [b.view() for b in batches[:limit]]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(batches) > limit}


@router.post("/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, request: Request, caller: Inference) -> dict[str, Any]:
    """Ask the batch to stop: ``cancelling`` now, ``cancelled`` once its lines in flight have finished
    (its output holds what finished). Cancelling one already cancelling or cancelled is a no-op."""
    runner = _runner(request)
    batch = await _visible(runner, batch_id, caller)
    now = runner.now()

    def change(stored: BatchRecord) -> BatchRecord | None:
        if stored.status not in ("validating", "in_progress"):
            return None
        return BatchRecord(stored.id, "cancelling", stored.created_at, stored.runner, stored.lease_until,
                           {**stored.detail, "cancelling_at": now})

    changed = await runner.store.change_batch(batch.id, change)
    if changed is None:
        batch = await _visible(runner, batch_id, caller)
        if batch.status not in ("cancelling", "cancelled"):
            raise BatchNotCancellable(f"batch {batch_id} is {batch.status}; only a validating or in_progress "
                                      "batch can be cancelled", param="batch_id")
        return batch.view()
    runner.wake()
    return Batch.of(changed).view()


def line_executor(app: FastAPI) -> LineExecutor:
    """How a unit runs: a request made in process through the online handler, as the batch's key (a chat or
    completions line through ``router.api.openai.relay``; a chunk of rows through the predict handler)."""

    async def execute(batch: Batch, line: Line, request_id: str) -> LineAnswer:
        if predict_model(batch.endpoint) is not None:
            return await score_chunk(app, batch, line, request_id)
        return await inprocess.call(app, batch, batch.endpoint, orjson.dumps(line.body), request_id,
                                    lambda call: openai_api.relay(call, batch.endpoint))

    return execute
