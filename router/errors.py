"""One exception tree for everything a client can be told, and its HTTP mapping.

Every error leaves the router as JSON with the right status: the OpenAI shape
``{"error": {"message", "type", "param", "code"}}`` everywhere, and the Open
Inference Protocol's ``{"error": "<message>"}`` under ``/v2``. Nothing a client
sends can produce a traceback in a response.

The tree (status, ``code``)::

    APIError                       500 internal_error
    ├── InvalidRequest             400 invalid_request       a field, the JSON or a header is wrong
    ├── InvalidApiKey              401 invalid_api_key       missing, malformed, unknown, revoked or expired key
    ├── InsufficientScope          403 insufficient_scope    the key lacks the scope the route needs
    ├── PriorityForbidden          403 priority_not_allowed  the caller may not use that X-Priority
    ├── ModelNotFound              404 model_not_found
    ├── VersionNotFound            404 version_not_found
    ├── KeyNotFound                404 key_not_found
    ├── JobNotFound                404 job_not_found         unknown, forgotten, or another key's async job
    ├── RouteNotFound              404 not_found
    ├── MethodNotAllowed           405 method_not_allowed
    ├── ConflictError              409 conflict              a live duplicate, a stale If-Match, a state that forbids it
    ├── PayloadTooLarge            413 payload_too_large
    ├── ClientClosedRequest        499 client_disconnected   the client left before its request was read
    ├── ShedLoad                   429 overloaded            saturated; Retry-After
    ├── RateLimitExceeded          429 rate_limit_exceeded   the key's RPM or TPM; Retry-After, x-ratelimit-*
    ├── QueueFull                  429 queue_full            a predictor's queue is full; Retry-After
    ├── TooManyJobsPending         429 too_many_jobs         the router's async jobs are at their limit; Retry-After
    ├── UpstreamFailed             502 replica_failed        the engine failed while answering
    ├── NoReplicaReady             503 no_replica_ready      starting, restarting or ejected; Retry-After
    ├── DeadlineExceeded           503 deadline_exceeded     saturated past the request's deadline; Retry-After
    ├── PredictorOverloaded        503 overloaded            a predictor cannot meet the deadline; Retry-After
    ├── StoreUnavailable           503 store_unavailable     the control plane's store is down; Retry-After
    └── RequestTimedOut            504 request_timeout       past the request's time budget

The Batch API's own (``router.batches.errors``, subclasses of the tree): FileNotFound and BatchNotFound
(404 file_not_found, batch_not_found), BatchNotCancellable (409), BatchesUnavailable (501: no store).

Domain code raises its own errors, which carry fields and no status; the one
table here (``as_api_error``) turns them into the tree above, for the
handlers and for the request record alike:

    router.store.Conflict                 -> ConflictError
    router.store.NotFound(kind)           -> ModelNotFound | KeyNotFound | VersionNotFound
    router.traffic.split.InvalidSplit     -> InvalidRequest(param="split")
    router.predict.errors.InvalidInput    -> InvalidRequest(param=the field)
    router.predict.errors.Overloaded      -> QueueFull | PredictorOverloaded, with Retry-After
    router.store.Unavailable              -> StoreUnavailable, with Retry-After
    router.jobs.errors.CallbackNotAllowed -> InvalidRequest(param="callback_url", code="callback_not_allowed")
    router.jobs.errors.TooManyJobs        -> TooManyJobsPending, with Retry-After
    starlette's ClientDisconnect          -> ClientClosedRequest (the body was cut: nobody reads the answer)
"""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from router.jobs.errors import CallbackNotAllowed, TooManyJobs
from router.predict.errors import InvalidInput, Overloaded
from router.store.base import Conflict, NotFound, Unavailable
from router.traffic.split import InvalidSplit

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error with everything needed to answer the client."""

    status_code: int = 500
    error_type: str = "server_error"
    code: str = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, object]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers)


class InvalidRequest(APIError):
    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_request"


class InvalidApiKey(APIError):
    status_code = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class InsufficientScope(APIError):
    status_code = 403
    error_type = "permission_error"
    code = "insufficient_scope"


class PriorityForbidden(APIError):
    status_code = 403
    error_type = "permission_error"
    code = "priority_not_allowed"


class ConflictError(APIError):
    status_code = 409
    error_type = "invalid_request_error"
    code = "conflict"


class PayloadTooLarge(APIError):
    status_code = 413
    error_type = "invalid_request_error"
    code = "payload_too_large"


class ClientClosedRequest(APIError):
    """nginx's 499: the connection closed while the request's body was being read. The answer goes
    nowhere; the status is for the record and the metrics, which must not count a client's cut
    body as the router's 500."""

    status_code = 499
    error_type = "invalid_request_error"
    code = "client_disconnected"


class ModelNotFound(APIError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class VersionNotFound(APIError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "version_not_found"


class KeyNotFound(APIError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "key_not_found"


class JobNotFound(APIError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "job_not_found"


class RouteNotFound(APIError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(APIError):
    status_code = 405
    error_type = "invalid_request_error"
    code = "method_not_allowed"


class NoReplicaReady(APIError):
    """No replica of the chosen version can take the request right now."""

    status_code = 503
    error_type = "service_unavailable"
    code = "no_replica_ready"

    def __init__(self, model: str, version: str, retry_after_s: int, detail: str = "") -> None:
        why = detail or "starting, restarting or ejected"
        super().__init__(
            f"no ready replica of {model}:{version} right now ({why}); retry in {retry_after_s}s",
            headers={"Retry-After": str(retry_after_s)},
        )
        self.retry_after_s = retry_after_s


class _RetryLater(APIError):
    """Refusals that tell the client when to come back."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})
        self.retry_after_s = retry_after_s


class ShedLoad(_RetryLater):
    """Refused under overload: the version is saturated and the request cannot wait."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "overloaded"


class RateLimitExceeded(APIError):
    """The key's requests or tokens per minute are spent; the headers say when they are back."""

    status_code = 429
    code = "rate_limit_exceeded"

    def __init__(self, message: str, kind: str, retry_after_s: float, headers: dict[str, str]) -> None:
        super().__init__(message, headers={**headers, "Retry-After": str(max(1, math.ceil(retry_after_s)))})
        self.error_type = kind  # "requests" or "tokens", as OpenAI's type says


class DeadlineExceeded(_RetryLater):
    """The version stayed saturated past the request's deadline."""

    status_code = 503
    error_type = "service_unavailable"
    code = "deadline_exceeded"


class QueueFull(_RetryLater):
    status_code = 429
    error_type = "rate_limit_error"
    code = "queue_full"


class TooManyJobsPending(_RetryLater):
    status_code = 429
    error_type = "rate_limit_error"
    code = "too_many_jobs"


class PredictorOverloaded(_RetryLater):
    status_code = 503
    error_type = "service_unavailable"
    code = "overloaded"


class StoreUnavailable(_RetryLater):
    """A control-plane change could not be stored (Redis down, a full or read-only disk); nothing changed.
    Inference goes on from the router's memory: only the control plane refuses."""

    status_code = 503
    error_type = "service_unavailable"
    code = "store_unavailable"


STORE_RETRY_AFTER_S = 2


class RequestTimedOut(APIError):
    """The answer took longer than the request's time budget; the engine request was aborted."""

    status_code = 504
    error_type = "timeout"
    code = "request_timeout"


class UpstreamFailed(APIError):
    """The engine replica failed (connection lost, crashed) while serving the request."""

    status_code = 502
    error_type = "server_error"
    code = "replica_failed"


def _field_path(loc: tuple[object, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    out = ""
    for part in parts:
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out


def validation_error(exc: RequestValidationError | Exception) -> InvalidRequest:
    """Turn pydantic's error list into one clear message naming the first bad field."""
    errors = exc.errors() if hasattr(exc, "errors") else []
    if not errors:
        return InvalidRequest(str(exc))
    first = errors[0]
    param = _field_path(tuple(first.get("loc", ())))
    message = first.get("msg", "invalid value")
    got = first.get("input")
    detail = f"{param}: {message}" if param else message
    if first.get("type") not in ("missing",) and got is not None and not isinstance(got, (dict, list)):
        detail += f" (got {got!r})"
    if len(errors) > 1:
        detail += f"; and {len(errors) - 1} more problem(s)"
    return InvalidRequest(detail, param=param or None)


def as_api_error(exc: BaseException) -> APIError | None:
    """The client-facing error a domain error stands for; None for anything else (a bug: 500)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, Conflict):
        return ConflictError(str(exc))
    if isinstance(exc, NotFound):
        missing: type[APIError] = {"model": ModelNotFound, "key": KeyNotFound}.get(exc.kind, VersionNotFound)
        return missing(str(exc), param=exc.kind)
    if isinstance(exc, InvalidSplit):
        return InvalidRequest(str(exc), param="split")
    if isinstance(exc, InvalidInput):
        return InvalidRequest(str(exc), param=exc.param)
    if isinstance(exc, Overloaded):
        kind = QueueFull if exc.status == 429 else PredictorOverloaded
        return kind(f"{exc.reason}; retry in {exc.retry_after_s}s", exc.retry_after_s)
    if isinstance(exc, Unavailable):
        return StoreUnavailable(f"{exc}; inference still serves, control-plane changes are refused until "
                                "the store is back", STORE_RETRY_AFTER_S)
    if isinstance(exc, CallbackNotAllowed):
        return InvalidRequest(str(exc), param="callback_url", code="callback_not_allowed")
    if isinstance(exc, TooManyJobs):
        return TooManyJobsPending(str(exc), exc.retry_after_s)
    if isinstance(exc, ClientDisconnect):
        return ClientClosedRequest("the client closed the connection before sending its whole request body")
    return None


_DOMAIN_ERRORS = (Conflict, NotFound, InvalidSplit, InvalidInput, Overloaded, Unavailable, ClientDisconnect,
                  CallbackNotAllowed, TooManyJobs)


def _respond(request: Request, error: APIError) -> JSONResponse:
    """OpenAI-shaped errors everywhere except under /v2, where the Open Inference Protocol's
    ``{"error": "<message>"}`` is what KServe and Triton clients parse."""
    if request.url.path.startswith("/v2"):
        return JSONResponse({"error": error.message}, status_code=error.status_code, headers=error.headers)
    return error.response()


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _respond(request, exc)

    for domain_error in _DOMAIN_ERRORS:
        @app.exception_handler(domain_error)
        async def _domain(request: Request, exc: Exception) -> JSONResponse:
            error = as_api_error(exc)
            assert error is not None
            return _respond(request, error)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _respond(request, validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return _respond(request, RouteNotFound(f"no route {request.method} {request.url.path}; "
                                                   "see /docs for the API"))
        if exc.status_code == 405:
            return _respond(request, MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}"))
        err = APIError(str(exc.detail))
        err.status_code = exc.status_code
        err.error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        err.code = str(exc.status_code)
        return _respond(request, err)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        request_id = getattr(request.state, "request_id", "-")
        logger.exception("request %s failed unexpectedly", request_id)
        return _respond(request, APIError(f"internal error; quote request id {request_id} when reporting it"))
