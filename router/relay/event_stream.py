"""The router's SSE response: already-framed event bytes, written as they come.

Every stream the router answers (a relayed engine stream, the generate API's
events, a stream held for a cold start) is a body of complete SSE events
(``router.relay.sse.encode``), so the response only writes them. It replaces
sse-starlette's ``EventSourceResponse``, whose start was the largest part of
a stream's first byte in a profile of the router (a task group of four tasks
started before the status line goes out; a cancel scope around every send;
each chunk copied again), and keeps what the router relied on:

- the headers: ``text/event-stream; charset=utf-8``, ``Cache-Control:
  no-store`` (unless given), ``Connection: keep-alive``, ``X-Accel-Buffering: no``;
- a ``: ping - <UTC time>`` comment every ``ping_s`` seconds (0: none), so
  proxies keep a quiet stream open;
- a client that leaves: ``on_client_gone`` is awaited (the relay closes the
  engine's connection there, which aborts the engine request), then the body
  is cancelled where it waits and closed, so its ``finally`` runs; the
  response then ends quietly, as a stream whose reader went away should.

The status line and the first event go out from the request's own task,
with no other task run in between; one watcher task a stream (the client
leaving, the pings) first runs after that.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import datetime, timezone

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

ClientGone = Callable[[], Awaitable[None]]


class EventStream(Response):
    """A 200 ``text/event-stream`` response whose body is ``events``, each item one or more framed events."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], headers: Mapping[str, str] | None = None, ping_s: float = 15,
                 on_client_gone: ClientGone | None = None) -> None:
        if ping_s < 0:
            raise ValueError("ping_s must be >= 0 (0: no pings)")
        self.status_code = 200
        self.background = None
        self.events = events
        self.ping_s = ping_s
        self.on_client_gone = on_client_gone
        own = {name.lower(): value for name, value in (headers or {}).items()}
        own.setdefault("cache-control", "no-store")
        own["connection"] = "keep-alive"
        own["x-accel-buffering"] = "no"
        self.init_headers(own)
        self.client_gone = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        events = self.events
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        # Created now, it first runs when this task next waits: after the first event is written
        # when the body has it ready (a relayed stream's first chunk is read before the response).
        watcher = asyncio.create_task(self._watch(receive, send, task))
        try:
            async for chunk in events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            watcher.cancel()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            await _close(events)
            if not self.client_gone:
                raise  # the server's cancellation (its shutdown), not the watcher's
            task.uncancel()
        except BaseException:
            await _close(events)  # a failed send: the body's finally still runs before the error goes on
            raise
        finally:
            watcher.cancel()

    async def _watch(self, receive: Receive, send: Send, stream: asyncio.Task[None]) -> None:
        """Until cancelled: pings while the stream is quiet; if the client leaves, tell the body's owner and
        cancel the stream's task (one task a stream; the first write is already out when it starts)."""
        while True:
            try:
                async with asyncio.timeout(self.ping_s or None):
                    message = await receive()
            except TimeoutError:
                ping = f": ping - {datetime.now(timezone.utc)}\n\n".encode()
                await send({"type": "http.response.body", "body": ping, "more_body": True})
                continue
            if message["type"] == "http.disconnect":
                break
        self.client_gone = True
        if self.on_client_gone is not None:
            await self.on_client_gone()
        stream.cancel()


async def _close(events: AsyncIterator[bytes]) -> None:
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        await aclose()
