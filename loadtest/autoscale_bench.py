"""Autoscaling on a compressed day: does it keep the SLO of the maximum for much less than its cost?

    python -m loadtest.autoscale_bench [--output docs/autoscale_bench.json --plot docs/autoscale_bench.png]
    python -m loadtest.autoscale_bench --quick       # the short configuration CI runs

Three runs, one after the other, on the same seeded arrivals (``autoscale_trace``:
low, a ramp to 6x, a plateau, down, low, a 3x spike, low), each with a fresh
router and SQLite store in a temp folder and the version deployed through
``POST /api/v1/deployments``:

- ``autoscaled``: a policy from ``min_replicas`` (1) to ``max_replicas`` (4),
  the design's delays compressed (``Compression``), starting on one replica;
- ``fixed_min``: one replica all day; ``fixed_max``: four all day.

The engines are simulated (``loadtest.sim``) with a capacity model so that one
replica really saturates: 8 sequences at once, twice as slow when full (TTFT
50 ms, 20 ms a token unloaded, jitter CV 0.2) and a start time compressed with
the delays (90 s real). The low phase fits on one replica with room, the plateau
needs about four. Requests are streamed chats of 32 tokens; TTFT and TPOT are
measured by the client. Admission control (load shedding) is on, as a
deployment would run it: a saturated version makes requests wait (at most
2 s) and then refuses them with 429 and Retry-After rather than queueing
without bound (a refusal is a miss). Its memory is compressed like the
autoscaler's delays: the TTFT window (10 s) and the minimum saturated hold
(2 s) are divided by the factor, the window floored at 1 s. With its real-time
defaults (``--admission default``) a version pushed into saturation by the
ramp stays saturated at a load it served before (the hold collects waiters,
their release saturates it again), which measures that, not the autoscaler.

A fourth, short scenario (``cold_start``) deploys with ``min_replicas`` 0, waits
for the scale to zero and sends a burst at the low rate: every request is held
while the first replica starts, and the router's ``llmserve_cold_start_wait_seconds``
says how many and how long. Scoring: ``autoscale_score``; the table, goals and
plot: ``autoscale_report``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp

from llmserve.replicas.backend import EndpointState
from llmserve.replicas.local import LocalBackend
from llmserve.replicas.spec import EngineSpec
from llmserve.settings import AdmissionSettings, AutoscaleSettings, EngineSettings, RouterSettings
from loadtest.autoscale_report import finish, machine
from loadtest.autoscale_score import Objective, Sample, cold_start_holds, cpu_times, summarize
from loadtest.autoscale_trace import FULL_DURATIONS, QUICK_DURATIONS, Compression, Phase, Trace, day_trace
from loadtest.chaos.tally import OPEN_LOOP_KEEPALIVE_S
from loadtest.inprocess import serve_router
from loadtest.overhead import free_port
from loadtest.report import emit
from loadtest.runner import Record, Target, send
from loadtest.sim import SimEngineProgram
from loadtest.simstack import sim_model_folder, sim_server
from loadtest.workload import RequestSpec
from router.store.sqlite import SQLiteStore

MODEL = "chat"
REQUEST_TIMEOUT_S = 60.0
SAMPLE_EVERY_S = 0.5


@dataclass(frozen=True)
class EngineModel:
    """One simulated replica's capacity: what makes one saturate like a real engine."""

    ttft_ms: float = 50.0
    itl_ms: float = 20.0
    max_running: int = 8
    load_slowdown: float = 1.0
    jitter_cv: float = 0.2


@dataclass(frozen=True)
class Config:
    trace: Trace
    compression: Compression
    min_replicas: int = 1
    max_replicas: int = 4
    target_in_flight: float = 6.0  # 75% of the engine's 8 sequences: full is twice as slow
    max_queue: int = 16  # two replicas' worth of sequences waiting: up at once (panic)
    seed: int = 0
    max_tokens: int = 32
    slo: Objective = field(default_factory=Objective)
    engine: EngineModel = field(default_factory=EngineModel)
    loop_interval_s: float = 0.25  # the autoscaler's period (5 s by default, compressed to 0.17, rounded up)
    # its latency window (60 s by default): under up_delay_s, as the default is, so that one slow request
    # (with min_samples 20 the window's p99 is its maximum) cannot hold the latency signal hot long enough
    # to scale up by itself; 20 samples need 7 requests/s, so at the low rate latency does not count
    window_s: float = 3.0
    cold_burst_s: float = 6.0  # the cold-start scenario's burst at the low rate
    admission_mode: str = "compressed"  # compressed | default | off (``admission``)

    def policy(self, min_replicas: int) -> dict[str, Any]:
        return self.compression.policy(min_replicas, self.max_replicas, self.target_in_flight, self.max_queue)

    def admission(self) -> AdmissionSettings:
        """Load shedding on, its memory compressed like the autoscaler's delays (see the module's docstring)."""
        if self.admission_mode == "off":
            return AdmissionSettings(enabled=False)
        defaults = AdmissionSettings()
        if self.admission_mode == "default":
            return defaults
        # the TTFT window keeps a floor of 1 s: its p90 needs 10 samples, about 1 s at the plateau's rate
        return AdmissionSettings(ttft_window_s=max(1.0, self.compression.scaled(defaults.ttft_window_s)),
                                 min_hold_s=self.compression.scaled(defaults.min_hold_s))

    def describe(self) -> dict[str, Any]:
        """What was run, for the report."""
        c = self.compression
        shedding = self.admission().model_dump(include={"enabled", "max_outstanding_per_replica", "max_engine_waiting",
                                                        "ttft_slo_ms", "ttft_window_s", "min_hold_s", "queue_wait_s"})
        return {
            "seed": self.seed,
            "trace": self.trace.to_dict(),
            "compression": {"factor": c.factor, "engine_start_s": round(c.engine_start_s, 3),
                            "steady_window_s": round(c.steady_window_s, 3),
                            "meaning": f"the policy's delays, the engine's start (90 s), the admission's TTFT window "
                                       f"and hold, and the goal's 10 minutes are divided by {c.factor:g}"},
            "policy": self.policy(self.min_replicas),
            "router": {"autoscale_interval_s": self.loop_interval_s, "autoscale_window_s": self.window_s,
                       "engine_metrics_interval_s": 0.5, "admission_mode": self.admission_mode,
                       "admission": shedding},
            "engine": {**asdict(self.engine), "max_tokens": self.max_tokens,
                       "start_s": f"{c.engine_start_s:.2f} + the process's own start"},
            "slo": {"ttft_ms": self.slo.ttft_ms, "tpot_ms": self.slo.tpot_ms, "ttft_from": "the intended send time"},
        }


@contextlib.asynccontextmanager
async def _stack(tmp: Path, config: Config) -> AsyncIterator[str]:
    """A router with a SQLite store over simulated engines; every replica stopped when it ends."""
    engine = config.engine

    def program(spec: EngineSpec) -> SimEngineProgram:
        return SimEngineProgram(spec.model_name, spec.version, ttft_ms=engine.ttft_ms, itl_ms=engine.itl_ms,
                                extra_args=("--max-running", str(engine.max_running), "--load-slowdown",
                                            str(engine.load_slowdown), "--jitter-cv", str(engine.jitter_cv),
                                            "--slow-start-s", f"{config.compression.engine_start_s:.3f}",
                                            "--seed", str(config.seed)))

    sim_model_folder(tmp / "models", MODEL, "v1", "autoscale bench")
    port = free_port()
    settings = RouterSettings(port=port, retry_after_s=1, engine_metrics_interval_s=0.5, admission=config.admission(),
                              autoscale=AutoscaleSettings(
        interval_s=config.loop_interval_s, window_s=config.window_s, keepalive_s=1.0, hold_timeout_s=60.0))
    # max_num_seqs = the engine's own limit, so the autoscaler's utilisation (running / max_num_seqs) is true
    engines = EngineSettings(first_port=free_port(), max_num_seqs=engine.max_running, health_interval_s=1.0,
                             stop_timeout_s=5.0, drain_timeout_s=15.0, ready_timeout_s=60.0)
    server = sim_server(tmp, (), settings, engines, store=SQLiteStore(tmp / "db.sqlite"), program=program,
                        models_dir=tmp / "models")
    backend = server.backend
    try:
        async with serve_router(server.app, port, backend, wait_replicas=False, router=settings) as url:
            yield url
    finally:
        if isinstance(backend, LocalBackend):
            leftover = [r.id for r in backend.supervisor.replicas if r.state is not EndpointState.STOPPED]
            if leftover:
                raise RuntimeError(f"replicas left running after the run: {leftover}")


async def _view(api: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with api.get(f"{url}/api/v1/deployments/{MODEL}/autoscaling") as response:
        body: dict[str, Any] = await response.json()
    versions = body["versions"]
    return versions[0] if versions else {"live_replicas": 0, "ready_replicas": 0, "decisions": []}


async def _until(api: aiohttp.ClientSession, url: str, what: str, ok: Any, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(aiohttp.ClientError, KeyError):
            if ok(await _view(api, url)):
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def _deploy(api: aiohttp.ClientSession, url: str, replicas: int, policy: dict[str, Any] | None) -> None:
    async with api.post(f"{url}/api/v1/models", json={"model_name": MODEL}) as response:
        if response.status != 201:
            raise RuntimeError(f"registering {MODEL}: {response.status} {await response.text()}")
    body: dict[str, Any] = {"model_name": MODEL, "version": "v1", "traffic_percent": 100,
                            "resources": {"replicas": replicas}}
    if policy is not None:
        body["autoscaling"] = policy
    async with api.post(f"{url}/api/v1/deployments", json=body) as response:
        if response.status != 202:
            raise RuntimeError(f"deploying {MODEL}:v1: {response.status} {await response.text()}")
    await _until(api, url, f"{replicas} ready replicas",
                 lambda v: v["ready_replicas"] == replicas and v["live_replicas"] == replicas)


async def _sample(api: aiohttp.ClientSession, url: str, clock: Any, wall0: float, samples: list[Sample],
                  decisions: dict[tuple[float, int, int], dict[str, Any]], stop: asyncio.Event) -> None:
    """Every half second: the live and ready replicas, any new decisions (the API keeps the last 50), the CPU."""
    last = cpu_times()
    while True:
        with contextlib.suppress(aiohttp.ClientError, KeyError, asyncio.TimeoutError):
            view = await _view(api, url)
            now = cpu_times()
            busy = None if now is None or last is None or now[1] <= last[1] else \
                (now[0] - last[0]) / (now[1] - last[1])
            last = now
            samples.append(Sample(clock(), view["live_replicas"], view["ready_replicas"], busy))
            for d in view["decisions"]:
                if d.get("action") == "autoscale":
                    decisions.setdefault((d["at"], d["from"], d["to"]), {**d, "t": d["at"] - wall0})
        if stop.is_set():
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), SAMPLE_EVERY_S)


async def _send_all(url: str, intended: list[float], config: Config, clock: Any) -> list[Record]:
    """Open loop: each request at its intended time as its own task, whatever the others are doing."""
    target = Target("router", f"{url}/v1", api_key=None)
    records: list[Record] = []
    tasks: list[asyncio.Task[None]] = []
    # keep-alive under uvicorn's 5 s, so an idle pooled connection is not reused as the server closes it
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=OPEN_LOOP_KEEPALIVE_S)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
                                     trust_env=False) as session:
        for index, offset in enumerate(intended):
            delay = offset - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            now = clock()
            spec = RequestSpec([{"role": "user", "content": "Summarise the day's news."}], None, config.max_tokens,
                               f"user-{index % 500}", None)
            record = Record(index, "router", intended_s=offset, sent_s=now, generator_lag_s=max(0.0, now - offset))
            records.append(record)
            tasks.append(asyncio.create_task(send(session, target, MODEL, spec, record, clock)))
        if tasks:
            await asyncio.wait(tasks, timeout=REQUEST_TIMEOUT_S + 5)
        for task in tasks:
            task.cancel()
    return records


async def _metrics(api: aiohttp.ClientSession, url: str) -> str:
    async with api.get(f"{url}/metrics") as response:
        return await response.text()


async def run_one(name: str, config: Config, tmp: Path, replicas: int, policy: dict[str, Any] | None,
                  trace: Trace, wait_for_zero: bool = False) -> dict[str, Any]:
    """One run: fresh router and store, deploy, wait until ready, send the trace, score what was seen."""
    work = tmp / name
    work.mkdir(parents=True)
    async with _stack(work, config) as url, aiohttp.ClientSession(trust_env=False) as api:
        await _deploy(api, url, replicas, policy)
        if wait_for_zero:
            await _until(api, url, "the scale to zero", lambda v: v["live_replicas"] == 0,
                         timeout_s=config.compression.scaled(300) * 3 + 30)
        loop = asyncio.get_running_loop()
        start, wall0 = loop.time(), time.time()

        def clock() -> float:
            return loop.time() - start

        samples: list[Sample] = []
        decisions: dict[tuple[float, int, int], dict[str, Any]] = {}
        stop = asyncio.Event()
        sampler = asyncio.create_task(_sample(api, url, clock, wall0, samples, decisions, stop))
        records = await _send_all(url, trace.arrivals(config.seed), config, clock)
        stop.set()
        await sampler
        cold = cold_start_holds(await _metrics(api, url), MODEL)
    summary = summarize(records, samples, list(decisions.values()), trace, config.compression, config.slo, cold)
    print(f"{name}: attainment {summary['slo_attainment']:.4f}, replica-s {summary['replica_seconds']:.0f}, "
          f"changes {summary['direction_changes']}, failed {summary['failed']}, lost {summary['lost']}",
          file=sys.stderr)
    return summary


async def run(config: Config) -> dict[str, Any]:
    load_before = os.getloadavg()
    runs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="autoscale-bench-") as tmp:
        work = Path(tmp)
        runs["autoscaled"] = await run_one("autoscaled", config, work, config.min_replicas,
                                           config.policy(config.min_replicas), config.trace)
        runs["fixed_min"] = await run_one("fixed_min", config, work, config.min_replicas, None, config.trace)
        runs["fixed_max"] = await run_one("fixed_max", config, work, config.max_replicas, None, config.trace)
        burst = Trace((Phase("burst", config.cold_burst_s, 1.0, 1.0, False),), config.trace.base_rate)
        cold = await run_one("cold_start", config, work, 1, config.policy(0), burst, wait_for_zero=True)
    return finish(config.describe(), runs, cold, machine(load_before))


def _config(args: argparse.Namespace) -> Config:
    durations = QUICK_DURATIONS if args.quick else FULL_DURATIONS
    trace = day_trace(args.base_rate, durations)
    compression = Compression(args.compression or (120.0 if args.quick else 30.0))
    config = Config(trace, compression, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                    seed=args.seed, admission_mode=args.admission)
    if args.quick:  # a shorter burst and loop period: the whole quick run is ~20 s of trace
        config = replace(config, cold_burst_s=3.0, loop_interval_s=0.2)
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.autoscale_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the short configuration (CI): 20 s of trace a run")
    parser.add_argument("--base-rate", type=float, default=3.0, help="requests/s at 1x (the low phase)")
    parser.add_argument("--min-replicas", type=int, default=1, help="the autoscaled run's minimum (0: from zero)")
    parser.add_argument("--max-replicas", type=int, default=4, help="the autoscaled run's maximum = fixed_max")
    parser.add_argument("--compression", type=float, default=None,
                        help="real seconds per benchmark second for the delays and start time (30; --quick 120)")
    parser.add_argument("--admission", choices=("compressed", "default", "off"), default="compressed",
                        help="load shedding: on with its TTFT window and hold compressed (default), on with its "
                        "real-time defaults, or off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="also write the JSON report here")
    parser.add_argument("--plot", help="the PNG of replicas and load over time (default: next to --output; "
                        "without --output, docs/autoscale_bench.png unless --quick)")
    args = parser.parse_args(argv)
    if not 0 <= args.min_replicas <= args.max_replicas:
        parser.error("need 0 <= --min-replicas <= --max-replicas")
    plot = args.plot or (str(Path(args.output).with_suffix(".png")) if args.output
                         else None if args.quick else "docs/autoscale_bench.png")
    config = _config(args)
    report = asyncio.run(run(config))
    from loadtest.autoscale_report import draw, table

    report["plot"] = draw(report, plot) if plot else None
    print(table(report), file=sys.stderr)
    emit(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
