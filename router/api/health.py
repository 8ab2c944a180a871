"""Liveness, readiness and the replica table."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from router.observe.metrics import RouterMetrics
from router.state import RouterState

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The router process is alive and its event loop answers."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """Ready only when every served model has at least one ready replica (or loaded predictor)."""
    state: RouterState = request.app.state.router
    models = {m.name: sum(len(v.ready_replicas) + (v.predictor is not None) for v in m.versions.values())
              for m in state.catalog.models()}
    not_ready = sorted(name for name, ready in models.items() if ready == 0)
    ready = bool(models) and not not_ready
    body: dict[str, Any] = {"status": "ready" if ready else "not_ready", "ready_replicas": models}
    if not ready:
        body["waiting_for"] = not_ready or ["a deployed model"]
        return JSONResponse(body, status_code=503, headers={"Retry-After": str(state.settings.retry_after_s)})
    return JSONResponse(body)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus text exposition of the router's metrics."""
    state: RouterState = request.app.state.router
    if not isinstance(state.metrics, RouterMetrics):
        return Response("metrics are disabled (LLMSERVE_ROUTER__METRICS_ENABLED=false)\n", status_code=404,
                        media_type="text/plain")
    return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@router.get("/api/v1/replicas")
async def list_replicas(request: Request) -> dict[str, Any]:
    state: RouterState = request.app.state.router
    return {"replicas": [r.describe() for r in state.catalog.all_replicas()]}
