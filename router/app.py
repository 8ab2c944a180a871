"""Wiring only: build the FastAPI app from settings, an engine backend and (optionally) a store."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from fastapi import FastAPI

from llmserve.settings import RouterSettings
from router.admission.shedding import Admission
from router.api import control as control_api
from router.api import generate as generate_api
from router.api import health as health_api
from router.api import openai as openai_api
from router.api import predict as predict_api
from router.control.plane import ControlPlane, ReplicaLauncher
from router.errors import install_error_handlers
from router.gateway.access_log import AccessLogMiddleware
from router.gateway.request_id import RequestIdMiddleware
from router.observe.engine_metrics import EngineMetricsScraper
from router.observe.inference_log import InferenceLogWriter
from router.observe.metrics import RouterMetrics
from router.observe.samples import SampleWindows
from router.predict.batcher import BatchingConfig
from router.predict.host import PredictLauncher
from router.relay.relay import Relay
from router.state import EngineBackend, RouterState
from router.store import Store
from router.traffic.catalog import Catalog

logger = logging.getLogger(__name__)

StartedHook = Callable[[RouterState], Awaitable[None]]


def create_app(
    settings: RouterSettings,
    backend: EngineBackend,
    catalog: Catalog | None = None,
    store: Store | None = None,
    models_dir: Path | None = None,
    on_started: StartedHook | None = None,
) -> FastAPI:
    """The router app.

    The lifespan starts the backend's static replicas, then (with a store) the
    control plane, which relaunches the active versions recorded in the store;
    on shutdown it stops all of them.
    """
    catalog = catalog or Catalog()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        relay = Relay(settings, on_replica_failure=backend.report_failure)
        state = RouterState(settings=settings, catalog=catalog, relay=relay, backend=backend)
        scraper: EngineMetricsScraper | None = None
        if settings.metrics_enabled:
            state.metrics = RouterMetrics(catalog)
            scraper = EngineMetricsScraper(catalog, settings.engine_metrics_interval_s)
            state.metrics.registry.register(scraper)
            scraper.start()
        state.samples = SampleWindows()
        state.admission = Admission(settings.admission, catalog, state.samples, scraper, state.metrics)
        app.state.router = state
        await backend.start(catalog)
        log_writer: InferenceLogWriter | None = None
        if store is not None:
            launcher: ReplicaLauncher = backend  # type: ignore[assignment]
            predict = settings.predict
            batching = BatchingConfig(
                enabled=predict.batching, max_batch_size=predict.max_batch_size, max_wait_ms=predict.max_wait_ms,
                adaptive=predict.adaptive, instances=predict.instances, max_queue_rows=predict.max_queue_rows,
                default_deadline_ms=predict.default_deadline_ms)
            metrics = state.metrics
            predict_launcher = PredictLauncher(batching, metrics.batch_observer if metrics is not None else None)
            state.control = ControlPlane(store, launcher, catalog, models_dir or Path("."), state.samples,
                                         predict_launcher=predict_launcher)
            await state.control.start()
            log_writer = InferenceLogWriter(store, retention_days=settings.inference_log_retention_days)
            log_writer.start()
            state.log_sink = log_writer.submit
        if on_started is not None:
            await on_started(state)
        try:
            yield
        finally:
            logger.info("router shutting down: stopping engine replicas")
            if state.control is not None:
                await state.control.stop()
            if log_writer is not None:
                await log_writer.close()
            if scraper is not None:
                await scraper.close()
            await backend.stop()
            await relay.aclose()
            if store is not None:
                await store.close()

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
    app.include_router(control_api.router)
    app.include_router(predict_api.router)
    app.add_middleware(AccessLogMiddleware, enabled=settings.access_log)
    app.add_middleware(RequestIdMiddleware)  # added last: outermost, so the access log has the id
    return app
