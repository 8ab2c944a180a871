"""Liveness, readiness and the replica table."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from router.gateway.authorize import caller_of, scoped
from router.gateway.pipeline import State
from router.observe.metrics import RouterMetrics
from router.state import RouterState
from router.traffic.readiness import readiness

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The router process is alive and its event loop answers."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(state: State) -> JSONResponse:
    """Whether this router should get traffic, by the rule in ``router.traffic.readiness``; each model's status."""
    deploying = state.control.models_rolling_out() if state.control is not None else set()
    result = readiness(state.catalog, state.settings.readiness, state.was_ready, deploying)
    state.was_ready = state.was_ready or result.ready
    body: dict[str, Any] = {"status": "ready" if result.ready else "not_ready", "rule": state.settings.readiness,
                            "models": {name: s.value for name, s in result.models.items()},
                            "ready_replicas": result.ready_replicas}
    if not result.ready:
        body["waiting_for"] = result.waiting_for
        return JSONResponse(body, status_code=503, headers={"Retry-After": str(state.settings.retry_after_s)})
    return JSONResponse(body)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus text exposition of the router's metrics (a read key too with ``auth.protect_metrics``)."""
    state: RouterState = request.app.state.router
    if state.settings.auth.protect_metrics:
        caller_of(state, request.headers).require("read")
    if not isinstance(state.metrics, RouterMetrics):
        return Response("metrics are disabled (LLMSERVE_ROUTER__METRICS_ENABLED=false)\n", status_code=404,
                        media_type="text/plain")
    return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@router.get("/api/v1/replicas", dependencies=[Depends(scoped("read"))])
async def list_replicas(request: Request) -> dict[str, Any]:
    state: RouterState = request.app.state.router
    return {"replicas": [r.describe() for r in state.catalog.all_replicas()]}
