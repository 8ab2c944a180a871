"""Async requests: ``POST /api/v1/models/{m}/predict`` and ``/generate`` with ``Prefer: respond-async``
(or ``"params": {"async": true}``) answer 202 with a job; ``GET /api/v1/jobs/{id}`` says how it went.

A request is checked exactly as its synchronous twin is (key and scope, body, rate limits, model and
version), and refused the same way, before any job exists; only then is it a job, whose work is the
synchronous call's own code, run later in the batch band (``router.jobs.runner``). The job's ``result``
is the body that call would have answered, its ``error`` that call's error object. A callback URL
(``params.callback_url`` or the ``X-Callback-URL`` header) on the allow-list gets the job's final JSON.
A job is visible to the API key that made it and to admin keys; to anyone else it does not exist.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated, Literal, TypeVar

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from router.access.auth import Caller
from router.errors import InvalidRequest, JobNotFound, as_api_error
from router.gateway.authorize import scoped
from router.gateway.pipeline import InferenceCall
from router.jobs.callback import check_callback_url
from router.jobs.models import Job, Outcome
from router.jobs.runner import JobRunner
from router.state import RouterState

router = APIRouter(prefix="/api/v1", tags=["jobs"])
T = TypeVar("T")
CALLBACK_HEADER = "x-callback-url"


def async_requested(headers: Mapping[str, str], flag: object) -> bool:
    """Whether the client asked for a job: RFC 7240's ``Prefer: respond-async``, or ``params.async``."""
    if flag is not None and not isinstance(flag, bool):
        raise InvalidRequest(f'"params.async" must be true or false, got {flag!r}', param="params.async")
    preferences = {part.split(";")[0].split("=")[0].strip().lower()
                   for part in headers.get("prefer", "").split(",")}
    return flag is True or "respond-async" in preferences


def callback_of(call: InferenceCall, flag: object, asynchronous: bool) -> str | None:
    """The job's callback URL (checked against the allow-list), from ``params.callback_url`` or the header."""
    url = flag if flag is not None else call.request.headers.get(CALLBACK_HEADER)
    if url is None:
        return None
    if not asynchronous:
        raise InvalidRequest("a callback URL needs an async request: add 'Prefer: respond-async' or "
                             '"params": {"async": true}', param="callback_url")
    return check_callback_url(url, call.state.settings.jobs.callback_hosts)


def _runner(state: RouterState) -> JobRunner:
    assert state.jobs is not None, "the lifespan starts the job runner"
    return state.jobs


async def patiently(call: InferenceCall, attempt: Callable[[], Awaitable[T]]) -> T:
    """A job's ``attempt`` (admission, a predictor's queue), tried again while it is refused for a while."""
    return await _runner(call.state).patiently(attempt)


async def _outcome(work: Callable[[], Awaitable[Response]]) -> Outcome:
    """What the synchronous call answers, caught: its status and JSON body, or its error's."""
    try:
        response = await work()
    except Exception as exc:
        error = as_api_error(exc)
        if error is None:
            raise  # a bug: the runner logs it with its traceback and the job fails with 500
        return Outcome(error.status_code, error.body())
    try:
        body = orjson.loads(bytes(response.body))
    except orjson.JSONDecodeError:
        text = bytes(response.body)[:300].decode(errors="replace")
        body = {"error": {"message": text, "type": "server_error", "param": None, "code": str(response.status_code)}}
    return Outcome(response.status_code, body if isinstance(body, dict) else {"data": body})


async def accept(call: InferenceCall, kind: Literal["predict", "generate"], model: str, callback_url: str | None,
                 work: Callable[[], Awaitable[Response]]) -> Response:
    """202 with the job that will run ``work`` (the rest of the synchronous call) in the background."""
    runner = _runner(call.state)
    job = Job(kind=kind, model=model, owner=call.who.key_id, request_id=call.request_id, created_at=runner.now(),
              callback_url=callback_url, callback_status="pending" if callback_url else None)

    async def run() -> Outcome:
        call.run_as_job()
        return await _outcome(work)

    await runner.submit(job, run)
    headers = {**call.headers, "x-request-id": call.request_id, "location": job.status_url,
               "preference-applied": "respond-async"}
    return JSONResponse(runner.view(job).model_dump(mode="json"), status_code=202, headers=headers)


@router.get("/jobs/{job_id}")
async def get_job(job_id: str, request: Request, caller: Annotated[Caller, Depends(scoped("inference"))]
                  ) -> JSONResponse:
    """An async job's status, and its result or error once it has finished."""
    state: RouterState = request.app.state.router
    runner = _runner(state)
    job = await runner.get(job_id)
    if job is None or not job.visible_to(caller.key_id, caller.may("admin")):
        raise JobNotFound(f"no async job {job_id!r}: unknown, made with another API key, or forgotten after its "
                          f"retention ({runner.settings.retention_s:g}s, then as long again as expired)",
                          param="job_id")
    return JSONResponse(runner.view(job).model_dump(mode="json"))
