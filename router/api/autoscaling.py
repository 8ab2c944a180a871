"""The autoscaling API: ``GET`` and ``PUT /api/v1/deployments/{model}/autoscaling``.

A policy also comes with a deploy (``"autoscaling": {...}`` in its body).
A PUT replaces a version's policy; fields left out take the design's defaults (``router.control.autoscale.policy``);
a bad value is a 400 naming the field and changes nothing.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from router.api.control_requests import actor_of, control_of, json_of
from router.control.autoscale.policy import AutoscalingPolicy, PolicyError
from router.errors import InvalidRequest
from router.gateway.authorize import control_scope
from router.gateway.openapi import json_body
from router.gateway.protocol import validate
from router.store import DeploymentStatus

router = APIRouter(prefix="/api/v1", tags=["control"], dependencies=[Depends(control_scope)])


class SloBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    ttft_ms: float | None = Field(None, description="p99 time to first token, ms")
    itl_ms: float | None = Field(None, description="p99 time per output token, ms")
    p99_ms: float | None = Field(None, description="p99 whole-request latency, ms")


class AutoscalingBody(BaseModel):
    """A version's autoscaling policy; what it leaves out takes the defaults (the design's table)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    mode: Literal["on", "advisory", "off"] | None = None
    min_replicas: int | None = Field(None, description="0 scales to zero (requests are held while it starts)")
    max_replicas: int | None = None
    target_in_flight_per_replica: float | None = None
    max_queue: int | None = None
    slo: SloBody | None = None
    up_delay_s: float | None = None
    down_delay_s: float | None = None
    idle_delay_s: float | None = None
    cooldown_s: float | None = None
    utilisation_high: float | None = None
    utilisation_low: float | None = None
    slo_low_ratio: float | None = Field(None, description="scale down only under this share of the SLO")
    min_samples: int | None = Field(None, description="requests a latency percentile needs in the window")

    def policy(self) -> AutoscalingPolicy:
        """The domain's policy; raises ``InvalidRequest`` naming the field whose value does not fit."""
        values: dict[str, Any] = self.model_dump(exclude_none=True, exclude={"version"})
        if self.slo is not None:  # an objective left out keeps its default; none at all keeps all of them
            values["slo"] = {**AutoscalingPolicy().slo.__dict__, **self.slo.model_dump(exclude_unset=True)}
        try:
            return AutoscalingPolicy.from_dict(values)
        except PolicyError as exc:
            raise InvalidRequest(str(exc), param=exc.field) from None


class SetAutoscaling(AutoscalingBody):
    version: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
                                description="the version to scale; default: every active version")


@router.put("/deployments/{model_name}/autoscaling", openapi_extra=json_body(SetAutoscaling))
async def set_autoscaling(model_name: str, request: Request) -> dict[str, Any]:
    body: SetAutoscaling = validate(SetAutoscaling, await json_of(request))
    await control_of(request).set_autoscaling(model_name, body.version, body.policy(), actor_of(request))
    return await describe(request, model_name)


@router.get("/deployments/{model_name}/autoscaling")
async def get_autoscaling(model_name: str, request: Request) -> dict[str, Any]:
    return await describe(request, model_name)


async def describe(request: Request, model_name: str) -> dict[str, Any]:
    """Each live version's policy, desired and current replicas, latest decision and its past changes."""
    control = control_of(request)
    await control.require_model(model_name)
    autoscaler = request.app.state.router.autoscaler
    history = await control.store.history(model_name, limit=500)
    versions = []
    for record in await control.store.list_deployments(model_name):
        if record.status not in (DeploymentStatus.ACTIVE, DeploymentStatus.DEPLOYING):
            continue
        served = control.versions.get((record.model_name, record.version))
        latest = autoscaler.latest.get((record.model_name, record.version)) if autoscaler else None
        versions.append({
            "version": record.version,
            "policy": record.autoscaling or None,
            "desired_replicas": record.replicas,
            "live_replicas": len(served.replica_set.live) if served and served.replica_set else 0,
            "ready_replicas": len(served.ready_replicas) if served else 0,
            "latest": latest.__dict__ if latest else None,
            "decisions": [{"at": h.at, "action": h.action, **h.detail} for h in history
                          if h.action in ("autoscale", "autoscale_advice") and h.detail.get("version") == record.version
                          ][-50:],
        })
    return {"model_name": model_name, "versions": versions}
