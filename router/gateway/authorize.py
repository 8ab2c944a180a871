"""Authentication at the HTTP edge: the caller of a request, and the scope each route needs.

Inference routes authenticate in the pipeline's first step (``InferenceCall``);
every other route through one of the dependencies here: ``scoped("read")``,
``scoped("admin")``, or ``control_scope`` (a control-plane route: reads need
``read``, writes ``deploy``). The probes (``/healthz``, ``/readyz``,
``/v2/health/*``) take no key; ``/metrics`` takes one only with
``auth.protect_metrics``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from fastapi import Request

from router.access.auth import SCOPES, Caller, presented_key
from router.state import RouterState

_READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def caller_of(state: RouterState, headers: Mapping[str, str]) -> Caller:
    """Who sent these headers: the key's caller (401 when there is none, or it is not valid), or, with
    authentication off, anyone with every scope and the anonymous priority policy."""
    if not state.settings.auth.enabled:
        anonymous = state.settings.admission.anonymous
        # the audit trail's actor is then whatever the caller says it is (there is nobody to check)
        return Caller(None, headers.get("x-actor") or headers.get("x-user-id") or "api", frozenset(SCOPES),
                      priority=anonymous.default, priorities=tuple(anonymous.allowed))
    return state.keys.authenticate(presented_key(headers))


def _authorize(request: Request, scope: str) -> Caller:
    state: RouterState = request.app.state.router
    caller = caller_of(state, request.headers)
    caller.require(scope)
    request.state.caller = caller
    return caller


def scoped(scope: str) -> Callable[[Request], Awaitable[Caller]]:
    """A dependency: the route needs a key with ``scope`` (admin has every scope)."""

    async def dependency(request: Request) -> Caller:
        return _authorize(request, scope)

    return dependency


async def control_scope(request: Request) -> Caller:
    """The control plane's routes: reads need ``read``, changes ``deploy``."""
    return _authorize(request, "read" if request.method in _READ_METHODS else "deploy")


async def inference_or_read(request: Request) -> Caller:
    """Listings that inference clients read (``/v1/models``, the /v2 metadata): either scope will do."""
    state: RouterState = request.app.state.router
    caller = caller_of(state, request.headers)
    if not caller.may("inference"):
        caller.require("read")
    request.state.caller = caller
    return caller
