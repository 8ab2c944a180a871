"""The one request pipeline of every inference handler (``/v1/*``, ``/generate``, ``/predict``, ``/v2/.../infer``).

Steps, in this order, each a method of ``InferenceCall``:

0. **authenticate** the API key (401) and its ``inference`` scope (403), before the body is read:
   done by the dependency that starts the call, so no route can skip it;
1. **read** the body (bounded: 413 past the route's limit) and parse it (400 naming the field);
2. **identify** the user that keeps one version of a split (the body's ``user``, ``X-User-Id``,
   else the key's id);
3. **limit**: the key's requests and tokens per minute (429), reserving the request's tokens
   until it ends (``router.access.ratelimit``);
4. **resolve** the model and version (a pin, else the split by user); a model the key may not
   use is as unknown as one that does not exist (404);
5. **admit** under load: priority (the key's default, or what it allows), deadline, shedding or
   the fallback model; counted in flight for its version and class (the autoscaler's demand); a
   version scaled to zero **holds** the request while its first replica starts (``cold_start``);
6. the handler **opens** the upstream (an engine replica, or a predictor's batcher) and answers.

The call's ``headers`` collect what the response must carry (priority,
fallback, dropped tools), on error answers too, and ``failures()`` finishes
the request's record for any exception a step raises. Handlers get the call
with ``Depends(inference(route))``, the way vLLM's routers delegate to their
serving classes.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from pydantic import BaseModel

from router.access import ratelimit
from router.access.auth import Caller
from router.admission.shedding import admit_request
from router.errors import ModelNotFound, RateLimitExceeded, VersionNotFound
from router.gateway.authorize import caller_of
from router.gateway.protocol import parse_json_object, read_body, validate
from router.observe.request_record import RequestRecord, served_headers, user_key
from router.state import RouterState
from router.traffic.catalog import ServedVersion
from router.traffic.cold_start import Hold

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
        self.caller: Caller | None = None
        self.body_bytes = 0
        self.priority: str | None = None  # a class forced on the call (an async job's: batch), else X-Priority's

    # 0. authenticate
    def authenticate(self) -> Caller:
        caller = caller_of(self.state, self.request.headers)
        caller.require("inference")
        self.caller, self.record.key_id = caller, caller.key_id
        return caller

    @property
    def who(self) -> Caller:
        assert self.caller is not None, "the call was not authenticated"
        return self.caller

    @contextmanager
    def failures(self) -> Iterator[None]:
        with self.record.failures(self.headers):
            yield

    # 1. read and parse
    async def read(self, limit: int | None = None) -> bytes:
        limit = self.state.settings.max_body_bytes if limit is None else limit
        body = await read_body(self.request.stream(), self.request.headers.get("content-length"), limit)
        self.body_bytes = len(body)
        return body

    async def read_json(self) -> dict[str, Any]:
        return parse_json_object(await self.read())

    @staticmethod
    def parse(schema: type[Schema], payload: dict[str, Any]) -> Schema:
        return validate(schema, payload)

    # 2. identify the user
    def identify(self, body_user: str | None = None) -> str | None:
        self.record.user = user_key(self.request.headers, body_user, self.who.key_id)
        return self.record.user

    # 3. limit
    async def limit(self, tokens: int, prompt_estimate: int = 0, counts_rows: bool = False) -> None:
        """One request and ``tokens`` reserved against the key's limits, or 429 before any routing work.

        ``prompt_estimate``: what the prompt counts for when the engine reports no usage (a stream whose
        client did not ask for it); ``counts_rows``: a prediction, whose rows are its tokens.
        """
        caller = self.who
        if caller.key_id is None or (caller.rpm is None and caller.tpm is None):
            return
        admission = await self.state.limiter.acquire(caller.key_id, caller.rpm, caller.tpm, tokens)
        limit_headers = ratelimit.headers(admission)
        self.headers.update(limit_headers)  # on every answer, before a stream's first byte
        if not admission.allowed:
            kind, decision = ("requests", admission.requests) \
                if admission.requests is not None and not admission.requests.allowed else ("tokens", admission.tokens)
            assert decision is not None
            self.state.metrics.key_refused(caller.key_id, kind)
            wait = admission.retry_after_s
            raise RateLimitExceeded(
                f"API key {caller.name} ({caller.key_id}) reached its {kind} per minute limit ({decision.limit}"
                f"{'; this request reserves ' + str(tokens) if kind == 'tokens' else ''}); retry in {wait:.1f}s",
                kind, wait, limit_headers)
        if caller.tpm is not None:
            key_id, tpm, state = caller.key_id, caller.tpm, self.state

            def settle(record: RequestRecord) -> None:
                used = _tokens_used(record, tokens, prompt_estimate, counts_rows)
                state.metrics.key_tokens(key_id, used)
                state.background.spawn(state.limiter.settle(key_id, tpm, admission, used),
                                       name=f"settle {record.request_id}")

            self.record.on_finish.append(settle)

    async def limit_generation(self, max_tokens: int | None) -> None:
        """An LLM request: it reserves its prompt (about four bytes of body a token) and its output
        (``max_tokens``, else ``auth.reserved_tokens``) until it ends."""
        prompt = self.body_bytes // 4
        output = max_tokens if max_tokens is not None else self.state.settings.auth.reserved_tokens
        await self.limit(prompt + output, prompt_estimate=prompt)

    # 4. resolve
    def resolve(self, model: str, pinned_version: str | None = None, predict: bool = False) -> ServedVersion:
        caller = self.who
        if not caller.may_use(model):
            raise self._unknown_to_caller(model)
        try:
            served = self.state.catalog.resolve(model, pinned_version, self.record.user,
                                                retry_after_s=self.state.settings.retry_after_s, predict=predict)
        except ModelNotFound:
            if caller.models is None:
                raise
            raise self._unknown_to_caller(model) from None  # the full message lists every served model
        if self.state.shadows.is_shadow(served.model_name, served.version):  # pinned: a shadow answers nobody
            raise VersionNotFound(f"{served.versioned_name} is a shadow version: it answers no client (its "
                                  "comparison is at GET /api/v1/deployments/{model}/shadow)", param="version")
        self.record.resolved(served.model_name, served.version)
        return served

    def _unknown_to_caller(self, model: str) -> ModelNotFound:
        """The 404 of an unknown model, listing only the models this key may use."""
        known = ", ".join(sorted(m.name for m in self.state.catalog.models() if self.who.may_use(m.name))) or "none"
        return ModelNotFound(f"model {model!r} does not exist; served models: {known}", param="model")

    # 5. admit
    async def admit(self, served: ServedVersion) -> ServedVersion:
        answering, extra = await admit_request(self.state.admission, self.request.headers, served, self.record.user,
                                               self.who, self.priority)
        self.record.admitted_at = time.perf_counter()
        self.headers.update(extra)
        self.record.priority = extra.get("x-priority", "standard")
        end = self.state.demand.begin(answering.model_name, answering.version, self.record.priority)
        self.record.on_finish.append(lambda _record: end())
        return answering

    # 5b. a version scaled to zero: a place in its cold-start queue (429 when full), or None
    def cold_start(self, served: ServedVersion) -> Hold | None:
        cold = self.state.cold_starts
        if cold is None or not cold.needs_hold(served):
            return None
        return cold.reserve(served)

    # 5c. an async job: the call goes on in the background after its 202
    def run_as_job(self) -> None:
        """From here on the call is an async job's: admitted in the batch band, with a fresh time budget and
        its latency (TTFT included) timed from when the job starts, not from its wait in the job queue."""
        self.priority = "batch"
        self.deadline = self.state.relay.deadline()
        self.record.started = time.perf_counter()

    # 6. what a successful answer carries
    def answer_headers(self, served: ServedVersion, replica_id: str) -> dict[str, str]:
        return {**served_headers(self.request_id, served.version, replica_id), **self.headers}


def begin_call(request: Request, route: str) -> InferenceCall:
    """A call through the pipeline for ``route`` (its log and metric name), authenticated (step 0).

    On the event loop (its clock sets the deadline); the FastAPI dependency below and the routes
    answered without FastAPI (``router.gateway.fast_routes``) both start their calls here."""
    call = InferenceCall(request, request.app.state.router, route)
    with call.failures():  # a refused key is a request like any other: counted, logged, answered
        call.authenticate()
    return call


def inference(route: str) -> Callable[[Request], Awaitable[InferenceCall]]:
    """The FastAPI dependency that starts a call through the pipeline for ``route``."""

    async def start(request: Request) -> InferenceCall:  # async: on the event loop, whose clock sets the deadline
        return begin_call(request, route)

    return start


def _tokens_used(record: RequestRecord, reserved: int, prompt_estimate: int, counts_rows: bool) -> int:
    """What a finished request used of its key's tokens: the engine's usage when it reported it (prompt and
    completion), else the prompt's estimate and what was relayed; a prediction's rows once answered;
    nothing for a request that never reached an engine."""
    if counts_rows:
        return reserved if record.status_code == 200 else 0
    if not record.replica:
        return 0
    output = record.output_tokens or 0
    return (record.prompt_tokens if record.prompt_tokens is not None else prompt_estimate) + output

