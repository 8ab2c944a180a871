"""Shared fixtures.

Three layers (see STYLE.md): pure logic; the router app over HTTP in process
with simulated engine replicas (real processes, milliseconds per token); and
one real vLLM stack started once per session by ``tests/e2e``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from llmserve.generation import GenerationDefaults
from llmserve.replicas.backend import EndpointState
from llmserve.replicas.local import LocalBackend, ProgramFactory
from llmserve.settings import EngineSettings, RouterSettings
from loadtest.inprocess import serve_router
from loadtest.simstack import StaticVersion, fast_sim, sim_server
from router.store import Store
from router.store.redis_store import RedisStore
from router.store.sqlite import SQLiteStore
from tests.redis_server import redis_server

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest_plugins = ["tests.kube.fixtures"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The tests marked ``kubernetes`` run in their own session inside a network namespace
    (scripts/k8s_tests.sh, which ``make test`` runs after this one); that session runs only them."""
    from tests.kube.fixtures import enabled

    if enabled():
        keep = [item for item in items if item.get_closest_marker("kubernetes")]
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep
        return
    skip = pytest.mark.skip(reason="runs in scripts/k8s_tests.sh, inside a network namespace (make test runs it)")
    for item in items:
        if item.get_closest_marker("kubernetes"):
            item.add_marker(skip)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fast_engine_settings(**overrides: object) -> EngineSettings:
    base = dict(
        ready_timeout_s=30.0,
        health_interval_s=0.2,
        health_failures_to_eject=1,
        stop_timeout_s=3.0,
        drain_timeout_s=3.0,
        restart_backoff_initial_s=0.2,
        restart_backoff_max_s=1.0,
        first_port=free_port(),
    )
    base.update(overrides)
    return EngineSettings(**base)


@dataclass(frozen=True)
class ScriptProgram:
    """A replica program that runs a Python snippet: for replicas that crash or never get ready."""

    code: str
    model_name: str = "demo"
    version: str = "v1"
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)

    @property
    def versioned_name(self) -> str:
        return f"{self.model_name}:{self.version}"

    def command(self, host: str, port: int) -> list[str]:
        return [sys.executable, "-c", self.code]

    def environment(self) -> dict[str, str]:
        return {}


@dataclass
class RunningRouter:
    url: str
    backend: LocalBackend
    app: Any


@contextlib.asynccontextmanager
async def run_router(
    deployments: list[StaticVersion],
    tmp_path: Path,
    router_settings: RouterSettings | None = None,
    engine_settings: EngineSettings | None = None,
    wait_ready: bool = True,
    store: Store | None = None,
    program_factory: ProgramFactory | None = None,
    shared_limits_url: str | None = None,
) -> AsyncIterator[RunningRouter]:
    """The real router app served by uvicorn on a loopback port, in this event loop."""
    port = free_port()
    settings = router_settings or RouterSettings(port=port, retry_after_s=2)
    if router_settings is not None:
        port = router_settings.port
    server = sim_server(tmp_path, deployments, settings, engine_settings or fast_engine_settings(), store=store,
                        program=program_factory or fast_sim, shared_limits_url=shared_limits_url)
    backend = server.backend
    assert isinstance(backend, LocalBackend)
    try:
        async with serve_router(server.app, port, backend, wait_replicas=wait_ready, router=settings) as url:
            yield RunningRouter(url=url, backend=backend, app=server.app)
    finally:
        leftover = [r for r in backend.supervisor.replicas if r.state is not EndpointState.STOPPED]
        assert not leftover, f"replicas left running: {leftover}"


@pytest.fixture(scope="session")
def example_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example traditional models (fraud classifiers in four frameworks), built once per session."""
    from fallback.tabular import distill_tabular
    from llmserve.models.examples import build_examples

    models = tmp_path_factory.mktemp("predict-models")
    build_examples(models, rows=4000, distill_fallback=distill_tabular)
    return models


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# The store backends' shared fixtures: a real redis-server per test module, and each store test run
# on SQLite and on Redis (a fresh key prefix each).
@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "sqlite":
        backend: Store = SQLiteStore(tmp_path / "llmserve.db")
    else:
        backend = RedisStore(request.getfixturevalue("redis_url"), prefix=f"test-{uuid.uuid4().hex[:8]}:")
    yield backend
    await backend.close()
