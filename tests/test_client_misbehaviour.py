"""Clients that misbehave, on raw sockets, against the router served by uvicorn: cut bodies, resets
mid-stream (found by the chaos scenarios of ``loadtest/chaos/clients.py``)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from loadtest.chaos import misbehave as raw
from loadtest.sim import SimEngineProgram
from loadtest.simstack import StaticVersion
from tests.conftest import RunningRouter, run_router


def demo(itl_ms: float = 5, max_model_len: int = 2048, *args: str) -> list[StaticVersion]:
    return [StaticVersion(SimEngineProgram("demo", "v1", ttft_ms=5, itl_ms=itl_ms, extra_args=args), max_model_len)]


def port_of(router: RunningRouter) -> int:
    return int(router.url.rsplit(":", 1)[1])


async def router_metric(router: RunningRouter, name: str, **labels: str) -> float:
    return raw.metric_sum(await raw.get(port_of(router), "/metrics"), name, **labels)


async def test_a_body_cut_by_the_client_is_a_499_not_a_500(tmp_path: Path) -> None:
    async with run_router(demo(), tmp_path) as router:
        request = raw.chat_request("demo", 8)
        sock = await raw.connect(port_of(router))
        await raw.send_all(sock, request[:-20])  # the Content-Length promises 20 bytes more
        sock.close()
        deadline = time.monotonic() + 5
        while await router_metric(router, "llmserve_requests_total", status="499") < 1:
            assert time.monotonic() < deadline, "the cut request was never recorded"
            await asyncio.sleep(0.05)
        assert await router_metric(router, "llmserve_http_responses_total", status="5*") == 0
