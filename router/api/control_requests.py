"""What every control-plane route needs of its request: the control plane, who acts, the JSON body."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from router.access.auth import Caller
from router.control.plane import ControlPlane
from router.errors import RouteNotFound
from router.gateway.protocol import parse_json_object, read_body


def control_of(request: Request) -> ControlPlane:
    control: ControlPlane | None = getattr(request.app.state.router, "control", None)
    if control is None:
        raise RouteNotFound("this router runs without a control plane (it was started without a store); "
                            "start it with `llmserve up`, which keeps one in SQLite or Redis")
    return control


def actor_of(request: Request) -> str:
    """Who the audit trail names: the API key's name and id (set by ``control_scope``)."""
    caller: Caller = request.state.caller
    return caller.actor


async def json_of(request: Request) -> dict[str, Any]:
    """The body as a JSON object (bounded by ``max_body_bytes``); an empty body is ``{}``."""
    limit = request.app.state.router.settings.max_body_bytes
    raw = await read_body(request.stream(), request.headers.get("content-length"), limit)
    return parse_json_object(raw) if raw else {}
