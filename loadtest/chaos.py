"""Faults under a steady streamed load, and what every client saw: ``python -m loadtest.chaos``.

Each scenario starts a router over simulated engines (``loadtest.simstack``),
runs ``users`` closed-loop streaming chat clients for ``duration_s`` (the load
runner's own ``send``), injects its fault part way, and classifies every request:

- ``ok``: a complete stream (``[DONE]``) with text;
- ``refused``: a graceful no: 429/503 with ``Retry-After``, or a fallback answer;
- ``failed_clean``: the stream ended with an in-band error event (the status
  line was long gone), or a 5xx with an error body: a clear answer;
- ``lost``: no clear answer: a dropped connection, a cut stream without an
  error event, or a client-side timeout (a hang).

``longest_stall_ms`` is the longest silence a client saw (to the first byte,
or between two chunks). The goal in every scenario: nothing ``lost``, no stall
past the router's time-outs, and the fault's replica back in rotation by the end.

Scenarios so far (issue 14 lists more: Redis outage, router restarts mid-rollout,
a full disk, client misbehaviour, a soak):

- ``replica_kill``: two replicas; one is SIGKILLed under load; requests not yet
  answering are retried on the other; streams in flight on it end with an error event;
  the supervisor restarts it.
- ``hung_replica``: two replicas, one accepts and never answers; the first-token
  time-out moves those requests to the healthy one before the client gets anything.
- ``slow_replica``: two replicas, one ten times slower; least-outstanding routing
  sends it less, nothing fails.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from llmserve.replicas.local import LocalBackend
from llmserve.replicas.spec import EngineSpec
from llmserve.server import build
from llmserve.settings import EngineSettings, RouterSettings, Settings
from loadtest.inprocess import serve_router
from loadtest.overhead import free_port
from loadtest.runner import Record, Target, send
from loadtest.sim import SimEngineProgram
from loadtest.workload import RequestSpec

MODEL = "chat"
CLIENT_TIMEOUT_S = 30.0


@dataclass
class Tally:
    sent: int = 0
    ok: int = 0
    refused: int = 0
    failed_clean: int = 0
    lost: int = 0
    longest_stall_ms: float = 0.0
    examples: list[str] = field(default_factory=list)

    def add(self, record: Record) -> None:
        """Classify one request by what its client saw (``runner.send`` filled the record in)."""
        outcome = outcome_of(record)
        self.sent += 1
        setattr(self, outcome, getattr(self, outcome) + 1)
        self.longest_stall_ms = max(self.longest_stall_ms, stall_s(record) * 1000)
        if outcome == "lost" and len(self.examples) < 5:
            self.examples.append(record.error or f"status {record.status}, no [DONE]")


def outcome_of(record: Record) -> str:
    if record.status in (429, 503) and record.retry_after:
        return "refused"
    if record.status != 200:
        return "failed_clean" if record.status >= 500 else "lost"
    if record.error_event:
        return "failed_clean"
    return "ok" if record.ok and record.complete else "lost"


def stall_s(record: Record) -> float:
    """The longest silence the client saw: to the first token, between two, or after the last one."""
    end = record.done_s if record.done_s is not None else record.sent_s
    if record.first_token_s is None:
        return end - record.sent_s
    last_token = record.first_token_s + sum(record.itl_s)
    return max(record.first_token_s - record.sent_s, *record.itl_s, end - last_token)


async def _load(url: str, users: int, duration_s: float, tally: Tally) -> None:
    stop = time.monotonic() + duration_s
    target = Target("router", f"{url}/v1")

    async def user(index: int) -> None:
        spec = RequestSpec(messages=[{"role": "user", "content": "Tell me about lighthouses."}], prompt=None,
                           max_tokens=24, user=f"user-{index}", priority=None)
        while time.monotonic() < stop:
            record = Record(index, target.name, 0.0, time.monotonic())
            await send(session, target, MODEL, spec, record, time.monotonic)
            tally.add(record)

    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(user(i) for i in range(users)))


Fault = Callable[[LocalBackend], Awaitable[str]]


async def _kill_one(backend: LocalBackend) -> str:
    victim = backend.process(backend.endpoints()[0])
    assert victim.pid is not None
    os.killpg(victim.pid, signal.SIGKILL)
    await asyncio.sleep(0.5)
    await backend.supervisor.wait_ready(victim, timeout=30)
    return f"killed {victim.id}; it was restarted ({victim.restarts} restart) and ready again"


async def _nothing(backend: LocalBackend) -> str:
    return "fault present from the start"


@dataclass(frozen=True)
class Scenario:
    name: str
    programs: tuple[SimEngineProgram, ...]
    fault: Fault
    router: dict[str, Any] = field(default_factory=dict)


def scenarios() -> list[Scenario]:
    fast = SimEngineProgram(MODEL, "v1", ttft_ms=20, itl_ms=5)
    return [
        Scenario("replica_kill", (fast, fast), _kill_one),
        Scenario("hung_replica", (fast, SimEngineProgram(MODEL, "v1", ttft_ms=20, itl_ms=5,
                                                          extra_args=("--hang-rate", "1.0"))),
                 _nothing, {"first_token_timeout_s": 1.0}),
        Scenario("slow_replica", (fast, SimEngineProgram(MODEL, "v1", ttft_ms=200, itl_ms=50)), _nothing),
    ]


async def run_scenario(scenario: Scenario, users: int, duration_s: float, work: Path) -> dict[str, Any]:
    # one replica of each program; which replica gets which does not matter to the scenario
    programs = itertools.cycle(scenario.programs)
    port = free_port()
    data = work / scenario.name
    settings = Settings(data_dir=data, router=RouterSettings(port=port, retry_after_s=1, **scenario.router),
                        engine=EngineSettings(first_port=free_port(), health_interval_s=0.5, ready_timeout_s=30,
                                              restart_backoff_initial_s=0.2, drain_timeout_s=2, stop_timeout_s=3,
                                              health_failures_to_eject=1))
    backend = LocalBackend(settings.engine, data / "logs", program=lambda spec: next(programs))
    spec = EngineSpec(model_dir=data, model_name=MODEL, version="v1")
    server = build(settings, backend=backend, store=None, static=[(spec, len(scenario.programs))])
    tally = Tally()
    started = time.monotonic()
    async with serve_router(server.app, port, backend) as url:
        load = asyncio.create_task(_load(url, users, duration_s, tally))
        await asyncio.sleep(duration_s / 3)
        what = await scenario.fault(backend)
        await load
    return {"scenario": scenario.name, "fault": what, **asdict(tally),
            "lost_examples": tally.examples, "wall_s": round(time.monotonic() - started, 1)}


def table(results: list[dict[str, Any]]) -> str:
    rows = ["| scenario | sent | ok | refused | failed (clean error) | lost | longest stall |",
            "|---|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r['scenario']} | {r['sent']} | {r['ok']} | {r['refused']} | {r['failed_clean']} | "
                    f"{r['lost']} | {r['longest_stall_ms']:.0f} ms |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.chaos", description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--duration-s", type=float, default=20.0)
    parser.add_argument("--only", default="", help="comma-separated scenario names")
    parser.add_argument("--output", help="also write the JSON here")
    args = parser.parse_args(argv)
    chosen = [s for s in scenarios() if not args.only or s.name in args.only.split(",")]
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        results = [asyncio.run(run_scenario(s, args.users, args.duration_s, Path(tmp))) for s in chosen]
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))
    print(table(results))
    print(json.dumps(results, indent=2), file=sys.stderr)
    return 1 if any(r["lost"] for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
