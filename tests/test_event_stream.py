"""The router's SSE response (``router.relay.event_stream``), driven as an ASGI app with a fake server."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest

from router.relay.event_stream import EventStream


class FakeServer:
    """What uvicorn gives an app: ``send`` records the messages, ``receive`` blocks until the client leaves."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.gone = asyncio.Event()

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    async def receive(self) -> dict[str, Any]:
        await self.gone.wait()
        return {"type": "http.disconnect"}

    def bodies(self) -> list[bytes]:
        return [m["body"] for m in self.sent if m["type"] == "http.response.body"]

    async def serve(self, response: EventStream) -> None:
        await response({"type": "http", "method": "POST"}, self.receive, self.send)  # type: ignore[arg-type]


async def test_writes_the_events_as_they_come_with_the_sse_headers() -> None:
    async def events() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"
        yield b"event: token\ndata: 2\n\n"

    server = FakeServer()
    await server.serve(EventStream(events(), {"X-Request-Id": "abc", "cache-control": "no-cache"}, ping_s=0))
    start = server.sent[0]
    assert start["type"] == "http.response.start" and start["status"] == 200
    assert start["headers"] == [(b"x-request-id", b"abc"), (b"cache-control", b"no-cache"),
                                (b"connection", b"keep-alive"), (b"x-accel-buffering", b"no"),
                                (b"content-type", b"text/event-stream; charset=utf-8")]
    assert server.bodies() == [b"data: 1\n\n", b"event: token\ndata: 2\n\n", b""]
    assert [m.get("more_body") for m in server.sent[1:]] == [True, True, False]
    assert dict(EventStream(events()).raw_headers)[b"cache-control"] == b"no-store"  # the default


async def test_a_quiet_stream_gets_ping_comments() -> None:
    server = FakeServer()

    async def events() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"
        while len(server.bodies()) < 3:  # two pings after the first event
            await asyncio.sleep(0.01)
        yield b"data: 2\n\n"

    async with asyncio.timeout(10):
        await server.serve(EventStream(events(), ping_s=0.02))
    bodies = server.bodies()
    assert bodies[0] == b"data: 1\n\n" and bodies[-2:] == [b"data: 2\n\n", b""]
    pings = bodies[1:-2]
    assert len(pings) >= 2 and all(re.fullmatch(rb": ping - \d{4}-\d\d-\d\d [0-9:.]+\+00:00\n\n", p) for p in pings)


async def test_a_client_that_leaves_is_reported_and_the_body_closed() -> None:
    server = FakeServer()
    told: list[str] = []
    closed = asyncio.Event()

    async def events() -> AsyncIterator[bytes]:
        try:
            yield b"data: 1\n\n"
            server.gone.set()
            await asyncio.sleep(3600)  # an engine that has nothing more yet
            yield b"data: never\n\n"
        finally:
            closed.set()

    async def on_client_gone() -> None:
        told.append("gone")

    response = EventStream(events(), ping_s=0, on_client_gone=on_client_gone)
    async with asyncio.timeout(10):  # in this task, whose cancellation count is checked below
        await server.serve(response)  # returns quietly: no CancelledError escapes
    assert told == ["gone"] and closed.is_set() and response.client_gone
    assert server.bodies() == [b"data: 1\n\n"]  # nothing more is written to a client that left
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0


async def test_a_client_gone_while_a_send_waits_still_closes_the_body() -> None:
    """The stream is cancelled inside ``send`` (a reader that stopped): the body, suspended at its
    yield, is closed, so its ``finally`` (the relay's upstream close) runs."""
    server = FakeServer()
    closed = asyncio.Event()
    blocked = asyncio.Event()

    async def stuck_send(message: dict[str, Any]) -> None:
        server.sent.append(message)
        if message.get("body") == b"data: 2\n\n":
            blocked.set()
            server.gone.set()
            await asyncio.sleep(3600)  # the kernel's buffers are full

    async def events() -> AsyncIterator[bytes]:
        try:
            yield b"data: 1\n\n"
            yield b"data: 2\n\n"
            yield b"data: 3\n\n"
        finally:
            closed.set()

    response = EventStream(events(), ping_s=0)
    async with asyncio.timeout(10):
        await response({"type": "http"}, server.receive, stuck_send)  # type: ignore[arg-type]
    assert blocked.is_set() and closed.is_set() and response.client_gone


async def test_the_servers_own_cancellation_goes_on_and_the_body_is_closed() -> None:
    server = FakeServer()
    closed = asyncio.Event()
    started = asyncio.Event()

    async def events() -> AsyncIterator[bytes]:
        try:
            yield b"data: 1\n\n"
            started.set()
            await asyncio.sleep(3600)
            yield b"data: never\n\n"
        finally:
            closed.set()

    task = asyncio.create_task(server.serve(EventStream(events(), ping_s=0)))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert closed.is_set()


async def test_a_failing_body_ends_the_response_with_its_error() -> None:
    async def events() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"
        raise RuntimeError("boom")

    server = FakeServer()
    with pytest.raises(RuntimeError, match="boom"):
        await server.serve(EventStream(events(), ping_s=0))
    assert server.bodies() == [b"data: 1\n\n"]


def test_a_negative_ping_interval_is_refused() -> None:
    async def events() -> AsyncIterator[bytes]:
        yield b""

    with pytest.raises(ValueError, match="ping_s"):
        EventStream(events(), ping_s=-1)
