"""Wiring only: the FastAPI app from settings, a replica backend and (optionally) a store.

``llmserve.server.build`` is the one caller that assembles the parts; this
module only orders the lifespan (start the parts, then serve; stop them in
reverse) and the middleware.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

from fastapi import FastAPI

from llmserve.replicas.backend import ReplicaBackend
from llmserve.replicas.spec import EngineSpec
from llmserve.settings import RouterSettings
from router.access.auth import configured_admin
from router.access.ratelimit import SharedLimiter
from router.admission.shedding import Admission
from router.api import autoscaling as autoscaling_api
from router.api import batches as batches_api
from router.api import control as control_api
from router.api import files as files_api
from router.api import generate as generate_api
from router.api import health as health_api
from router.api import jobs as jobs_api
from router.api import keys as keys_api
from router.api import openai as openai_api
from router.api import predict as predict_api
from router.api import shadow as shadow_api
from router.batches.files import FileStore
from router.batches.runner import BatchRunner
from router.control.autoscale.loop import Autoscaler
from router.control.autoscale.signals import SignalSource
from router.control.leases import driver_id
from router.control.plane import ControlPlane
from router.control.versions import SpecBuilder
from router.errors import install_error_handlers
from router.gateway.access_log import AccessLogMiddleware
from router.gateway.fast_routes import FastRoutes
from router.gateway.request_id import RequestIdMiddleware
from router.jobs.durable import StoreJobStore
from router.jobs.runner import JobRunner
from router.observe.engine_metrics import EngineMetricsScraper
from router.observe.inference_log import InferenceLogWriter
from router.observe.metrics import Metrics, NoMetrics, RouterMetrics
from router.observe.samples import SampleWindows
from router.observe.shadow_metrics import ShadowCollector
from router.predict.batcher import BatchingConfig
from router.predict.host import PredictorHost
from router.relay.relay import Relay
from router.state import RouterState
from router.store import Store
from router.traffic.catalog import Catalog, ServedVersion
from router.traffic.cold_start import ColdStarts
from router.traffic.demand import Demand
from router.traffic.shadow import Shadows

logger = logging.getLogger(__name__)

StartedHook = Callable[[RouterState], Awaitable[None]]


def create_app(
    settings: RouterSettings,
    backend: ReplicaBackend,
    specs: SpecBuilder,
    store: Store | None = None,
    models_dir: Path | None = None,
    static: Sequence[tuple[EngineSpec, int]] = (),
    on_started: StartedHook | None = None,
    limiter: SharedLimiter | None = None,
    data_dir: Path | None = None,
) -> FastAPI:
    """The router app.

    The lifespan starts the ``static`` versions (spec, replicas) without a
    store, then (with a store) the control plane, which relaunches the active
    versions recorded in the store; on shutdown it stops all of them. Batch API files live in
    ``<data_dir>/files`` (default: beside ``models_dir``).
    """
    catalog = Catalog()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        relay = Relay(settings, on_replica_failure=backend.report_failure)
        metrics: Metrics = NoMetrics()
        scraper: EngineMetricsScraper | None = None
        if settings.metrics_enabled:
            metrics = RouterMetrics(catalog)
            scraper = EngineMetricsScraper(catalog, settings.engine_metrics_interval_s)
            metrics.registry.register(scraper)
            scraper.start()
        samples = SampleWindows()
        demand = Demand()
        state = RouterState(settings=settings, catalog=catalog, relay=relay, backend=backend, samples=samples,
                            admission=Admission(settings.admission, catalog, samples, scraper, metrics, demand=demand),
                            metrics=metrics, demand=demand)
        shadow = settings.shadow
        state.shadows = Shadows(shadow.queue_size, shadow.workers, max_pairs=shadow.max_pairs)
        app.state.router = state
        if isinstance(metrics, RouterMetrics):
            metrics.registry.register(ShadowCollector(state.shadows))  # replays, apart from the requests'
        if settings.auth.admin_key is not None:
            state.keys.add_static(configured_admin(settings.auth.admin_key.get_secret_value()))
        if limiter is not None:
            state.limiter = limiter
        # in the store when there is one (durable, shared by the routers on it), else in memory
        jobs = state.jobs = JobRunner(settings.jobs, StoreJobStore(store) if store is not None else None)
        jobs.start()
        state.shadows.start(relay, state.admission, catalog)
        log_writer: InferenceLogWriter | None = None
        try:  # a start that fails part way still stops what it started
            for spec, replicas in static:
                catalog.add_version(ServedVersion.of(await backend.start(spec, replicas)))
            if store is not None:
                predictors = PredictorHost(BatchingConfig.from_settings(settings.predict), metrics.batch_observer)
                state.control = ControlPlane(store, backend, catalog, models_dir or Path("."), specs, samples,
                                             predictors=predictors, canary_interval_s=settings.canary_interval_s,
                                             lease_s=settings.rollout_lease_s,
                                             router_id=driver_id(settings.port or None), shadows=state.shadows)

                async def reload_keys() -> None:
                    state.keys.replace(await store.list_keys())

                await reload_keys()
                state.control.on_keys_changed = reload_keys
                await state.control.start()
                scaling = settings.autoscale
                state.cold_starts = ColdStarts(demand, scaling.max_held, scaling.hold_timeout_s, settings.retry_after_s,
                                               metrics.cold_start_held)
                state.autoscaler = Autoscaler(state.control, SignalSource(demand, samples, scraper, scaling.window_s),
                                              state.cold_starts, state.control.leases.router_id, scaling, metrics,
                                              leading=backend.leading)
                demand.on_cold_demand = state.autoscaler.wake
                state.autoscaler.start()
                files = FileStore((data_dir or (models_dir or Path("models")).parent) / "files")
                state.batches = BatchRunner(settings.batches, store, files, batches_api.line_executor(app),
                                            metrics=metrics)
                state.batches.start()
                log_writer = InferenceLogWriter(store, retention_days=settings.inference_log_retention_days)
                log_writer.start()
                state.log_sink = log_writer.submit
            if on_started is not None:
                await on_started(state)
            yield
        finally:
            logger.info("router shutting down: stopping engine replicas")
            if state.autoscaler is not None:
                await state.autoscaler.close()
            if state.batches is not None:
                await state.batches.close()  # before the engines its lines use; gives its batches back
            await jobs.close()  # before the engines and predictors its jobs use
            await state.shadows.close()
            if state.control is not None:
                await state.control.stop()
            if log_writer is not None:
                await log_writer.close()
            if scraper is not None:
                await scraper.close()
            await backend.close()
            await relay.aclose()
            await state.background.cancel_all()
            if limiter is not None:
                await limiter.close()
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
    app.include_router(shadow_api.router)
    app.include_router(autoscaling_api.router)
    app.include_router(keys_api.router)
    app.include_router(predict_api.router)
    app.include_router(jobs_api.router)
    app.include_router(files_api.router)
    app.include_router(batches_api.router)
    # innermost: the predict routes answered without FastAPI's routing, inside the access log and request id
    app.add_middleware(FastRoutes, routes=predict_api.FAST_ROUTES)
    app.add_middleware(AccessLogMiddleware, enabled=settings.access_log)
    app.add_middleware(RequestIdMiddleware)  # added last: outermost, so the access log has the id
    return app
