"""The composition root: one place that assembles a whole router from settings.

``llmserve up``, the tests and every benchmark call ``build``; they differ only
in what they pass: a backend (the local one by default), a store (SQLite at
``settings.sqlite_path`` or Redis by default; ``None``: static versions only),
a spec builder, static versions. This module and the CLI are the only parts
of ``llmserve`` that import the router.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI

from llmserve.replicas.backend import ReplicaBackend
from llmserve.replicas.local import LocalBackend
from llmserve.replicas.spec import EngineSpec
from llmserve.settings import RouterSettings, Settings
from router.access.ratelimit import RedisLimiter, SharedLimiter
from router.app import StartedHook, create_app
from router.control.versions import SpecBuilder, spec_builder
from router.gateway.connection import http_protocol
from router.store import Store

__all__ = ["Server", "StartedHook", "build", "open_store", "uvicorn_config"]


@dataclass
class Server:
    settings: Settings
    app: FastAPI
    backend: ReplicaBackend
    store: Store | None


def open_store(settings: Settings) -> Store:
    """Redis when ``redis_url`` is set (routers share it), else SQLite in the data folder."""
    if settings.redis_url:
        from router.store.redis_store import RedisStore

        return RedisStore(settings.redis_url)
    from router.store.sqlite import SQLiteStore

    return SQLiteStore(settings.sqlite_path)


def build(
    settings: Settings,
    *,
    backend: ReplicaBackend | None = None,
    store: Store | Literal["settings"] | None = "settings",
    specs: SpecBuilder | None = None,
    static: Sequence[tuple[EngineSpec, int]] = (),
    models_dir: Path | None = None,
    on_started: StartedHook | None = None,
    shared_limits_url: str | None = None,
) -> Server:
    """The router app and its parts; ``store=None``: no control plane, only the ``static`` versions.

    API keys' rate limits are kept in Redis when the store is (``redis_url``, or ``shared_limits_url``
    for a store passed in), so every router sharing it enforces one limit; in memory otherwise.
    """
    backend = backend or default_backend(settings, models_dir)
    chosen = open_store(settings) if store == "settings" else store
    limits_url = shared_limits_url or (settings.redis_url if store == "settings" else None)
    limiter = SharedLimiter(RedisLimiter(limits_url)) if limits_url else None
    app = create_app(settings.router, backend, specs or spec_builder(settings.engine), store=chosen,
                     models_dir=models_dir or settings.model_repository, static=static, on_started=on_started,
                     limiter=limiter, data_dir=settings.data_dir)
    return Server(settings, app, backend, chosen)


def uvicorn_config(app: FastAPI, router: RouterSettings, **overrides: Any) -> uvicorn.Config:
    """How uvicorn serves the router: on ``router``'s host and port, with the router's HTTP protocol
    (header limits and read and write time-outs: ``router.gateway.connection``), and no logging
    set up of its own (the router's logs go where the process sends them)."""
    return uvicorn.Config(app, host=router.host, port=router.port, http=http_protocol(router), log_config=None,
                          access_log=False, **overrides)


def default_backend(settings: Settings, models_dir: Path | None = None) -> ReplicaBackend:
    """The backend ``settings.backend`` names: local processes, or Deployments on Kubernetes (which
    checks its cluster and permissions now, so a router that cannot work there says why at start)."""
    if settings.backend == "kubernetes":
        from llmserve.replicas.kubernetes import KubernetesBackend

        return KubernetesBackend(settings.kubernetes, settings.engine, models_dir or settings.model_repository)
    return LocalBackend(settings.engine, settings.logs_dir)
