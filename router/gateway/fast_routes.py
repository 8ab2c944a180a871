"""Hot routes answered without FastAPI's routing and dependency injection, with the same behaviour.

A single-row prediction costs less model time than FastAPI spends on it: matching
the path against every route in turn (two regexes a route), solving the route's
dependencies and wrapping the call in its exception and exit-stack middleware took
about half of the router's Python per request (a cProfile of single-row predicts
in process). ``FastRoutes`` is pure ASGI middleware that sits inside the request-id
and access-log middleware and answers the few routes given to it itself:

- it matches the path segment by segment, only for the routes' method and number
  of segments; anything else (another method, a trailing slash, a ``root_path``)
  falls through to FastAPI untouched;
- it sets ``scope["route"]`` to the FastAPI route with the same template, so the
  access log and ``llmserve_http_responses`` label the request as before, and
  ``scope["path_params"]``;
- the handler is the same code the FastAPI route runs (the routes stay, for
  OpenAPI and as the one definition); an error it raises is answered by the
  app's own exception handler for it (the ones ``router.errors`` installs), and
  one without a handler propagates to the server-error middleware, which answers
  500 and logs it, as for any route.

``taken`` counts the requests answered here, by route template (the tests read it).
"""

from __future__ import annotations

import collections
import inspect
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

FastHandler = Callable[[Request, dict[str, str]], Awaitable[Response]]
ExceptionHandler = Callable[[Request, Exception], Any]


@dataclass(frozen=True)
class FastRoute:
    """``method`` and ``path`` (a FastAPI template such as ``/v2/models/{model_name}/infer``) answered by
    ``handler(request, path_params)``; a parameter matches one non-empty segment, as Starlette's ``str``."""

    method: str
    path: str
    handler: FastHandler
    _segments: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_segments", tuple(self.path.split("/")))

    @property
    def shape(self) -> tuple[str, int]:
        return self.method, len(self._segments)

    def match(self, segments: list[str]) -> dict[str, str] | None:
        """The path parameters when ``segments`` (a path split on ``/``, of this route's length) match."""
        params: dict[str, str] = {}
        for want, got in zip(self._segments, segments, strict=True):
            if want[:1] == "{":
                if not got:
                    return None
                params[want[1:-1]] = got
            elif want != got:
                return None
        return params


class FastRoutes:
    """ASGI middleware: ``routes`` answered here, everything else passed to ``app``."""

    def __init__(self, app: ASGIApp, routes: Sequence[FastRoute]) -> None:
        self.app = app
        self.taken: collections.Counter[str] = collections.Counter()
        self._by_shape: dict[tuple[str, int], list[FastRoute]] = {}
        for route in routes:
            self._by_shape.setdefault(route.shape, []).append(route)
        self._api_routes: dict[tuple[str, str], Any] | None = None  # (method, template) -> the FastAPI route
        self._handlers: dict[type[BaseException], ExceptionHandler] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope.get("root_path"):
            segments = scope["path"].split("/")
            for route in self._by_shape.get((scope["method"], len(segments)), ()):
                params = route.match(segments)
                if params is not None:
                    await self._answer(route, params, scope, receive, send)
                    return
        await self.app(scope, receive, send)

    async def _answer(self, route: FastRoute, params: dict[str, str], scope: Scope, receive: Receive,
                      send: Send) -> None:
        app = scope["app"]
        api_route = self._api_route(app, route)
        if api_route is not None:
            scope["route"] = api_route
        scope["path_params"] = params
        request = Request(scope, receive, send)
        self.taken[route.path] += 1
        try:
            response = await route.handler(request, params)
        except Exception as exc:
            handler = self._handler_for(app, exc)
            if handler is None:
                raise  # the server-error middleware answers 500 and logs the traceback
            answered = handler(request, exc)
            response = await answered if inspect.isawaitable(answered) else answered
        await response(scope, receive, send)

    def _api_route(self, app: Any, route: FastRoute) -> Any:
        if self._api_routes is None:
            self._api_routes = {(method, getattr(r, "path", "")): r for r in getattr(app, "routes", ())
                                for method in getattr(r, "methods", None) or ()}
        return self._api_routes.get((route.method, route.path))

    def _handler_for(self, app: Any, exc: Exception) -> ExceptionHandler | None:
        """The app's handler for ``exc``, by its class's MRO, as Starlette's exception middleware looks
        it up; the catch-all (``Exception`` or 500) belongs to the server-error middleware outside."""
        if self._handlers is None:
            self._handlers = {key: handler for key, handler in getattr(app, "exception_handlers", {}).items()
                              if isinstance(key, type) and key is not Exception}
        for cls in type(exc).__mro__:
            handler = self._handlers.get(cls)
            if handler is not None:
                return handler
        return None
