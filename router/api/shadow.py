"""Shadow versions: ``GET /api/v1/deployments/{model}/shadow`` (the report) and ``POST .../shadow/promote``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from router.api.control import Strategy
from router.api.control_requests import actor_of, control_of, json_of
from router.control.strategies.shadow import require_shadow
from router.errors import InvalidRequest
from router.gateway.authorize import control_scope
from router.gateway.openapi import json_body
from router.gateway.protocol import validate

router = APIRouter(prefix="/api/v1", tags=["control"], dependencies=[Depends(control_scope)])

PROMOTE_BODY = {"type": "object", "description": "the canary's policy (the canary strategy's fields); {} for its "
                "defaults", "example": {"steps": [10, 50, 100], "bake_s": 60}}


@router.get("/deployments/{model_name}/shadow")
async def get_shadow(model_name: str, request: Request) -> dict[str, Any]:
    """The comparison of the model's shadow version with the versions that answered (``ShadowReport``)."""
    control = control_of(request)
    await control.require_model(model_name)
    return require_shadow(control.shadows, model_name).report.to_dict()


@router.post("/deployments/{model_name}/shadow/promote", openapi_extra=json_body(PROMOTE_BODY, required=False))
async def promote_shadow(model_name: str, request: Request) -> dict[str, Any]:
    """End the shadow and start a canary of its version; the canary then runs as a canary deploy does."""
    body = await json_of(request)
    if "type" in body:
        raise InvalidRequest("a promoted shadow is a canary: leave out type", param="type")
    strategy: Strategy = validate(Strategy, {**body, "type": "canary"})
    try:
        policy = strategy.plan(0).canary
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="steps") from None
    assert policy is not None
    canary = await control_of(request).promote_shadow(model_name, policy, actor_of(request))
    return canary.state.to_dict()
