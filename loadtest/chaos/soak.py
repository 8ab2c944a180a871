"""Scenario 7, the soak: a router at about 70% of its capacity for the whole of ``Load.duration_s``
(30 minutes for the release check, 2 minutes in CI), its footprint watched from outside.

1. The router runs as its own process (``python -m loadtest.simstack``), so the memory, descriptors
   and threads measured are its own, not the load generator's. Its two simulated engine replicas run
   at most 8 sequences each and take about a quarter of a second a request, so the engines bound the
   stack's capacity (as a real engine's batch size does), not the CPUs this machine's load generator
   shares with it.
2. Capacity: closed-loop streaming users, 12 a replica (more than an engine runs, so its queue never
   empties; fewer than the 16 a replica at which the router starts shedding), for a few seconds: the
   requests per second that complete.
3. The soak: Poisson arrivals at 70% of that (open loop: each request goes out on time, whatever the
   earlier ones are doing), every user name new; the footprint sampled every 0.25 to 2 s.
4. Flat: the first 20% of the run (at least a minute, at most half) is warm-up: connection pools,
   the bounded sample windows and the allocator's arenas fill. Over the rest, the growth the fitted
   line makes stays under a limit: memory under 10 MB and under 5% of its mean; descriptors and
   tasks, which rise and fall with the requests in flight, under 10 or 10% of their mean (a leak of
   one per thousand requests passes 10 within minutes at this rate); threads under 2 (only the
   executor's workers may still be starting). The pools keep a connection for each request of the
   busiest moment so far, so descriptors creep up a little, ever more slowly, without leaking.
5. Idle: before the soak and after it, with nothing in flight and past the 5-s keep-alive that
   closes idle connections, the router holds the same descriptors and tasks (within 2): a request's
   leftover, however rare, is still there, and nothing in flight hides it.
6. Answers: nothing failed or lost, and nothing refused (at 70% of capacity a 429 means the router
   judged itself saturated); the generator sent within 5% of the load it claims.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from llmserve.settings import AdmissionSettings
from loadtest.chaos.footprint import Sample, Trend, read_footprint, trends, watch
from loadtest.chaos.scenario import Load, Outcome, Scenario
from loadtest.chaos.tally import Tally, open_loop_load, streamed_load
from loadtest.overhead import free_port

MODEL = "demo"  # what simstack serves
REPLICAS = 2
ENGINE = {"--ttft-ms": "20", "--itl-ms": "10", "--max-running": "8"}  # 24 tokens: ~0.25 s a request
LOAD_SHARE = 0.7
RATE_TOLERANCE = 0.05  # sent within 5% of rate x duration (Poisson's own spread: 1.4% sd over 2 minutes)
CAPACITY_S = 5.0
WARMUP_SHARE = 0.2
MIN_WARMUP_S = 60.0
READY_TIMEOUT_S = 60.0
IDLE_SLACK = 2  # a background loop's tick (and its connection) may be under way when the idle sample is taken
IDLE_SETTLE_S = 6.0  # past uvicorn's 5-s keep-alive, on the router and on the engines
ROOT = Path(__file__).resolve().parents[2]


def capacity_users() -> int:
    """Between what the engines run and where the router sheds: the engines are busy, nothing is refused."""
    shed_at = int(AdmissionSettings().max_outstanding_per_replica)
    return REPLICAS * (int(ENGINE["--max-running"]) + shed_at) // 2


def sample_interval_s(duration_s: float) -> float:
    """Four samples a second up to 2 minutes, then about 480 a run, at most 2 s apart.

    Tasks swing by a dozen or so with the requests in flight (sd ~13 at this load); the fitted growth's
    error is that sd times sqrt(12 / samples), so the 240 after a minute's warm-up in CI keep it near 3,
    well under the limit of 10.
    """
    return min(2.0, max(0.25, duration_s / 480))


def warmup_s(duration_s: float) -> float:
    return min(max(WARMUP_SHARE * duration_s, MIN_WARMUP_S), duration_s / 2)


@contextlib.asynccontextmanager
async def router_process(work: Path) -> AsyncIterator[tuple[str, int]]:
    """The simstack router on a loopback port, ready; yields its URL and pid; stops it (and its engines)."""
    port = free_port()
    # the child imports this checkout's code, whatever the interpreter's installed copy points at
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    engine_args = [arg for pair in ENGINE.items() for arg in pair]
    with (work / "router.log").open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "loadtest.simstack", "--port", str(port), "--data-dir", str(work / "router"),
            "--replicas", str(REPLICAS), *engine_args, stdout=log, stderr=asyncio.subprocess.STDOUT, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            await _wait_ready(url, process, work / "router.log")
            yield url, process.pid
        finally:
            if process.returncode is None:
                process.terminate()  # uvicorn's shutdown runs the lifespan's: the engines stop with it
                try:
                    await asyncio.wait_for(process.wait(), 30)
                except TimeoutError:
                    process.kill()  # the engines' guards see their parent die and stop them
                    await process.wait()


async def _wait_ready(url: str, process: asyncio.subprocess.Process, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while True:
            if process.returncode is not None:
                raise RuntimeError(f"the soak's router exited ({process.returncode}): {log.read_text()[-2000:]}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(f"{url}/readyz") as response:
                    if response.status == 200:
                        return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the soak's router was not ready in {READY_TIMEOUT_S:.0f} s")
            await asyncio.sleep(0.2)  # a process across a socket: nothing to wait on but the next try


async def _measure_capacity(url: str) -> tuple[float, Tally]:
    tally = Tally()
    started = time.monotonic()
    await streamed_load([url], MODEL, capacity_users(), CAPACITY_S, tally)
    return tally.ok / (time.monotonic() - started), tally


async def _idle_footprint(pid: int, url: str) -> dict[str, Any]:
    """A sample with nothing in flight, once idle connections have been closed."""
    await asyncio.sleep(IDLE_SETTLE_S)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        sample = await read_footprint(pid, url, session, 0.0)
    return {name: getattr(sample, name) for name in ("rss_mb", "fds", "threads", "tasks")}


def flatness(fitted: dict[str, Trend]) -> dict[str, bool]:
    """The limits of step 4 in the module's docstring."""
    rss, fds, tasks, threads = fitted["rss_mb"], fitted["fds"], fitted["tasks"], fitted["threads"]
    return {"rss_flat": rss.growth < min(10.0, 0.05 * rss.mean),
            "fds_flat": fds.growth < max(10.0, 0.10 * fds.mean),
            "tasks_flat": tasks.growth < max(10.0, 0.10 * tasks.mean),
            "threads_flat": threads.growth < 2}


async def _soak(load: Load, work: Path) -> Outcome:
    interval_s = sample_interval_s(load.duration_s)
    warmup = warmup_s(load.duration_s)
    samples: list[Sample] = []
    tally = Tally()
    async with router_process(work) as (url, pid):
        capacity, capacity_tally = await _measure_capacity(url)
        rate = LOAD_SHARE * capacity
        idle_before = await _idle_footprint(pid, url)
        stop = asyncio.Event()
        watching = asyncio.create_task(watch(pid, url, interval_s, samples, stop))
        started = time.monotonic()
        late = await open_loop_load([url], MODEL, rate, load.duration_s, tally)
        elapsed = time.monotonic() - started
        stop.set()
        failed_samples = await watching
        idle_after = await _idle_footprint(pid, url)
    fitted = trends(samples, warmup)
    expected = rate * load.duration_s
    checks: dict[str, Any] = {
        "capacity_rps": round(capacity, 1), "rate_rps": round(rate, 1),
        **{name: t.brief() for name, t in fitted.items()},
        **flatness(fitted),
        "errors_zero": tally.failed_clean == 0 and tally.lost == 0,
        # the generator kept its schedule, so the router met the load the row claims
        # at 70% of capacity a refusal means the router judged itself saturated: a miss, like an error
        "nothing_refused": tally.refused == 0,
        # the generator sent the load the row claims (a send late by a few ms changes nothing over minutes)
        "rate_held": abs(tally.sent - expected) <= RATE_TOLERANCE * expected,
        "idle_fds_same": idle_after["fds"] <= idle_before["fds"] + IDLE_SLACK,
        "idle_tasks_same": idle_after["tasks"] <= idle_before["tasks"] + IDLE_SLACK,
        "samples_ok": failed_samples == 0 and len(samples) >= 4,
    }
    details = {"capacity": {"users": capacity_users(), "seconds": CAPACITY_S, "rps": round(capacity, 2),
                            "sent": capacity_tally.sent, "ok": capacity_tally.ok},
               "rate_rps": round(rate, 2), "achieved_rps": round(tally.sent / elapsed, 2), "late_sends": late,
               "engines": {"replicas": REPLICAS, **ENGINE}, "warmup_s": warmup, "interval_s": interval_s,
               "trends": {name: vars(t) for name, t in fitted.items()},
               "idle_before": idle_before, "idle_after": idle_after,
               "samples": [vars(s) for s in samples]}
    fault = (f"none: {rate:.1f} req/s Poisson ({LOAD_SHARE:.0%} of {capacity:.1f} measured) for "
             f"{load.duration_s:.0f} s; footprint fitted after {warmup:.0f} s of warm-up")
    return Outcome(tally, fault, checks, details)


def scenarios() -> list[Scenario]:
    return [Scenario("soak", "70% of capacity, footprint watched from outside", _soak)]
