"""A stream held for a cold start: answered at once, kept alive with SSE comments, then relayed.

The status line (200) goes out as soon as the request is held, so the client
and any proxy see bytes every ``keepalive_s`` (an SSE comment, which every
SSE client ignores) instead of a silent connection they would time out.
Once a replica is ready the request is sent and its stream relayed as any
other; a hold that runs out, or a replica that refuses, ends the stream with
an in-band error event, as a replica failing mid-stream does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

from router.errors import APIError, InvalidRequest
from router.gateway.pipeline import InferenceCall
from router.relay.relay import Upstream, engine_failure, engine_message
from router.traffic.cold_start import Hold

OpenUpstream = Callable[[], Awaitable[Upstream]]
RelayStream = Callable[[Upstream], AsyncIterator[bytes]]
ErrorEvents = Callable[[APIError], list[bytes]]


class HeldStream:
    """The body of a held stream; ``on_client_gone`` reaches the upstream once there is one."""

    def __init__(self, call: InferenceCall, hold: Hold, open_upstream: OpenUpstream, relay: RelayStream,
                 error_events: ErrorEvents) -> None:
        self._call = call
        self._hold = hold
        self._open = open_upstream
        self._relay = relay
        self._error_events = error_events
        self._upstream: Upstream | None = None

    async def on_client_gone(self, message: object = None) -> None:
        if self._upstream is not None:
            await self._upstream.on_client_gone(message)

    async def events(self) -> AsyncIterator[bytes]:
        call, served = self._call, self._hold.served
        try:
            async for waited in self._hold.wait(call.state.settings.autoscale.keepalive_s):
                yield f": waiting for a replica of {served.versioned_name} to start ({waited:.0f}s)\n\n".encode()
            upstream = self._upstream = await self._open()
        except APIError as exc:
            call.record.fail(exc)
            for event in self._error_events(exc):
                yield event
            return
        except BaseException as exc:
            call.record.fail(exc)
            raise
        call.record.replica = upstream.replica.id
        if upstream.status_code != 200:
            try:
                content = await upstream.read()
            finally:
                await upstream.aclose()
            error = engine_failure(upstream, content) if upstream.status_code >= 500 else \
                InvalidRequest(f"the engine refused the request: {engine_message(content)}")
            call.record.fail(error)
            for event in self._error_events(error):
                yield event
            return
        async for chunk in self._relay(upstream):
            yield chunk
