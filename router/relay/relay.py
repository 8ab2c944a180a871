"""Sending a request to an engine replica and relaying its answer.

``Relay.open`` picks a replica, sends the request and returns once the
replica's status line has arrived. A replica that fails before sending
anything is skipped and the request goes to another ready replica (nothing
has reached the client yet, so a retry is safe); only a refused connection
ejects it, because that is evidence the engine is down. A timeout never
ejects: a long generation says nothing about the replica's health.
After that, bytes flow through unchanged: ``sse_data`` cuts the engine's SSE
stream into events as they arrive (``router.relay.sse``), never waiting for
more than one event.

Every request has a time budget (a deadline on the event loop's clock). Past
it the upstream connection is closed, which is how vLLM learns to abort the
request, and the caller gets ``RequestTimedOut`` (before any output) or
``UpstreamTimedOut`` (from ``read`` or mid-stream).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from fastapi.responses import Response

from llmserve.replicas.backend import Endpoint
from llmserve.settings import RouterSettings
from router.errors import APIError, NoReplicaReady, RequestTimedOut, UpstreamFailed
from router.observe.request_record import RequestRecord, served_headers
from router.relay.sse import Decoder, encode
from router.traffic.balancer import LeastOutstanding
from router.traffic.catalog import ServedVersion

logger = logging.getLogger(__name__)


class UpstreamBroken(Exception):
    """The replica's response ended abnormally (connection lost, stalled past the idle timeout)."""

    code = "replica_failed"


class UpstreamStalled(UpstreamBroken):
    """No bytes from the replica for longer than the socket read timeout."""

    def __init__(self, first_chunk: bool, timeout_s: float) -> None:
        what = "sent no first token" if first_chunk else "went silent mid-stream"
        super().__init__(f"the replica {what} for {timeout_s:g}s")
        self.code = "first_token_timeout" if first_chunk else "stream_stalled"


class UpstreamTimedOut(UpstreamBroken):
    """The request's time budget ran out while the replica was answering; the request was aborted."""

    code = "request_timeout"

    def __init__(self, budget_s: float) -> None:
        super().__init__(budget_message(budget_s))


def budget_message(budget_s: float) -> str:
    return (f"the answer did not finish within the request's time budget of {budget_s:g}s "
            "(LLMSERVE_ROUTER__REQUEST_TIMEOUT_S) and the engine request was aborted; ask for fewer tokens "
            "(max_tokens) or stream the answer")


@dataclass(eq=False)
class Upstream:
    """An open response from one replica; ``aclose`` must be called exactly once.

    A timer closes the response when the request's budget runs out (one timer a
    request, nothing per chunk); reads then raise ``UpstreamTimedOut``.
    """

    replica: Endpoint
    served: ServedVersion
    response: aiohttp.ClientResponse
    budget_s: float = 0.0
    deadline: float | None = None
    stall_timeout_s: float = 0.0
    first: bytes = b""  # a stream's first chunk, read by ``Relay.open`` before it chose this replica for good
    timed_out: bool = False
    client_gone: bool = False
    _closed: bool = field(default=False, repr=False)
    _timer: asyncio.TimerHandle | None = field(default=None, repr=False)
    _seen_bytes: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        if self.deadline is not None:
            self._timer = asyncio.get_running_loop().call_at(self.deadline, self._expire)

    def _expire(self) -> None:
        self.timed_out = True
        self.response.close()

    @property
    def status_code(self) -> int:
        return self.response.status

    def _failure(self, exc: BaseException) -> UpstreamBroken:
        if self.timed_out:
            return UpstreamTimedOut(self.budget_s)
        if isinstance(exc, asyncio.TimeoutError):
            return UpstreamStalled(not self._seen_bytes, self.stall_timeout_s)
        return UpstreamBroken(type(exc).__name__)

    async def read(self) -> bytes:
        try:
            content = await self.response.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise self._failure(exc) from exc
        if self.timed_out:
            raise UpstreamTimedOut(self.budget_s)
        return content

    async def chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive; raises UpstreamBroken if the replica fails mid-way."""
        content = self.response.content
        try:
            if self.first:
                first, self.first = self.first, b""
                self._seen_bytes = True
                yield first
            async for chunk in content.iter_any():
                self._seen_bytes = True
                yield chunk
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            if self.client_gone:  # on_client_gone closed it: end the relay as its cancellation would
                raise asyncio.CancelledError("the client went away") from exc
            raise self._failure(exc) from exc
        if self.timed_out:  # closing may end the body as a clean EOF
            raise UpstreamTimedOut(self.budget_s)

    async def on_client_gone(self, message: object = None) -> None:
        """The client left a stream (``EventStream`` calls this once ``connection_lost`` wakes it): close the
        engine's connection now, so the engine aborts, and the relay's next read or event (``sse_data``)
        ends it. Cancelling the relay task is not enough: a task is cancelled only where it waits, and a
        relay with a backlog (a reader that stopped, then reset) always has a chunk ready."""
        self.client_gone = True
        self.response.close()

    async def aclose(self) -> None:
        """Release the replica. An unfinished stream's connection is closed, not
        pooled: the dropped connection is how vLLM learns to abort the request."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        self.replica.outstanding -= 1
        if self.response.content.is_eof():
            self.response.release()
        else:
            self.response.close()


class Relay:
    """Sends requests to replicas over a pooled aiohttp session.

    aiohttp rather than httpx on this hot path: httpx's connection pool
    costs O(open connections) per request and several times aiohttp's CPU
    per streamed chunk, which showed up directly as added TTFT and ITL.
    """

    def __init__(self, settings: RouterSettings, on_replica_failure: Callable[[Endpoint, str], None],
                 balancer: LeastOutstanding | None = None) -> None:
        self._settings = settings
        self._balancer = balancer or LeastOutstanding()
        self._on_replica_failure = on_replica_failure
        # A stream stalls when no bytes come for the read timeout; a buffered answer comes all at
        # the end (vLLM sends nothing before), so only the request's budget bounds it.
        self._stall_timeout_s = max(settings.first_token_timeout_s, settings.idle_stream_timeout_s)
        self._stream_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=settings.connect_timeout_s, sock_read=self._stall_timeout_s)
        self._buffered_timeout = aiohttp.ClientTimeout(total=None, sock_connect=settings.connect_timeout_s)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=0, limit_per_host=settings.max_connections_per_replica, keepalive_timeout=30
            ),
            timeout=self._stream_timeout,
            auto_decompress=False,
            trust_env=False,
        )

    async def aclose(self) -> None:
        await self._session.close()

    def deadline(self, started: float | None = None) -> float:
        """The event-loop time at which a request that arrived at ``started`` (default: now) runs out."""
        loop = asyncio.get_running_loop()
        return (loop.time() if started is None else started) + self._settings.request_timeout_s

    async def open(
        self, served: ServedVersion, path: str, payload: dict[str, Any], request_id: str, deadline: float,
        stream: bool = True,
    ) -> Upstream:
        """Send the request to a replica of ``served``; the answer must be complete by ``deadline``."""
        body = json.dumps(payload, separators=(",", ":")).encode()
        headers = {"content-type": "application/json", "x-request-id": request_id}
        timeout = self._stream_timeout if stream else self._buffered_timeout
        budget_s = self._settings.request_timeout_s
        tried: set[Endpoint] = set()
        refused = 0
        stalled: Endpoint | None = None  # the last replica that answered its headers, then no first token
        last_error = ""
        for _attempt in range(1 + self._settings.retry_before_first_token):
            replica = self._balancer.pick(served.replicas, exclude=tried)
            if replica is None:
                break
            tried.add(replica)
            replica.outstanding += 1
            try:
                async with asyncio.timeout_at(deadline):
                    response = await self._session.post(replica.url + path, data=body, headers=headers,
                                                        timeout=timeout)
            except aiohttp.ClientConnectorError as exc:
                # Refused or unreachable: the engine is down, so it leaves the rotation until a
                # health check passes, and another replica may take the request (nothing was processed).
                replica.outstanding -= 1
                last_error = f"{type(exc).__name__}: {exc}"
                logger.warning("request %s: replica %s refused the connection (%s); ejected",
                               request_id, replica.id, last_error)
                self._on_replica_failure(replica, last_error)
                refused += 1
                continue
            except aiohttp.ConnectionTimeoutError as exc:
                replica.outstanding -= 1
                last_error = f"{type(exc).__name__}: no connection within {self._settings.connect_timeout_s:g}s"
                logger.warning("request %s: replica %s: %s; trying another", request_id, replica.id, last_error)
                continue
            except asyncio.TimeoutError as exc:
                # The budget ran out, or (a stream) no status line within the read timeout. Either
                # way the replica may be healthy and busy: it stays, and the request is aborted.
                replica.outstanding -= 1
                if asyncio.get_running_loop().time() >= deadline:
                    raise self._budget_spent(served, replica, request_id) from exc
                raise self._not_started(served, replica, request_id, self._stall_timeout_s) from exc
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
                # Reset or closed before a status line (a stale pooled connection, an engine going
                # down): not proof of ill health, which the health checks judge; another replica may try.
                replica.outstanding -= 1
                last_error = f"{type(exc).__name__}: {exc}"
                logger.warning("request %s: replica %s failed before answering (%s); trying another",
                               request_id, replica.id, last_error)
                continue
            except BaseException:
                replica.outstanding -= 1
                raise
            another = self._balancer.pick(served.replicas, exclude=tried) is not None
            if response.status >= 500 and another and len(tried) <= self._settings.retry_before_first_token:
                text = (await response.read())[:300].decode(errors="replace")
                response.release()
                replica.outstanding -= 1
                last_error = f"status {response.status}: {text}"
                logger.warning("request %s: replica %s answered %s; trying another", request_id, replica.id, last_error)
                continue
            first = b""
            if stream and response.status == 200:
                # Nothing has reached the client yet, so a replica that answers its headers and then
                # hangs (a stuck prefill) can still be left for another: wait first_token_timeout_s
                # for its first chunk (one timer a request), then try the next replica.
                try:
                    async with asyncio.timeout_at(min(deadline, asyncio.get_running_loop().time()
                                                      + self._settings.first_token_timeout_s)):
                        first = await response.content.readany()
                except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
                    response.close()
                    replica.outstanding -= 1
                    if asyncio.get_running_loop().time() >= deadline:
                        raise self._budget_spent(served, replica, request_id) from exc
                    last_error = (f"no first token within {self._settings.first_token_timeout_s:g}s"
                                  if isinstance(exc, asyncio.TimeoutError) else f"{type(exc).__name__}: {exc}")
                    stalled = replica if isinstance(exc, asyncio.TimeoutError) else stalled
                    logger.warning("request %s: replica %s: %s; trying another", request_id, replica.id, last_error)
                    continue
            return Upstream(replica=replica, served=served, response=response, budget_s=budget_s,
                            deadline=deadline, stall_timeout_s=self._stall_timeout_s, first=first)
        if not tried:
            raise NoReplicaReady(served.model_name, served.version, self._settings.retry_after_s)
        if stalled is not None:  # healthy but too slow to start: the same answer as no status line in time
            raise self._not_started(served, stalled, request_id, self._settings.first_token_timeout_s)
        # Every replica tried failed before answering and the request was
        # never processed, so this is "unavailable, retry".
        what = "refused the connection and were ejected" if refused == len(tried) else "could not take the request"
        raise NoReplicaReady(served.model_name, served.version, self._settings.retry_after_s,
                             detail=f"{len(tried)} replica(s) {what}: {last_error}")

    def _budget_spent(self, served: ServedVersion, replica: Endpoint, request_id: str) -> RequestTimedOut:
        return RequestTimedOut(f"{served.versioned_name}: {budget_message(self._settings.request_timeout_s)}",
                               headers=served_headers(request_id, served.version, replica.id))

    def _not_started(self, served: ServedVersion, replica: Endpoint, request_id: str,
                     waited_s: float) -> RequestTimedOut:
        return RequestTimedOut(
            f"replica {replica.id} did not start answering within {waited_s:g}s "
            "(LLMSERVE_ROUTER__FIRST_TOKEN_TIMEOUT_S); the request was aborted, retry it",
            code="first_token_timeout",
            headers={**served_headers(request_id, served.version, replica.id),
                     "Retry-After": str(self._settings.retry_after_s)})


async def sse_data(upstream: Upstream) -> AsyncIterator[bytes]:
    """Yield the data of each SSE event (``[DONE]`` included) as soon as the event is complete. Between the
    events of one chunk (a backlog) the loop gets a turn (16 backlogs relayed in one step each held it for
    seconds, their clients' resets unseen); once the client is gone (``on_client_gone``) the rest is dropped."""
    decoder = Decoder()
    async for chunk in upstream.chunks():
        for n, event in enumerate(decoder.feed(chunk)):
            if n:
                await asyncio.sleep(0)
                if upstream.client_gone:
                    raise asyncio.CancelledError("the client went away")
            yield event.data


def engine_message(content: bytes) -> str:
    """The message of an engine's error body (vLLM's OpenAI error shape), else its first bytes."""
    try:
        return str(json.loads(content)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return content[:200].decode(errors="replace")


def engine_failure(upstream: Upstream, content: bytes) -> UpstreamFailed:
    """An engine's 5xx as the router's 502: the client learns which replica failed and why."""
    detail = engine_message(content)
    return UpstreamFailed(f"replica {upstream.replica.id} failed ({upstream.status_code}: {detail}); "
                          "retry the request")


async def buffered_response(upstream: Upstream, record: RequestRecord, headers: dict[str, str]) -> Response:
    """A whole answer, or an engine's error status, relayed as one response and recorded: an engine's
    5xx becomes the router's 502, a read past the budget 504, a broken read 502."""
    try:
        content = await upstream.read()
    except UpstreamTimedOut as exc:
        error: APIError = RequestTimedOut(str(exc), headers=headers)
        record.fail(error)
        return error.response()
    except UpstreamBroken as exc:
        message = f"replica {upstream.replica.id} failed while answering ({exc}); retry the request"
        error = UpstreamFailed(message, headers=headers)
        record.fail(error)
        return error.response()
    finally:
        await upstream.aclose()
    if upstream.status_code >= 500:
        failure = engine_failure(upstream, content)
        failure.headers = headers
        record.fail(failure)
        return failure.response()
    record.note_usage(content)
    if record.tap is not None:
        record.tap.append(content)
    if upstream.status_code != 200:
        record.failed(engine_error_code(content), content[:300].decode(errors="replace"))
    record.finish(upstream.status_code)
    return Response(content, status_code=upstream.status_code, media_type="application/json", headers=headers)


def engine_error_code(content: bytes) -> str:
    """The reason to record for an engine's 4xx: its error type (vLLM: ``BadRequestError``, ...)."""
    try:
        kind = json.loads(content)["error"]["type"]
    except (ValueError, KeyError, TypeError):
        return "engine_error"
    return f"engine_{kind}" if isinstance(kind, str) and kind else "engine_error"


sse_bytes = encode  # one SSE event, framed as vLLM frames them (the routes' name for it)
