"""One router over simulated engines, under the steady streamed load, while an attack runs beside it.

The client scenarios (``clients``, ``malformed``) each provide the attack; this module starts the
router (in this process, so that its memory and open files are this process's), runs the load, and
afterwards checks that everything came back to rest: the router's open files, the replicas'
outstanding counts, the engines' running requests, and no 5xx counted anywhere.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmserve.replicas.backend import Endpoint
from llmserve.replicas.local import LocalBackend
from llmserve.replicas.spec import EngineSpec
from llmserve.server import build
from llmserve.settings import ConnectionSettings, RouterSettings, Settings
from loadtest.chaos import misbehave as raw
from loadtest.chaos.replicas import MODEL, chaos_engine_settings
from loadtest.chaos.scenario import Load, Outcome
from loadtest.chaos.tally import Tally, streamed_load
from loadtest.inprocess import serve_router
from loadtest.overhead import free_port
from loadtest.sim import SimEngineProgram
from loadtest.simstack import open_unless_asked

READER_MODEL = "long"  # the slow readers' model, on a replica of its own so its counts are theirs alone
READER_TOKENS = 60_000
# The router's connection limits here: time-outs short enough that a scenario of seconds sees each act.
CLIENT_LIMITS = ConnectionSettings(header_timeout_s=1.0, body_timeout_s=1.0, write_timeout_s=1.0)


@dataclass
class Stack:
    url: str
    port: int
    backend: LocalBackend
    load: Load

    def replicas(self, model: str | None = None) -> list[Endpoint]:
        return [e for e in self.backend.endpoints() if model is None or e.model_name == model]

    async def engine_metric(self, name: str, model: str | None = None) -> float:
        """A metric of the replicas' engines, summed (their own pages: vLLM's names, and the sim's)."""
        pages = [await raw.get(int(r.url.rsplit(":", 1)[1]), "/metrics") for r in self.replicas(model)]
        return sum(raw.metric_sum(page, name) for page in pages)

    async def idle(self, model: str | None = None) -> bool:
        """Nothing in flight at the router's replicas nor in their engines."""
        if sum(r.outstanding for r in self.replicas(model)):
            return False
        return await self.engine_metric("vllm:num_requests_running", model) == 0


Attack = Callable[[Stack], Awaitable[tuple[str, dict[str, Any]]]]


def under_attack(attack: Attack, readers: bool = False) -> Callable[[Load, Path], Awaitable[Outcome]]:
    """A scenario's run: the load for its whole duration, ``attack`` from a quarter of the way in.
    ``readers``: also serve READER_MODEL, long and fast (a stuck reader's stream outruns any buffer)."""
    async def run(load: Load, work: Path) -> Outcome:
        port = free_port()
        settings = Settings(data_dir=work, engine=chaos_engine_settings(),
                            router=open_unless_asked(RouterSettings(port=port, retry_after_s=1,
                                                                    connections=CLIENT_LIMITS)))
        programs = {MODEL: SimEngineProgram(MODEL, "v1", ttft_ms=20, itl_ms=5)}
        static = [(EngineSpec(model_dir=work, model_name=MODEL, version="v1"), 1)]
        if readers:
            programs[READER_MODEL] = SimEngineProgram(READER_MODEL, "v1", ttft_ms=5, itl_ms=0.05,
                                                      extra_args=("--max-model-len", str(2 * READER_TOKENS)))
            static.append((EngineSpec(model_dir=work, model_name=READER_MODEL, version="v1",
                                      max_model_len=2 * READER_TOKENS), 1))
        backend = LocalBackend(settings.engine, work / "logs", program=lambda spec: programs[spec.model_name])
        server = build(settings, backend=backend, store=None, static=static)
        tally = Tally()
        async with serve_router(server.app, port, backend, router=settings.router) as url:
            stack = Stack(url, port, backend, load)
            fds_before = raw.open_fds()
            load_task = asyncio.create_task(streamed_load([url], MODEL, load.users, load.duration_s, tally))
            await asyncio.sleep(load.duration_s / 4)
            what, checks = await attack(stack)
            await load_task
            checks.update(await settled(stack, fds_before))
        return Outcome(tally, what, checks)

    return run


async def settled(stack: Stack, fds_before: int) -> dict[str, Any]:
    """After the load: the router's files, the replicas' counts and the engines back to rest (up to 5 s)."""
    slack = stack.load.users + 8  # pooled keep-alive connections to the engines
    deadline = time.monotonic() + 5
    while not (fds_back := raw.open_fds() <= fds_before + slack) or not await stack.idle():
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    page = await raw.get(stack.port, "/metrics")
    server_errors = raw.metric_sum(page, "llmserve_http_responses_total", status="5*")
    return {"router_fds_before": fds_before, "router_fds_after": raw.open_fds(), "fds_back": fds_back,
            "upstream_idle_after": await stack.idle(), "router_5xx": int(server_errors),
            "no_5xx": server_errors == 0}
