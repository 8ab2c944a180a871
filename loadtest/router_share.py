"""The router's share of the CPU while it relays streams: what a core kept for it would hold.

    python -m loadtest.router_share               # starts `llmserve up` (its chosen settings), 16 streams
    python -m loadtest.router_share --quick       # CI: 4 streams, a few tokens

CPU seconds of the router process and of the engine's process group are read (``psutil``) before
and after one ``loadtest bench`` run through the router; the share is the router's part of their
sum, and its cost per output token.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from typing import Any

import psutil

from loadtest.cli import BenchConfig, bench
from loadtest.overhead import MODEL, _start_stack
from loadtest.report import emit
from loadtest.runner import Target


def _cpu_s(process: psutil.Process, tree: bool) -> float:
    procs = [process, *process.children(recursive=True)] if tree else [process]
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            continue
    return total


def measure(concurrency: int, requests: int, max_tokens: int) -> dict[str, Any]:
    stack, url = _start_stack()
    try:
        router = psutil.Process(stack.pid)
        engines = [c for c in router.children() if "llmserve.replicas._guard" in " ".join(c.cmdline())]
        target = Target("router", f"{url}/v1", api_key=os.environ.get("LLMSERVE_API_KEY"))
        config = BenchConfig(model=MODEL, requests=requests, concurrency=concurrency, max_tokens=max_tokens,
                             rounds=1, seed=0)
        router_before = _cpu_s(router, tree=False)
        engine_before = sum(_cpu_s(e, tree=True) for e in engines)
        report = asyncio.run(bench([target], config))
        router_s = _cpu_s(router, tree=False) - router_before
        engine_s = sum(_cpu_s(e, tree=True) for e in engines) - engine_before
    finally:
        stack.send_signal(signal.SIGINT)
        stack.wait(timeout=120)
    summary = report["targets"]["router"]
    tokens = summary["total_output_tokens"]
    return {
        "concurrency": concurrency, "requests": requests, "max_tokens": max_tokens,
        "router_cpu_s": round(router_s, 2), "engine_cpu_s": round(engine_s, 2),
        "router_share": round(router_s / (router_s + engine_s), 3) if router_s + engine_s else None,
        "router_cpu_ms_per_output_token": round(1000 * router_s / tokens, 3) if tokens else None,
        "output_tokens_per_s": summary["output_throughput"], "cores": psutil.cpu_count(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.router_share", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", help="also write the JSON here")
    args = parser.parse_args(argv)
    result = measure(4, 8, 8) if args.quick else measure(16, 64, 64)
    emit(result, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
