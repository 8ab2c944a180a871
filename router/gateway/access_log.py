"""One access log line and one counted response per HTTP request, whatever answered it.

Pure ASGI (no BaseHTTPMiddleware: it would buffer streams). It runs inside the
request-id middleware, so the line carries the id the client sees. A stream is
logged when its last byte is sent, with the whole duration. The route label of
the counter is the matched route's template (``/v1/models/{name}``), never the
raw path, so that unknown paths cannot grow the metric without bound.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("router.access")


class AccessLogMiddleware:
    def __init__(self, app: ASGIApp, enabled: bool = True) -> None:
        self.app = app
        self.enabled = enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0

        async def send_and_watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        except BaseException:
            # Unhandled here means the server's last-resort handler answers 500 (or the client left).
            status = status or 500
            raise
        finally:
            self._record(scope, status or 499, time.perf_counter() - started)

    def _record(self, scope: Scope, status: int, duration_s: float) -> None:
        state: dict[str, Any] = scope.get("state") or {}
        router_state = getattr(getattr(scope.get("app"), "state", None), "router", None)
        metrics = getattr(router_state, "metrics", None)  # None only before the lifespan has built the state
        route = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        if metrics is not None:
            metrics.http_response(scope["method"], template, status)
        if self.enabled:
            request_id = state.get("request_id", "-")
            logger.info("%s %s %d %.1fms request_id=%s", scope["method"], scope["path"], status,
                        duration_s * 1000, request_id, extra={"request_id": request_id})
