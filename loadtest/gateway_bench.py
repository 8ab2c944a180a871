"""The gateway's cost: API keys and per-key limits on against off, in memory and in Redis, in one run.

    python -m loadtest.gateway_bench [--requests 1200 --concurrency 8 --rounds 12]

Two parts. **Steps**: the gateway's own work per request, timed call by
call in this process and interleaved (authentication off, a key looked up,
and a key looked up plus its two buckets taken and settled, in memory and in
Redis): what the gateway adds, free of the noise of a whole request.
**End to end**: three routers, each over its own simulated engine tuned to be nearly free
(1 ms to the first token, 0.5 ms a token, 4 tokens): ``auth_off``, ``auth_on``
(a key with RPM and TPM limits in this router's memory) and ``auth_redis``
(the same key and limits in a real Redis, the store there too). The requests
are interleaved between them in rounds, so the machine's noise falls on all
three alike; the report gives each router's TTFT and end-to-end latency and
its throughput, and what the gateway added against ``auth_off``.
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
from typing import Any

import httpx
from pydantic import SecretStr

from llmserve.settings import AuthSettings, EngineSettings, RouterSettings
from loadtest.cli import BenchConfig, bench
from loadtest.inprocess import serve_router
from loadtest.overhead import free_port
from loadtest.redis_server import RedisServer
from loadtest.runner import Target
from loadtest.sim import SimEngineProgram
from loadtest.simstack import StaticVersion, sim_server
from router.store import Store
from router.store.redis_store import RedisStore
from router.store.sqlite import SQLiteStore

ADMIN = "sk-ls-bench" + "x" * 38
# high enough never to refuse, so every request pays for both buckets
LIMITS = {"rpm": 10_000_000, "tpm": 1_000_000_000}


@contextlib.asynccontextmanager
async def _router(work: Path, auth: bool, redis_url: str | None = None) -> AsyncIterator[tuple[str, str | None]]:
    """(the router's /v1 URL, an inference key with limits, None with authentication off)."""
    port = free_port()
    store: Store = RedisStore(redis_url, f"bench{port}:") if redis_url else SQLiteStore(work / "db")
    settings = RouterSettings(port=port, auth=AuthSettings(enabled=auth, admin_key=SecretStr(ADMIN)),
                              access_log=False)
    server = sim_server(work, [StaticVersion(SimEngineProgram("demo", "v1", ttft_ms=1, itl_ms=0.5), 2048, 1)],
                        settings, EngineSettings(first_port=free_port(), health_interval_s=1.0), store=store,
                        shared_limits_url=redis_url)
    async with serve_router(server.app, port, server.backend) as url:
        key = None
        if auth:
            async with httpx.AsyncClient(timeout=10) as client:
                created = await client.post(f"{url}/api/v1/keys", headers={"authorization": f"Bearer {ADMIN}"},
                                            json={"name": "bench", "scopes": ["inference"], **LIMITS})
                created.raise_for_status()
                key = str(created.json()["key"])
        yield f"{url}/v1", key


async def measure(requests: int, concurrency: int, rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp:
        work = Path(tmp)
        redis = RedisServer(work / "redis", durable=False)
        redis.start()
        try:
            async with _router(work / "off", False) as (off, _), _router(work / "on", True) as (on, on_key), \
                    _router(work / "redis-router", True, redis.url) as (shared, shared_key):
                config = BenchConfig(model="demo", requests=requests, concurrency=concurrency, max_tokens=4,
                                     rounds=rounds, seed=0)
                report = await bench([Target("auth_off", off, api_key=None), Target("auth_on", on, api_key=on_key),
                                      Target("auth_redis", shared, api_key=shared_key)], config)
        finally:
            redis.stop()
    return {"targets": {name: _figures(summary) for name, summary in report["targets"].items()},
            "added_vs_auth_off": report["comparison"]}


async def steps(calls: int) -> dict[str, Any]:
    """Per-request cost of each gateway variant, in microseconds (p50, p99), interleaved call by call."""
    import statistics
    import time

    from router.access.auth import Caller, KeyRing, hash_key
    from router.access.ratelimit import Admission, LocalLimiter, RedisLimiter
    from router.store import ApiKeyRecord

    secret = "sk-ls-" + "k" * 43
    ring = KeyRing()
    ring.replace([ApiKeyRecord("key_1", "bench", hash_key(secret), "sk-ls-...kkkk", ("inference",),
                               rpm=LIMITS["rpm"], tpm=LIMITS["tpm"])])
    headers = {"authorization": f"Bearer {secret}"}
    local = LocalLimiter()
    with tempfile.TemporaryDirectory(prefix="gateway-steps-") as tmp:
        redis = RedisServer(Path(tmp), durable=False)
        redis.start()
        shared = RedisLimiter(redis.url, "steps:")
        try:
            from router.access.auth import presented_key

            async def off() -> None:
                Caller(None, "api", frozenset({"inference"}))

            async def authenticate() -> None:
                ring.authenticate(presented_key(headers)).require("inference")

            # on the request path: the key and the take of its buckets; the settle runs after the answer
            async def with_local() -> None:
                caller = ring.authenticate(presented_key(headers))
                await local.acquire("key_1", caller.rpm, caller.tpm, 100)

            async def with_redis() -> None:
                caller = ring.authenticate(presented_key(headers))
                await shared.acquire("key_1", caller.rpm, caller.tpm, 100)

            reservation = Admission(None, None, reserved=100)

            async def redis_settle() -> None:
                await shared.settle("key_1", LIMITS["tpm"], reservation, 40)

            variants = {"auth_off": off, "key": authenticate, "key_and_local_limits": with_local,
                        "key_and_redis_limits": with_redis, "redis_settle_after_the_answer": redis_settle}
            samples: dict[str, list[float]] = {name: [] for name in variants}
            for _ in range(calls):
                for name, step in variants.items():
                    started = time.perf_counter()
                    await step()
                    samples[name].append((time.perf_counter() - started) * 1e6)
        finally:
            await shared.close()
            redis.stop()

    def pct(values: list[float], q: float) -> float:
        return round(statistics.quantiles(values, n=1000)[int(q * 10) - 1], 1)

    return {name: {"p50_us": pct(v, 50), "p99_us": pct(v, 99)} for name, v in samples.items()}


def _figures(summary: dict[str, Any]) -> dict[str, Any]:
    keys = ("completed", "failed", "p50_ttft_ms", "p99_ttft_ms", "p50_e2el_ms", "p99_e2el_ms",
            "request_throughput", "output_throughput")
    return {k: summary.get(k) for k in keys}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.gateway_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1200, help="per router")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--calls", type=int, default=20_000, help="per variant, for the steps")
    parser.add_argument("--output", help="write the JSON here too")
    args = parser.parse_args(argv)
    result = {"steps": asyncio.run(steps(args.calls)),
              **asyncio.run(measure(args.requests, args.concurrency, args.rounds))}
    text = json.dumps(result, indent=2)
    if args.output:
        Path(args.output).write_text(text)
    print(text)
    return 1 if any(t["failed"] for t in result["targets"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
