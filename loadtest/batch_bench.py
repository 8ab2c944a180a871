"""Does a large batch hurt online latency, and does it use the spare capacity? One run, interleaved.

    python -m loadtest.batch_bench [--lines 10000 --window-s 15 --pairs 4 --low-rate 4 --high-rate 24]
    python -m loadtest.batch_bench --tiny          # the tiny configuration a test runs

A router (SQLite store, the Batch API) before one simulated chat engine with a capacity model (``--max-running``
sequences at once, slower as it fills: ``--load-slowdown``). For each online load level (low, high) an
open-loop Poisson load of streamed chat requests runs for ``2 * pairs`` windows of ``window_s``, alternately
without and with a batch: at the start of an "on" window a batch of ``lines`` chat requests (uploaded once)
is created, and at its end cancelled (the next "on" window creates it again). Each window's first
``settle_s`` is left out of the figures on both sides (the batch's window ramping up, a cancel's lines
draining and its files being written), so each side is measured in steady state.

Reported per load level: online TTFT p50 and p99 with the batch off and on and their ratios (goal: on within
10% of off), online errors, and the batch's throughput (lines completed per second of "on" window), and
the ratio of the batch's throughput at low versus high online load (it should use the spare capacity at
low load). Writes ``result.json`` to ``--out-dir`` (``loadtest-results/batch-bench``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from llmserve.batches_settings import BatchesSettings
from llmserve.settings import EngineSettings, RouterSettings
from llmserve.stats import percentile
from loadtest.inprocess import serve_router
from loadtest.overhead import free_port
from loadtest.report import write_json
from loadtest.runner import Record, RunPlan, Target, execute
from loadtest.schedule import Shape, intended_send_times
from loadtest.sim import SimEngineProgram
from loadtest.simstack import StaticVersion, sim_server
from loadtest.workload import LengthDistribution, Workload
from router.store.sqlite import SQLiteStore

MODEL = "chat"
GOAL = 1.10  # online TTFT with the batch on, at most this times the TTFT with it off


def batch_file(lines: int, output_tokens: int) -> bytes:
    return b"".join(json.dumps({"custom_id": f"b{i}", "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": MODEL, "messages": [{"role": "user", "content": f"summarise item {i}"}],
        "max_tokens": output_tokens}}).encode() + b"\n" for i in range(lines))


async def _batch_windows(client: httpx.AsyncClient, file_id: str, args: argparse.Namespace, start: float
                         ) -> list[dict[str, Any]]:
    """Create the batch at each "on" window's start and cancel it at its end; returns each window's batch."""
    loop = asyncio.get_running_loop()
    windows = []
    for index in range(2 * args.pairs):
        begin = start + index * args.window_s
        if index % 2 == 0:  # off
            continue
        await asyncio.sleep(max(0.0, begin - loop.time()))
        created = (await client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                                          "completion_window": "24h"})).json()
        await asyncio.sleep(max(0.0, begin + args.window_s - loop.time()))
        await client.post(f"/v1/batches/{created['id']}/cancel")
        windows.append({"id": created["id"], "window": index})
    for window in windows:  # settled: what each finished
        deadline = time.monotonic() + 120
        while True:
            batch = (await client.get(f"/v1/batches/{window['id']}")).json()
            if batch["status"] in ("cancelled", "completed", "failed", "expired") or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        window["status"] = batch["status"]
        window["completed"] = batch["request_counts"]["completed"]
        window["failed"] = batch["request_counts"]["failed"]
    return windows


def _ttft(records: list[Record], args: argparse.Namespace, on: bool) -> dict[str, Any]:
    mine = [r for r in records if not r.warmup and (int(r.intended_s // args.window_s) % 2 == 1) == on
            and r.intended_s % args.window_s >= args.settle_s]  # odd windows are "on"
    # TTFT from the intended send time: a generator held up by a busy router still counts the wait
    ttft = [(r.first_token_s - r.intended_s) * 1000 for r in mine if r.ok and r.first_token_s is not None]
    return {"requests": len(mine), "errors": sum(not r.ok for r in mine),
            "ttft_p50_ms": round(percentile(ttft, 50), 1) if ttft else None,
            "ttft_p99_ms": round(percentile(ttft, 99), 1) if ttft else None}


def _ratio(on: float | None, off: float | None) -> float | None:
    return round(on / off, 3) if on is not None and off else None


async def _level(url: str, file_id: str, rate: float, args: argparse.Namespace) -> dict[str, Any]:
    duration = 2 * args.pairs * args.window_s
    intended = intended_send_times(Shape("constant", rate), duration, seed=args.seed)
    workload = Workload(source="synthetic", input_length=LengthDistribution("fixed", (16,)),
                        output_length=LengthDistribution("fixed", (args.output_tokens,)), users=200,
                        priorities=["standard"], seed=args.seed)
    plan = RunPlan([Target("router", f"{url}/v1")], MODEL, intended, duration_s=duration, request_timeout_s=60)
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        start = asyncio.get_running_loop().time()
        control = asyncio.create_task(_batch_windows(client, file_id, args, start))
        records, _ = await execute(plan, workload)
        windows = await control
    off, on = _ttft(records, args, on=False), _ttft(records, args, on=True)
    completed = sum(w["completed"] for w in windows)
    return {"online_rate_per_s": rate, "off": off, "on": on,
            "ttft_p50_ratio": _ratio(on["ttft_p50_ms"], off["ttft_p50_ms"]),
            "ttft_p99_ratio": _ratio(on["ttft_p99_ms"], off["ttft_p99_ms"]),
            "batch_lines_completed": completed, "batch_lines_failed": sum(w["failed"] for w in windows),
            "batch_lines_per_s": round(completed / (len(windows) * args.window_s), 1) if windows else None,
            "batch_windows": windows}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    engine = SimEngineProgram(MODEL, "v1", ttft_ms=args.ttft_ms, itl_ms=args.itl_ms, extra_args=(
        "--max-running", str(args.max_running), "--load-slowdown", str(args.load_slowdown), "--jitter-cv", "0.2"))
    port = free_port()
    batches = BatchesSettings(max_concurrency=args.batch_concurrency, scan_interval_s=0.5, progress_interval_s=0.5,
                              max_lines=max(args.lines, 1), max_file_bytes=max(1 << 20, 400 * args.lines))
    settings = RouterSettings(port=port, batches=batches)
    report: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k not in ("out_dir",)},
        "engine": {"model": MODEL, "ttft_ms": args.ttft_ms, "itl_ms": args.itl_ms, "max_running": args.max_running,
                   "load_slowdown": args.load_slowdown, "replicas": 1},
        "goal": f"online TTFT p50 and p99 with the batch on within {round((GOAL - 1) * 100)}% of off"}
    with tempfile.TemporaryDirectory(prefix="batch-bench-") as tmp:
        server = sim_server(Path(tmp), [StaticVersion(engine, 4096)], settings,
                            EngineSettings(first_port=free_port(), health_interval_s=1.0),
                            store=SQLiteStore(Path(tmp) / "llmserve.db"))
        async with serve_router(server.app, port, server.backend) as url:
            async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                uploaded = await client.post("/v1/files", data={"purpose": "batch"}, files={
                    "file": ("batch.jsonl", batch_file(args.lines, args.output_tokens))})
                uploaded.raise_for_status()
                file_id = uploaded.json()["id"]
            for name, rate in (("low", args.low_rate), ("high", args.high_rate)):
                report[name] = await _level(url, file_id, rate, args)
                print(f"{name}: {json.dumps({k: v for k, v in report[name].items() if k != 'batch_windows'})}",
                      file=sys.stderr)
    low, high = report["low"], report["high"]
    report["batch_throughput_low_over_high"] = _ratio(low["batch_lines_per_s"], high["batch_lines_per_s"])
    ratios = [level[k] for level in (low, high) for k in ("ttft_p50_ratio", "ttft_p99_ratio")]
    report["goal_met"] = all(r is not None and r <= GOAL for r in ratios)
    return report


def table(report: dict[str, Any]) -> str:
    rows = ["| online load | batch | requests | errors | TTFT p50 ms | TTFT p99 ms | batch lines/s |",
            "|---|---|---|---|---|---|---|"]
    for name in ("low", "high"):
        level = report[name]
        for side in ("off", "on"):
            s = level[side]
            rows.append(f"| {name} ({level['online_rate_per_s']:g} req/s) | {side} | {s['requests']} | {s['errors']} "
                        f"| {s['ttft_p50_ms']} | {s['ttft_p99_ms']} | "
                        f"{level['batch_lines_per_s'] if side == 'on' else '-'} |")
        rows.append(f"| {name}: on / off | | | | {level['ttft_p50_ratio']} | {level['ttft_p99_ratio']} | |")
    rows.append(f"\nbatch throughput, low / high online load: {report['batch_throughput_low_over_high']}; "
                f"goal (TTFT on within 10% of off, p50 and p99, both loads): "
                f"{'met' if report['goal_met'] else 'MISSED'}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.batch_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=10_000, help="lines of the batch (each 'on' window runs it)")
    parser.add_argument("--window-s", type=float, default=15.0, help="each on or off window")
    parser.add_argument("--pairs", type=int, default=4, help="off/on window pairs per load level")
    parser.add_argument("--settle-s", type=float, default=3.0, help="left out at each window's start")
    parser.add_argument("--low-rate", type=float, default=4.0, help="online requests/s, low load")
    parser.add_argument("--high-rate", type=float, default=24.0, help="online requests/s, high load")
    parser.add_argument("--output-tokens", type=int, default=16)
    parser.add_argument("--ttft-ms", type=float, default=40.0)
    parser.add_argument("--itl-ms", type=float, default=8.0)
    parser.add_argument("--max-running", type=int, default=64)
    parser.add_argument("--load-slowdown", type=float, default=0.5)
    parser.add_argument("--batch-concurrency", type=int, default=32, help="batches.max_concurrency")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="the tiny configuration (a test runs it)")
    parser.add_argument("--out-dir", type=Path, default=Path("loadtest-results/batch-bench"))
    args = parser.parse_args(argv)
    if args.tiny:
        args.lines, args.window_s, args.pairs, args.settle_s = 400, 1.5, 1, 0.3
        args.low_rate, args.high_rate = 4.0, 12.0
    report = asyncio.run(run(args))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_json(args.out_dir / "result.json", report)
    print(table(report))
    print(f"wrote {args.out_dir / 'result.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
