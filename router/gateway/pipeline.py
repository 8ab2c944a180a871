"""The one request pipeline of every inference handler (``/v1/*``, ``/generate``, ``/predict``, ``/v2/.../infer``).

Steps, in this order, each a method of ``InferenceCall``:

1. **read** the body (bounded: 413 past the route's limit) and parse it (400 naming the field);
2. **identify** the caller: the user key that keeps a user on one version of a split.
   Authentication and rate limits (API keys with scopes, token buckets) are the
   next steps to add here, before anything is resolved, so a refused caller
   costs no routing work;
3. **resolve** the model and version (a pin, else the split by user);
4. **admit** under load: priority, deadline, shedding or the fallback model;
5. the handler **opens** the upstream (an engine replica, or a predictor's batcher) and answers.

The call's ``headers`` collect what the response must carry (priority,
fallback, dropped tools), on error answers too, and ``failures()`` finishes
the request's record for any exception a step raises. Handlers get the call
with ``Depends(inference(route))``, the way vLLM's routers delegate to their
serving classes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from pydantic import BaseModel

from router.admission.shedding import admit_request
from router.gateway.protocol import parse_json_object, read_body, validate
from router.observe.request_record import RequestRecord, served_headers, user_key
from router.state import RouterState
from router.traffic.catalog import ServedVersion

Schema = TypeVar("Schema", bound=BaseModel)


async def get_state(request: Request) -> RouterState:
    """The router's state, owned by the app's lifespan."""
    state: RouterState = request.app.state.router
    return state


State = Annotated[RouterState, Depends(get_state)]


class InferenceCall:
    def __init__(self, request: Request, state: RouterState, route: str) -> None:
        self.request = request
        self.state = state
        self.request_id: str = request.state.request_id
        self.deadline = state.relay.deadline()
        self.record = RequestRecord(self.request_id, route, sink=state.log_sink, metrics=state.metrics,
                                    samples=state.samples)
        self.headers: dict[str, str] = {}  # what the answer carries, error answers included

    @contextmanager
    def failures(self) -> Iterator[None]:
        with self.record.failures(self.headers):
            yield

    # 1. read and parse
    async def read(self, limit: int | None = None) -> bytes:
        limit = self.state.settings.max_body_bytes if limit is None else limit
        return await read_body(self.request.stream(), self.request.headers.get("content-length"), limit)

    async def read_json(self) -> dict[str, Any]:
        return parse_json_object(await self.read())

    @staticmethod
    def parse(schema: type[Schema], payload: dict[str, Any]) -> Schema:
        return validate(schema, payload)

    # 2. identify the caller (authentication and rate limits go here)
    def identify(self, body_user: str | None = None) -> str | None:
        self.record.user = user_key(self.request.headers, body_user)
        return self.record.user

    # 3. resolve
    def resolve(self, model: str, pinned_version: str | None = None, predict: bool = False) -> ServedVersion:
        served = self.state.catalog.resolve(model, pinned_version, self.record.user,
                                            retry_after_s=self.state.settings.retry_after_s, predict=predict)
        self.record.resolved(served.model_name, served.version)
        return served

    # 4. admit
    async def admit(self, served: ServedVersion) -> ServedVersion:
        answering, extra = await admit_request(self.state.admission, self.request.headers, served, self.record.user)
        self.headers.update(extra)
        return answering

    # 5. what a successful answer carries
    def answer_headers(self, served: ServedVersion, replica_id: str) -> dict[str, str]:
        return {**served_headers(self.request_id, served.version, replica_id), **self.headers}


def inference(route: str) -> Callable[[Request], Awaitable[InferenceCall]]:
    """The FastAPI dependency that starts a call through the pipeline for ``route`` (its log and metric name)."""

    async def start(request: Request) -> InferenceCall:  # async: on the event loop, whose clock sets the deadline
        return InferenceCall(request, request.app.state.router, route)

    return start

