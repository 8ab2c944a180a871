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


LONG = 60_000  # tokens: a stream no buffer holds


async def stuck_readers(router: RunningRouter, count: int) -> list:
    """``count`` streams of LONG fast tokens whose clients never read, through a tiny window; returns
    once the router holds them all (its kernel buffers and its own are full: the relay waits)."""
    socks = [await raw.connect(port_of(router), rcvbuf=4096) for _ in range(count)]
    for sock in socks:
        await raw.send_all(sock, raw.chat_request("demo", LONG))
    replica = router.backend.endpoints()[0]
    deadline = time.monotonic() + 5
    while replica.outstanding < count:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)
    return socks


async def test_streams_reset_with_a_backlog_release_their_replica_at_once(tmp_path: Path) -> None:
    count = 16
    async with run_router(demo(0.05, 2 * LONG, "--max-model-len", str(2 * LONG)), tmp_path) as router:
        replica = router.backend.endpoints()[0]
        socks = await stuck_readers(router, count)
        for sock in socks:
            raw.reset(sock)
        reset_at = time.monotonic()
        while replica.outstanding and time.monotonic() - reset_at < 15:
            await asyncio.sleep(0.05)
        released_s = time.monotonic() - reset_at
        # Before: the relays drained their backlogs into the closed sockets first, 5 to 10 s here.
        assert released_s < 2.0, f"the reset streams held their replica {released_s:.1f}s"
        assert await router_metric(router, "llmserve_requests_total", status="499") == count
