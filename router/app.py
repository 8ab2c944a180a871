"""Wiring only: build the FastAPI app from settings and an engine backend."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

from llmserve.settings import RouterSettings
from router import generate_api, health_api, openai_api
from router.catalog import Catalog
from router.errors import install_error_handlers
from router.middleware import RequestIdMiddleware
from router.relay import Relay
from router.state import EngineBackend, RouterState

logger = logging.getLogger(__name__)


def create_app(settings: RouterSettings, backend: EngineBackend, catalog: Catalog | None = None) -> FastAPI:
    """The router app. The lifespan starts the backend's replicas and stops them on shutdown."""
    catalog = catalog or Catalog()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        relay = Relay(settings, on_replica_failure=backend.report_failure)
        app.state.router = RouterState(settings=settings, catalog=catalog, relay=relay, backend=backend)
        await backend.start(catalog)
        try:
            yield
        finally:
            logger.info("router shutting down: stopping engine replicas")
            await backend.stop()
            await relay.aclose()

    app = FastAPI(
        title="llmserve router",
        version="0.1.0",
        lifespan=lifespan,
        description="OpenAI-compatible LLM serving with versions, traffic splits and fallbacks.",
    )
    install_error_handlers(app)
    app.include_router(health_api.router)
    app.include_router(openai_api.router)
    app.include_router(generate_api.router)
    app.add_middleware(RequestIdMiddleware)
    return app
