"""Faults in the engine replicas behind one router.

- ``replica_kill``: two replicas; one is SIGKILLed under load; requests not yet
  answering are retried on the other; streams in flight on it end with an error
  event; the supervisor restarts it.
- ``hung_replica``: two replicas, one accepts and never answers; the first-token
  time-out moves those requests to the healthy one before the client gets anything.
- ``slow_replica``: two replicas, one ten times slower; least-outstanding routing
  sends it less, nothing fails.
- ``replica_kill_vllm``: ``replica_kill`` with two real vLLM engines serving the
  bundled model (prepared into the scenario's folder on first use).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from llmserve.replicas.backend import EndpointState
from llmserve.replicas.local import LocalBackend
from llmserve.replicas.spec import EngineSpec
from llmserve.server import build
from llmserve.settings import EngineSettings, RouterSettings, Settings
from loadtest.chaos.scenario import Load, Outcome, Scenario
from loadtest.chaos.tally import Tally, streamed_load
from loadtest.inprocess import serve_router
from loadtest.overhead import free_port
from loadtest.sim import SimEngineProgram
from loadtest.simstack import open_unless_asked

MODEL = "chat"

Fault = Callable[[LocalBackend], Awaitable[tuple[str, str | None]]]  # (what it did, a replica to serve again)


def chaos_engine_settings() -> EngineSettings:
    """Supervision tuned so a scenario of seconds sees a fault detected and repaired."""
    return EngineSettings(first_port=free_port(), health_interval_s=0.5, ready_timeout_s=30,
                          restart_backoff_initial_s=0.2, drain_timeout_s=2, stop_timeout_s=3,
                          health_failures_to_eject=1)


async def _kill_one(backend: LocalBackend) -> tuple[str, str | None]:
    victim = backend.process(backend.endpoints()[0])
    assert victim.pid is not None
    os.killpg(victim.pid, signal.SIGKILL)
    killed = time.monotonic()
    await asyncio.sleep(0.5)
    # Until the supervisor has it back, however many attempts that takes (a failed restart is retried
    # with backoff); a vLLM engine restarts in tens of seconds.
    while victim.state is not EndpointState.READY and time.monotonic() - killed < 600:
        await asyncio.sleep(0.2)
    back = f"ready again after {time.monotonic() - killed:.1f}s" if victim.state is EndpointState.READY \
        else "never ready again"
    return f"killed {victim.id}; restarted {victim.restarts} time(s), {back}", victim.id


async def _nothing(backend: LocalBackend) -> tuple[str, str | None]:
    return "fault present from the start", None


async def _served_by(url: str, model: str, requests: int) -> set[str]:
    """Which replicas answer ``requests`` concurrent requests (least-outstanding spreads them)."""
    async with httpx.AsyncClient(timeout=60) as client:
        responses = await asyncio.gather(*(client.post(f"{url}/v1/chat/completions", json={
            "model": model, "max_tokens": 8, "messages": [{"role": "user", "content": "hello"}]})
            for _ in range(requests)))
    return {r.headers.get("x-served-by", "") for r in responses if r.status_code == 200}


def _replica_fault(programs: tuple[SimEngineProgram, ...], fault: Fault, router: dict[str, Any] | None = None
                   ) -> Callable[[Load, Path], Awaitable[Outcome]]:
    async def run(load: Load, work: Path) -> Outcome:
        chosen = itertools.cycle(programs)  # one replica of each program
        opened = open_unless_asked(RouterSettings(port=free_port(), retry_after_s=1, **(router or {})))
        settings = Settings(data_dir=work, router=opened,
                            engine=chaos_engine_settings())
        backend = LocalBackend(settings.engine, work / "logs", program=lambda spec: next(chosen))
        spec = EngineSpec(model_dir=work, model_name=MODEL, version="v1")
        return await _under_load(settings, backend, spec, len(programs), fault, load)

    return run


async def _kill_a_vllm_replica(load: Load, work: Path) -> Outcome:
    from llmserve.models.repository import ModelRepository

    engine = chaos_engine_settings().model_copy(update={"ready_timeout_s": 600, "health_interval_s": 1.0})
    settings = Settings(data_dir=work, router=open_unless_asked(RouterSettings(port=free_port(), retry_after_s=1)),
                        engine=engine)
    model = settings.model
    folder = ModelRepository(settings.model_repository).prepare(model.name, model.version, dtype=model.dtype).folder
    spec = EngineSpec.from_settings(folder, model.name, model.version, settings.engine)
    backend = LocalBackend(settings.engine, work / "logs")  # the engine itself: vLLM
    return await _under_load(settings, backend, spec, 2, _kill_one, load, model.name)


async def _under_load(settings: Settings, backend: LocalBackend, spec: EngineSpec, replicas: int, fault: Fault,
                      load: Load, model: str = MODEL) -> Outcome:
    server = build(settings, backend=backend, store=None, static=[(spec, replicas)])
    tally = Tally()
    async with serve_router(server.app, settings.router.port, backend) as url:
        load_task = asyncio.create_task(streamed_load([url], model, load.users, load.duration_s, tally))
        await asyncio.sleep(load.duration_s / 3)
        what, must_serve = await fault(backend)
        await load_task
        ready = sum(e.state is EndpointState.READY for e in backend.endpoints())
        checks: dict[str, Any] = {"replicas_ready_at_end": ready == replicas}
        if must_serve is not None:
            checks["restarted_replica_serves"] = must_serve in await _served_by(url, model, 2 * replicas)
    return Outcome(tally, what, checks)


def scenarios() -> list[Scenario]:
    fast = SimEngineProgram(MODEL, "v1", ttft_ms=20, itl_ms=5)
    hung = SimEngineProgram(MODEL, "v1", ttft_ms=20, itl_ms=5, extra_args=("--hang-rate", "1.0"))
    slow = SimEngineProgram(MODEL, "v1", ttft_ms=200, itl_ms=50)
    return [
        Scenario("replica_kill", "two replicas, one SIGKILLed", _replica_fault((fast, fast), _kill_one)),
        Scenario("hung_replica", "one of two accepts and never answers",
                 _replica_fault((fast, hung), _nothing, {"first_token_timeout_s": 1.0})),
        Scenario("slow_replica", "one of two ten times slower", _replica_fault((fast, slow), _nothing)),
        Scenario("replica_kill_vllm", "two vLLM engines, one SIGKILLed", _kill_a_vllm_replica, real_engine=True),
    ]
