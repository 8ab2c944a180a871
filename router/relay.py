"""Sending a request to an engine replica and relaying its answer.

``Relay.open`` picks a replica, sends the request and returns once the
replica's status line has arrived. A replica that refuses the connection or
fails before sending anything is ejected and the request goes to another
ready replica (nothing has reached the client yet, so a retry is safe).
After that, bytes flow through unchanged: ``sse_data`` cuts the engine's SSE
stream into events as they arrive, never waiting for more than one event.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx

from llmserve.replica import Replica
from llmserve.settings import RouterSettings
from router.balancer import LeastOutstanding
from router.catalog import ServedVersion
from router.errors import NoReplicaReady, UpstreamFailed

logger = logging.getLogger(__name__)

_EVENT_END = b"\n\n"
_DATA_PREFIX = b"data: "


@dataclass(eq=False)
class Upstream:
    """An open response from one replica; ``aclose`` must be called exactly once."""

    replica: Replica
    served: ServedVersion
    response: httpx.Response
    _closed: bool = field(default=False, repr=False)

    @property
    def status_code(self) -> int:
        return self.response.status_code

    async def aclose(self) -> None:
        """Release the replica. Closing an unfinished stream drops the connection,
        which is how vLLM learns to abort the request."""
        if self._closed:
            return
        self._closed = True
        self.replica.outstanding -= 1
        # Shielded: this runs while the client's disconnect is cancelling the
        # task, and an unclosed connection would keep the engine generating.
        with anyio.CancelScope(shield=True):
            await self.response.aclose()


class Relay:
    def __init__(
        self,
        settings: RouterSettings,
        on_replica_failure: Callable[[Replica, str], None],
        balancer: LeastOutstanding | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._settings = settings
        self._balancer = balancer or LeastOutstanding()
        self._on_replica_failure = on_replica_failure
        self._client = httpx.AsyncClient(
            transport=transport,
            trust_env=False,
            limits=httpx.Limits(
                max_connections=settings.max_connections_per_replica * 8,
                max_keepalive_connections=settings.max_connections_per_replica,
            ),
            timeout=httpx.Timeout(
                connect=settings.connect_timeout_s,
                read=max(settings.first_token_timeout_s, settings.idle_stream_timeout_s),
                write=10.0,
                pool=settings.connect_timeout_s,
            ),
        )

    async def aclose(self) -> None:
        await self._client.aclose()

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
            request = self._client.build_request("POST", replica.base_url + path, content=body, headers=headers)
            try:
                response = await self._client.send(request, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError) as exc:
                replica.outstanding -= 1
                last_error = f"{type(exc).__name__}: {exc}"
                logger.warning("request %s: replica %s failed before answering (%s)", request_id, replica.id, last_error)
                self._on_replica_failure(replica, last_error)
                continue
            except httpx.TimeoutException as exc:
                replica.outstanding -= 1
                raise UpstreamFailed(
                    f"replica {replica.id} did not answer within {self._settings.first_token_timeout_s:.0f}s",
                    code="replica_timeout",
                ) from exc
            if response.status_code >= 500 and len(tried) <= self._settings.retry_before_first_token:
                text = (await response.aread())[:300].decode(errors="replace")
                await response.aclose()
                replica.outstanding -= 1
                last_error = f"status {response.status_code}: {text}"
                logger.warning("request %s: replica %s answered %s; trying another", request_id, replica.id, last_error)
                continue
            return Upstream(replica=replica, served=served, response=response)
        if not tried:
            raise NoReplicaReady(served.model_name, served.version, self._settings.retry_after_s)
        raise UpstreamFailed(
            f"every replica tried for {served.versioned_name} failed before answering ({last_error}); "
            "the request was not processed and can be retried",
            headers={"Retry-After": str(self._settings.retry_after_s)},
        )


async def sse_data(response: httpx.Response) -> AsyncIterator[bytes]:
    """Yield the ``data:`` payload of each SSE event as soon as the event is complete."""
    buffer = b""
    async for chunk in response.aiter_raw():
        buffer += chunk
        start = 0
        while (end := buffer.find(_EVENT_END, start)) >= 0:
            event = buffer[start:end]
            start = end + 2
            for line in event.split(b"\n"):
                if line.startswith(_DATA_PREFIX):
                    yield line[len(_DATA_PREFIX):]
        buffer = buffer[start:]


def error_event(message: str, code: str, error_type: str = "server_error") -> str:
    return json.dumps({"error": {"message": message, "type": error_type, "param": None, "code": code}})


def sse_bytes(data: bytes | str, event: str | None = None) -> bytes:
    """One SSE event, framed as vLLM frames them (``\n`` separators)."""
    payload = data.encode() if isinstance(data, str) else data
    head = f"event: {event}\n".encode() if event else b""
    return head + _DATA_PREFIX + payload + _EVENT_END
