"""Sending a request to an engine replica and relaying its answer.

``Relay.open`` picks a replica, sends the request and returns once the
replica's status line has arrived. A replica that refuses the connection or
fails before sending anything is ejected and the request goes to another
ready replica (nothing has reached the client yet, so a retry is safe).
After that, bytes flow through unchanged: ``sse_data`` cuts the engine's SSE
stream into events as they arrive, never waiting for more than one event.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from llmserve.replica import Replica
from llmserve.settings import RouterSettings
from router.balancer import LeastOutstanding
from router.catalog import ServedVersion
from router.errors import NoReplicaReady, UpstreamFailed

logger = logging.getLogger(__name__)

_EVENT_END = b"\n\n"
_DATA_PREFIX = b"data: "


class UpstreamBroken(Exception):
    """The replica's response ended abnormally (connection lost, stalled past the idle timeout)."""


@dataclass(eq=False)
class Upstream:
    """An open response from one replica; ``aclose`` must be called exactly once."""

    replica: Replica
    served: ServedVersion
    response: aiohttp.ClientResponse
    _closed: bool = field(default=False, repr=False)

    @property
    def status_code(self) -> int:
        return self.response.status

    async def read(self) -> bytes:
        try:
            return await self.response.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise UpstreamBroken(type(exc).__name__) from exc

    async def chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive; raises UpstreamBroken if the replica fails mid-way."""
        try:
            async for chunk in self.response.content.iter_any():
                yield chunk
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise UpstreamBroken(type(exc).__name__) from exc

    async def aclose(self) -> None:
        """Release the replica. An unfinished stream's connection is closed, not
        pooled: the dropped connection is how vLLM learns to abort the request."""
        if self._closed:
            return
        self._closed = True
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

    def __init__(
        self,
        settings: RouterSettings,
        on_replica_failure: Callable[[Replica, str], None],
        balancer: LeastOutstanding | None = None,
    ) -> None:
        self._settings = settings
        self._balancer = balancer or LeastOutstanding()
        self._on_replica_failure = on_replica_failure
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=0, limit_per_host=settings.max_connections_per_replica, keepalive_timeout=30
            ),
            timeout=aiohttp.ClientTimeout(
                total=None,
                sock_connect=settings.connect_timeout_s,
                sock_read=max(settings.first_token_timeout_s, settings.idle_stream_timeout_s),
            ),
            auto_decompress=False,
            trust_env=False,
        )

    async def aclose(self) -> None:
        await self._session.close()

    async def open(self, served: ServedVersion, path: str, payload: dict[str, Any], request_id: str) -> Upstream:
        body = json.dumps(payload, separators=(",", ":")).encode()
        headers = {"content-type": "application/json", "x-request-id": request_id}
        tried: set[Replica] = set()
        last_error = ""
        for _attempt in range(1 + self._settings.retry_before_first_token):
            replica = self._balancer.pick(served.replicas, exclude=tried)
            if replica is None:
                break
            tried.add(replica)
            replica.outstanding += 1
            try:
                response = await self._session.post(replica.base_url + path, data=body, headers=headers)
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
                # Refused, reset or closed before a status line: nothing was
                # processed that the client saw, so another replica may take it.
                replica.outstanding -= 1
                last_error = f"{type(exc).__name__}: {exc}"
                logger.warning(
                    "request %s: replica %s failed before answering (%s)", request_id, replica.id, last_error
                )
                self._on_replica_failure(replica, last_error)
                continue
            except asyncio.TimeoutError as exc:
                replica.outstanding -= 1
                raise UpstreamFailed(
                    f"replica {replica.id} did not answer within {self._settings.first_token_timeout_s:.0f}s",
                    code="replica_timeout",
                ) from exc
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
            return Upstream(replica=replica, served=served, response=response)
        if not tried:
            raise NoReplicaReady(served.model_name, served.version, self._settings.retry_after_s)
        # Every replica tried refused the connection: they are ejected now and
        # the request was never processed, so this is "unavailable, retry".
        raise NoReplicaReady(
            served.model_name,
            served.version,
            self._settings.retry_after_s,
            detail=f"{len(tried)} replica(s) refused the connection and were ejected: {last_error}",
        )


async def sse_data(upstream: Upstream) -> AsyncIterator[bytes]:
    """Yield the ``data:`` payload of each SSE event as soon as the event is complete."""
    buffer = b""
    async for chunk in upstream.chunks():
        buffer += chunk
        start = 0
        while (end := buffer.find(_EVENT_END, start)) >= 0:
            event = buffer[start:end]
            start = end + 2
            for line in event.split(b"\n"):
                if line.startswith(_DATA_PREFIX):
                    yield line[len(_DATA_PREFIX):]
        buffer = buffer[start:]


def engine_failure(upstream: Upstream, content: bytes) -> UpstreamFailed:
    """An engine's 5xx as the router's 502: the client learns which replica failed and why."""
    try:
        detail = json.loads(content)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        detail = content[:200].decode(errors="replace")
    return UpstreamFailed(f"replica {upstream.replica.id} failed ({upstream.status_code}: {detail}); "
                          "retry the request")


def error_event(message: str, code: str, error_type: str = "server_error") -> str:
    return json.dumps({"error": {"message": message, "type": error_type, "param": None, "code": code}})


def sse_bytes(data: bytes | str, event: str | None = None) -> bytes:
    """One SSE event, framed as vLLM frames them (``\n`` separators)."""
    payload = data.encode() if isinstance(data, str) else data
    head = f"event: {event}\n".encode() if event else b""
    return head + _DATA_PREFIX + payload + _EVENT_END
