"""Shedding under a traffic spike: the same spike with admission control off and on, in one run.

    python -m loadtest.shedding_bench [--base-rate 20 --spike-factor 3 --spike-s 60]
    python -m loadtest.shedding_bench --quick          # the tiny configuration CI runs

Each run starts a router before two simulated engines with a capacity model
(the full model: 8 sequences at once, slower when full; its distilled
fallback: faster, 32 at once) and sends an open-loop Poisson load: a base
rate the full model holds, then ``spike_factor`` times it for ``spike_s``,
then the base again. Requests are 20% critical, 60% standard, 20% batch
(``X-Priority``). Per class it reports TTFT p50/p99 (during the spike and
overall), the share answered by the full model, by the fallback, refused
with 429 (and whether every refusal carried Retry-After), 5xx, and goodput
(answers with TTFT under the SLO per second).
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

from llmserve.settings import AdmissionSettings, EngineSettings, RouterSettings
from llmserve.stats import percentile
from loadtest.inprocess import serve_router
from loadtest.overhead import free_port
from loadtest.report import emit
from loadtest.runner import Record, RunPlan, Target, execute
from loadtest.schedule import Shape, intended_send_times
from loadtest.sim import SimEngineProgram
from loadtest.simstack import StaticVersion, sim_server
from loadtest.workload import LengthDistribution, Workload

MODEL, FALLBACK = "chat", "chat-student"
MIX = ["critical", "standard", "standard", "standard", "batch"]  # 20 / 60 / 20


@contextlib.asynccontextmanager
async def _router(tmp: Path, shedding: bool) -> AsyncIterator[str]:
    port = free_port()
    full = SimEngineProgram(MODEL, "v1", ttft_ms=40, itl_ms=10,
                            extra_args=("--max-running", "8", "--load-slowdown", "0.5", "--jitter-cv", "0.2"))
    small = SimEngineProgram(FALLBACK, "v1", ttft_ms=15, itl_ms=4,
                             extra_args=("--max-running", "32", "--jitter-cv", "0.2"))
    settings = RouterSettings(port=port, admission=AdmissionSettings(
        enabled=shedding, fallbacks={MODEL: FALLBACK}, max_outstanding_per_replica=10, min_hold_s=1.0,
        queue_wait_s=1.0))
    server = sim_server(tmp / f"run-{port}", [StaticVersion(full, 2048), StaticVersion(small, 2048)], settings,
                        EngineSettings(first_port=free_port(), health_interval_s=1.0))
    async with serve_router(server.app, port, server.backend) as url:
        yield url


def summarize(records: list[Record], spike: tuple[float, float], slo_ms: float, duration_s: float
              ) -> dict[str, Any]:
    by_class: dict[str, Any] = {}
    for priority in ("critical", "standard", "batch"):
        mine = [r for r in records if r.priority == priority and not r.warmup]
        answered = [r for r in mine if r.ok]
        in_spike = [r for r in answered if spike[0] <= r.intended_s < spike[1]]
        ttft = [r.ttft_ms for r in answered if r.ttft_ms is not None]
        spike_ttft = [r.ttft_ms for r in in_spike if r.ttft_ms is not None]
        # TTFT from the intended send time: a generator held up by a slow server still counts the wait
        good = [r for r in answered if r.first_token_s is not None
                and (r.first_token_s - r.intended_s) * 1000 <= slo_ms]
        refused = [r for r in mine if r.status == 429]
        n = max(len(mine), 1)
        by_class[priority] = {
            "requests": len(mine),
            "ttft_p50_ms": round(percentile(ttft, 50), 1) if ttft else None,
            "ttft_p99_ms": round(percentile(ttft, 99), 1) if ttft else None,
            "spike_ttft_p99_ms": round(percentile(spike_ttft, 99), 1) if spike_ttft else None,
            "share_full_model": round(sum(r.ok and not r.fallback for r in mine) / n, 3),
            "share_fallback": round(sum(r.ok and bool(r.fallback) for r in mine) / n, 3),
            "share_429": round(len(refused) / n, 3),
            "refusals_with_retry_after": sum(r.retry_after is not None for r in refused),
            "status_5xx": sum(r.status >= 500 for r in mine),
            "other_failures": sum(not r.ok and r.status < 500 and r.status != 429 for r in mine),
            "goodput_per_s": round(len(good) / duration_s, 2),
        }
    return by_class


async def run(args: argparse.Namespace) -> dict[str, Any]:
    duration = args.before_s + args.spike_s + args.after_s
    shape = Shape("spike", args.base_rate, spike_factor=args.spike_factor, spike_start_s=args.before_s,
                  spike_duration_s=args.spike_s)
    intended = intended_send_times(shape, duration, seed=args.seed)
    report: dict[str, Any] = {"base_rate_per_s": args.base_rate, "spike_factor": args.spike_factor,
                              "spike_s": args.spike_s, "duration_s": duration, "requests": len(intended),
                              "slo_ttft_ms": args.slo_ms, "mix": "20% critical, 60% standard, 20% batch"}
    with tempfile.TemporaryDirectory() as tmp:
        for shedding in (False, True):
            async with _router(Path(tmp), shedding) as url:
                workload = Workload(source="synthetic", input_length=LengthDistribution("fixed", (16,)),
                                    output_length=LengthDistribution("fixed", (args.output_tokens,)),
                                    users=500, priorities=MIX, seed=args.seed)
                plan = RunPlan([Target("router", f"{url}/v1")], MODEL, intended, duration_s=duration,
                               request_timeout_s=120)
                records, measured = await execute(plan, workload)
                name = "shedding_on" if shedding else "shedding_off"
                report[name] = summarize(records, (args.before_s, args.before_s + args.spike_s), args.slo_ms,
                                         measured)
                print(f"{name}: {json.dumps(report[name])}", file=sys.stderr)
    off, on = report["shedding_off"]["standard"], report["shedding_on"]["standard"]
    report["standard_goodput_ratio"] = round(on["goodput_per_s"] / off["goodput_per_s"], 2) \
        if off["goodput_per_s"] else None
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.shedding_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--base-rate", type=float, default=20.0, help="requests/s the full model holds")
    parser.add_argument("--spike-factor", type=float, default=3.0)
    parser.add_argument("--before-s", type=float, default=20.0)
    parser.add_argument("--spike-s", type=float, default=60.0)
    parser.add_argument("--after-s", type=float, default=20.0)
    parser.add_argument("--output-tokens", type=int, default=16)
    parser.add_argument("--slo-ms", type=float, default=500.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny configuration (CI)")
    parser.add_argument("--output", help="also write the JSON report here")
    args = parser.parse_args(argv)
    if args.quick:
        args.before_s, args.spike_s, args.after_s = 1.0, 3.0, 1.0
    report = asyncio.run(run(args))
    emit(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
