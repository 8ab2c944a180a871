"""The router's cost of Prometheus metrics: two routers, metrics on and off, same simulated engine setup.

    python -m loadtest.metrics_overhead [--requests 600 --concurrency 8]

Each router fronts its own simulated engine (20 ms TTFT, 5 ms ITL); the
requests are interleaved between them in rounds and the JSON reports the
on-router relative to the off-router.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from llmserve.settings import EngineSettings, RouterSettings
from loadtest.cli import BenchConfig, bench
from loadtest.inprocess import serve_router
from loadtest.overhead import free_port
from loadtest.runner import Target
from loadtest.sim import SimEngineProgram
from loadtest.simstack import StaticVersion, sim_server


@contextlib.asynccontextmanager
async def _router(metrics: bool, logs: Path) -> AsyncIterator[str]:
    port = free_port()
    server = sim_server(logs, [StaticVersion(SimEngineProgram("demo", "v1", ttft_ms=20, itl_ms=5), 2048, 1)],
                        RouterSettings(port=port, metrics_enabled=metrics),
                        EngineSettings(first_port=free_port(), health_interval_s=1.0))
    async with serve_router(server.app, port, server.backend) as url:
        yield f"{url}/v1"


async def measure(requests: int, concurrency: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        async with _router(False, Path(tmp) / "off") as off, _router(True, Path(tmp) / "on") as on:
            config = BenchConfig(model="demo", requests=requests, concurrency=concurrency, max_tokens=16,
                                 rounds=10, seed=0)
            return await bench([Target("metrics_off", off), Target("metrics_on", on)], config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.metrics_overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args(argv)
    report = asyncio.run(measure(args.requests, args.concurrency))
    print(json.dumps(report["comparison"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
