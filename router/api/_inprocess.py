"""A batch unit run as a request made in process (no socket) through an online handler, as the batch's key,
in the ``batch`` priority band: what ``router.api.batches.line_executor`` does for every batch endpoint."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response

from router.batches.models import Batch
from router.batches.runner import LineAnswer
from router.errors import APIError, as_api_error
from router.gateway.authorize import caller_of
from router.gateway.pipeline import InferenceCall
from router.state import RouterState

Handler = Callable[[InferenceCall], Awaitable[Response]]


def _retry_after(error: APIError) -> float | None:
    wait = error.headers.get("Retry-After")
    try:
        return float(wait) if wait is not None and error.status_code in (429, 503) else None
    except ValueError:
        return None


async def call(app: FastAPI, batch: Batch, route: str, body: bytes, request_id: str, handler: Handler) -> LineAnswer:
    """POST ``body`` (JSON) to ``batch.endpoint`` through ``handler`` as the batch's owner; the answer's status
    and JSON body, and the Retry-After of a refusal."""
    state: RouterState = app.state.router
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

    inference = InferenceCall(Request(scope, receive), state, route)
    try:
        with inference.failures():
            inference.caller = state.keys.caller_by_id(batch.owner) if batch.owner else caller_of(state, {})
            inference.record.key_id = inference.caller.key_id
        inference.run_as_job()  # the batch band, its time budget from now
        response = await handler(inference)
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
