"""OpenAI's Batch API: ``POST /v1/batches``, ``GET /v1/batches/{id}``, ``GET /v1/batches`` (``after`` and
``limit``), ``POST /v1/batches/{id}/cancel``; and ``line_executor``, how a batch line runs.

A line is the online call itself: ``router.api.openai.relay`` with the batch owner's key (rate limits,
the models it may use), the line's body as the request body, and the ``batch`` priority class forced,
so admission sheds it first. The runner (``router.batches.runner``) decides when lines run.
"""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, FastAPI, Request
from pydantic import BaseModel, Field

from router.access.auth import Caller
from router.api import openai as openai_api
from router.api.files import files_of, visible_file
from router.batches.errors import BatchNotCancellable, BatchNotFound
from router.batches.models import ENDPOINTS, Batch, Line, window_seconds
from router.batches.runner import BatchRunner, LineAnswer, LineExecutor
from router.errors import APIError, InvalidRequest, as_api_error
from router.gateway.authorize import caller_of, scoped
from router.gateway.pipeline import InferenceCall
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


@router.post("/batches")
async def create_batch(body: CreateBatch, request: Request, caller: Inference) -> dict[str, Any]:
    runner = _runner(request)
    if body.endpoint not in ENDPOINTS:
        raise InvalidRequest(f"endpoint {body.endpoint!r} is not supported; use one of {', '.join(ENDPOINTS)}",
                             param="endpoint")
    window = window_seconds(body.completion_window)
    if window is None or window > runner.settings.max_window_s:
        raise InvalidRequest(f"completion_window {body.completion_window!r} must be hours or minutes ('24h', '90m'),"
                             f" at most {runner.settings.max_window_s:g}s", param="completion_window")
    record = await visible_file(runner.files, body.input_file_id, caller)
    if record.purpose != "batch":
        raise InvalidRequest(f"file {record.id} has purpose {record.purpose!r}, not 'batch'", param="input_file_id")
    now = runner.now()
    batch = Batch(endpoint=body.endpoint, input_file_id=record.id, completion_window=body.completion_window,
                  created_at=now, expires_at=now + window, owner=caller.key_id, metadata=body.metadata)
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


def _retry_after(error: APIError) -> float | None:
    wait = error.headers.get("Retry-After")
    try:
        return float(wait) if wait is not None and error.status_code in (429, 503) else None
    except ValueError:
        return None


def line_executor(app: FastAPI) -> LineExecutor:
    """How a line runs: a request made in process (no socket) through the online handler, as the batch's key."""

    async def execute(batch: Batch, line: Line, request_id: str) -> LineAnswer:
        state: RouterState = app.state.router
        body = orjson.dumps(line.body)
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": batch.endpoint, "raw_path": batch.endpoint.encode(), "root_path": "",
                 "query_string": b"", "client": ("batch", 0), "server": ("router", 0), "app": app,
                 "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                             (b"x-request-id", request_id.encode()), (b"x-priority", b"batch")],
                 "state": {"request_id": request_id}}
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        call = InferenceCall(Request(scope, receive), state, batch.endpoint)
        try:
            with call.failures():
                call.caller = state.keys.caller_by_id(batch.owner) if batch.owner else caller_of(state, {})
                call.record.key_id = call.caller.key_id
            call.run_as_job()  # the batch band, its time budget from now
            response = await openai_api.relay(call, batch.endpoint)
        except Exception as exc:
            error = as_api_error(exc)
            if error is None:
                raise
            return LineAnswer(error.status_code, error.body(), _retry_after(error))
        try:
            answer = orjson.loads(bytes(response.body))
        except orjson.JSONDecodeError:
            answer = {"error": {"message": bytes(response.body)[:300].decode(errors="replace"),
                                "type": "server_error", "param": None, "code": str(response.status_code)}}
        return LineAnswer(response.status_code, answer if isinstance(answer, dict) else {"data": answer})

    return execute
