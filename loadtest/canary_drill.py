"""Canary drill: how fast is a regressed canary caught, and how many users ever see it?

    python -m loadtest.canary_drill [--regression 0.2 --rate 40 --users 2000 --repeat 5]

Starts a router with its control plane before simulated engines: stable v1
(TTFT 30 ms, jitter CV 0.25) and, per repetition, a canary whose TTFT is
``1 + regression`` times slower, deployed with ``strategy: canary`` and the
default policy (steps 5/25/50/100, min 50 samples a side) but a short bake.
Users drawn from a population send streamed requests as a Poisson stream.
Per repetition it reports the outcome, the seconds from the canary's first
share of traffic to the rollback being in effect, the canary requests until
then, and the share of all users seen in the drill that were ever answered
by the canary. ``--regression 0`` measures the time to promote instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from llmserve.replicas.spec import EngineSpec
from llmserve.settings import EngineSettings, RouterSettings
from loadtest.inprocess import serve_router
from loadtest.overhead import free_port
from loadtest.runner import Record, Target, send
from loadtest.sim import SimEngineProgram
from loadtest.simstack import sim_model_folder, sim_server
from loadtest.workload import RequestSpec
from router.store.sqlite import SQLiteStore

MODEL = "drill"
STABLE_TTFT_MS = 30.0


@contextlib.asynccontextmanager
async def _router(tmp: Path, regression: float) -> AsyncIterator[str]:
    def factory(spec: EngineSpec) -> SimEngineProgram:
        slow = spec.version != "v1"
        ttft = STABLE_TTFT_MS * (1 + regression) if slow else STABLE_TTFT_MS
        return SimEngineProgram(spec.model_name, spec.version, ttft_ms=ttft, itl_ms=2,
                                extra_args=("--jitter-cv", "0.25", "--seed", str(hash(spec.version) % 1000)))

    port = free_port()
    server = sim_server(tmp, (), RouterSettings(port=port), EngineSettings(first_port=free_port(),
                        health_interval_s=1.0), store=SQLiteStore(tmp / "db"), program=factory)
    async with serve_router(server.app, port, server.backend, wait_replicas=False) as url:
        yield url


async def _wait_active(session: aiohttp.ClientSession, url: str, version: str) -> None:
    while True:
        async with session.get(f"{url}/api/v1/deployments/{MODEL}") as r:
            state = await r.json()
        if any(v["version"] == version and v["status"] == "active" for v in state["versions"]) \
                and state["split"].get(version, 0) > 0:
            return
        await asyncio.sleep(0.05)


async def drill_once(session: aiohttp.ClientSession, url: str, version: str, args: argparse.Namespace,
                     rng: random.Random) -> dict[str, Any]:
    """Deploy ``version`` as a canary under load; return what the users and the analysis saw."""
    records: list[Record] = []
    stop = asyncio.Event()
    target = Target("router", f"{url}/v1")
    in_flight: set[asyncio.Task[None]] = set()
    clock = time.perf_counter

    async def one(user: str) -> None:
        record = Record(index=len(records), target="router", intended_s=clock(), sent_s=clock(), user=user)
        records.append(record)
        spec = RequestSpec(messages=[{"role": "user", "content": "hi"}], prompt=None, max_tokens=2,
                           user=user, priority=None)
        await send(session, target, MODEL, spec, record, clock)

    async def generate() -> None:
        while not stop.is_set():
            task = asyncio.create_task(one(f"user-{rng.randrange(args.users)}"))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            await asyncio.sleep(rng.expovariate(args.rate))

    load = asyncio.create_task(generate())
    await asyncio.sleep(2.0)  # stable's window fills before the canary arrives
    async with session.post(f"{url}/api/v1/deployments", json={
        "model_name": MODEL, "version": version,
        "strategy": {"type": "canary", "steps": [5, 25, 50, 100], "bake_s": args.bake_s,
                     "min_samples": args.min_samples, "ttft_tolerance": 0.10, "confidence": 0.95}}) as r:
        if r.status != 202:
            raise RuntimeError(f"deploy failed: {r.status} {await r.text()}")
    canary: dict[str, Any] = {}
    deadline = time.monotonic() + args.timeout_s
    while time.monotonic() < deadline:
        async with session.get(f"{url}/api/v1/deployments/{MODEL}/canary") as r:
            if r.status == 200:
                got = await r.json()
                if got["canary_version"] == version:  # not the previous drill's canary
                    canary = got
                    if canary["status"] not in ("running", "paused"):
                        break
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)
    stop.set()
    await load
    await asyncio.gather(*in_flight)
    async with session.get(f"{url}/api/v1/deployments/{MODEL}") as r:
        history = sorted((await r.json())["history"], key=lambda h: h["at"])  # the API gives newest first
    first_step = next(h["at"] for h in history if h["action"] == "canary_step"
                      and h["detail"]["version"] == version)
    end = next((h["at"] for h in history if h["at"] >= first_step and (
        (h["action"] == "rollback" and h["detail"].get("from_version") == version)
        or (h["action"] == "canary_step" and h["detail"]["percent"] == 100 and h["detail"]["version"] == version))),
        None)
    users = {r.user for r in records}
    saw_canary = {r.user for r in records if r.version == version}
    return {
        "version": version, "outcome": canary.get("status"), "step_percent": canary.get("step_percent"),
        "seconds_to_decision": round(end - first_step, 2) if end else None,
        "canary_requests": sum(r.version == version for r in records),
        "requests": len(records), "failed": sum(not r.ok for r in records),
        "users_seen": len(users), "users_who_saw_canary": len(saw_canary),
        "share_of_users_who_saw_canary": round(len(saw_canary) / len(users), 4) if users else None,
        "decisions": [{k: d.get(k) for k in ("step_percent", "decision", "canary_samples", "ttft_p50_ratio",
                                              "p_slower", "p_within")} for d in canary.get("decisions", [])],
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    results = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        versions = [f"v{i + 2}" for i in range(args.repeat)]
        for version in ["v1", *versions]:
            sim_model_folder(tmp / "models", MODEL, version, "canary drill")
        async with _router(tmp, args.regression) as url, aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=60)) as session:
            async with session.post(f"{url}/api/v1/models", json={"model_name": MODEL}) as r:
                assert r.status == 201, await r.text()
            async with session.post(f"{url}/api/v1/deployments", json={
                    "model_name": MODEL, "version": "v1", "traffic_percent": 100}) as r:
                assert r.status == 202, await r.text()
            await _wait_active(session, url, "v1")
            for version in versions:
                result = await drill_once(session, url, version, args, rng)
                results.append(result)
                print(json.dumps(result), file=sys.stderr)
    decided = [r["seconds_to_decision"] for r in results if r["seconds_to_decision"] is not None]
    return {
        "regression": args.regression, "rate_per_s": args.rate, "user_population": args.users,
        "outcomes": [r["outcome"] for r in results],
        "seconds_to_decision": {"min": min(decided, default=None), "max": max(decided, default=None),
                                "mean": round(sum(decided) / len(decided), 2) if decided else None},
        "canary_requests": [r["canary_requests"] for r in results],
        "share_of_users_who_saw_canary": [r["share_of_users_who_saw_canary"] for r in results],
        "failed_requests": sum(r["failed"] for r in results),
        "runs": results,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.canary_drill", description=__doc__.splitlines()[0])
    parser.add_argument("--regression", type=float, default=0.2, help="canary TTFT = stable * (1 + this)")
    parser.add_argument("--rate", type=float, default=40.0, help="requests per second (Poisson)")
    parser.add_argument("--users", type=int, default=2000, help="user population requests are drawn from")
    parser.add_argument("--repeat", type=int, default=5, help="canaries deployed one after another")
    parser.add_argument("--bake-s", type=float, default=2.0)
    parser.add_argument("--min-samples", type=int, default=50)
    parser.add_argument("--timeout-s", type=float, default=180.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    report = asyncio.run(run(args))
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
