"""Shadow bench: does shadowing change what clients wait for? Client latency with shadowing on and off, interleaved.

    python -m loadtest.shadow_bench [--users 8 --round-s 3 --rounds 6 --sample-percent 100]

Starts a router with its control plane before simulated engines (TTFT 30 ms, ITL 5 ms, jitter CV 0.1):
v1 answers 100% of the traffic and v2, as fast, is deployed as its shadow. ``--users`` closed-loop users
send streamed chat requests (16 tokens, temperature 0). The rounds alternate: shadowing on (the shadow's
``sample_percent`` as asked) and off (0%), ``--rounds`` of each, in the order on, off, off, on, on, off...
(so neither side always runs first), each ``--round-s`` long, after one uncounted warm-up round; after
an "on" round the replays still queued are drained before the next round starts, so an "off" round never
pays for them. ``--sample-percent 0`` is an A/A run (both sides off): the noise floor of the ratios. It prints the
client TTFT and latency p50/p99 of each side and the ratio on/off, and the shadow report's counts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from llmserve.replicas.spec import EngineSpec
from llmserve.settings import AdmissionSettings, EngineSettings, RouterSettings
from loadtest.inprocess import serve_router
from loadtest.overhead import free_port
from loadtest.sim import SimEngineProgram
from loadtest.simstack import sim_model_folder, sim_server
from router.store.sqlite import SQLiteStore

MODEL = "shadowed"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] if ordered else float("nan")


@contextlib.asynccontextmanager
async def _router(tmp: Path) -> AsyncIterator[tuple[str, Any]]:
    def factory(spec: EngineSpec) -> SimEngineProgram:
        return SimEngineProgram(spec.model_name, spec.version, ttft_ms=30, itl_ms=5,
                                extra_args=("--jitter-cv", "0.1", "--seed", str(len(spec.version))))

    for version in ("v1", "v2"):
        sim_model_folder(tmp / "models", MODEL, version)
    port = free_port()
    settings = RouterSettings(port=port, admission=AdmissionSettings(enabled=False))
    server = sim_server(tmp, (), settings, EngineSettings(first_port=free_port(), health_interval_s=1.0),
                        store=SQLiteStore(tmp / "db"), program=factory)
    async with serve_router(server.app, port, server.backend, wait_replicas=False) as url:
        yield url, server.app


async def _deploy(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> None:
    async with session.post(f"{url}/api/v1/deployments", json={"model_name": MODEL, **body}) as r:
        assert r.status == 202, await r.text()


async def _until(session: aiohttp.ClientSession, url: str, path: str, ok: Any) -> Any:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        async with session.get(f"{url}{path}") as r:
            if r.status == 200 and ok(body := await r.json()):
                return body
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{path} never got ready")


async def _request(session: aiohttp.ClientSession, url: str, n: int) -> tuple[float, float]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": f"hello {n}"}], "max_tokens": 16,
            "temperature": 0, "stream": True}
    started = time.perf_counter()
    first: float | None = None
    async with session.post(f"{url}/v1/chat/completions", json=body) as response:
        assert response.status == 200, await response.text()
        async for line in response.content:
            if first is None and line.startswith(b"data: {") and b'"content"' in line:
                first = time.perf_counter()
    done = time.perf_counter()
    return ((first or done) - started) * 1000, (done - started) * 1000


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp_dir:
        async with _router(Path(tmp_dir)) as (url, app), aiohttp.ClientSession() as session:
            async with session.post(f"{url}/api/v1/models", json={"model_name": MODEL}) as r:
                assert r.status == 201, await r.text()
            await _deploy(session, url, {"version": "v1", "traffic_percent": 100})
            await _until(session, url, f"/api/v1/deployments/{MODEL}", lambda s: s["split"].get("v1") == 100)
            await _deploy(session, url, {"version": "v2", "strategy": {"type": "shadow",
                                                                       "sample_percent": max(1, args.sample_percent)}})
            await _until(session, url, f"/api/v1/deployments/{MODEL}/shadow", lambda _s: True)
            shadows = app.state.router.shadows
            target = shadows.get(MODEL)
            samples: dict[str, tuple[list[float], list[float]]] = {"on": ([], []), "off": ([], []),
                                                                   "warmup": ([], [])}
            counter = 0
            order = [("on", "off"), ("off", "on")]
            sides = ["warmup"] + [side for n in range(args.rounds) for side in order[n % 2]]
            for side in sides:  # the first round warms connections and caches up, and is not counted
                target.sample_percent = args.sample_percent if side == "on" else 0
                stop = time.monotonic() + args.round_s

                async def user(side: str = side, stop: float = stop) -> None:
                    nonlocal counter
                    while time.monotonic() < stop:
                        counter += 1
                        ttft, latency = await _request(session, url, counter)
                        samples[side][0].append(ttft)
                        samples[side][1].append(latency)

                await asyncio.gather(*(user() for _ in range(args.users)))
                await shadows.drain()
            report = (await _until(session, url, f"/api/v1/deployments/{MODEL}/shadow", lambda _s: True))

    def summary(values: list[float]) -> dict[str, float]:
        return {"n": len(values), "p50_ms": round(percentile(values, 50), 2),
                "p99_ms": round(percentile(values, 99), 2)}

    result: dict[str, Any] = {"users": args.users, "rounds": args.rounds, "round_s": args.round_s,
                              "sample_percent": args.sample_percent}
    for i, metric in enumerate(("ttft", "latency")):
        on, off = summary(samples["on"][i]), summary(samples["off"][i])
        result[metric] = {"on": on, "off": off,
                          "ratio_p50": round(on["p50_ms"] / off["p50_ms"], 3),
                          "ratio_p99": round(on["p99_ms"] / off["p99_ms"], 3)}
    result["shadow_counts"] = report["counts"]
    result["shadow_ttft_ratio"] = report["ttft_ratio"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.shadow_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--round-s", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=6, help="rounds of each side")
    parser.add_argument("--sample-percent", type=int, default=100, help="0: an A/A run, the noise floor")
    result = asyncio.run(bench(parser.parse_args(argv)))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
