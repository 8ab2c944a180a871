"""The router's overhead: the same engine addressed directly and through the router.

    python -m loadtest.overhead                 # starts `llmserve up` itself, then stops it
    python -m loadtest.overhead --router URL    # measures a running stack
    python -m loadtest.overhead --quick         # the tiny configuration CI runs

The direct address is the router's first ready replica (from
``/api/v1/replicas``). Each scenario interleaves the two targets in rounds
(``loadtest.cli.bench``, as ``python -m loadtest bench`` does) and reports
added TTFT (p50, p99), added ITL p50 and the router's output throughput as a
fraction of direct; single-stream and 32-concurrent tokens/s come from the
same runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import httpx

from loadtest.cli import BenchConfig, bench
from loadtest.report import emit
from loadtest.runner import Target

MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class Scenario:
    name: str
    concurrency: int
    requests: int
    max_tokens: int
    rounds: int


# TTFT differences of a few ms hide in the engine's own jitter, so the TTFT
# scenario buys many samples with short outputs; the others measure tokens/s.
FULL = (
    Scenario("ttft (single stream, 2 tokens)", 1, 200, 2, 20),
    Scenario("single-stream", 1, 24, 128, 6),
    Scenario("32-concurrent", 32, 128, 128, 4),
)
QUICK = (Scenario("single-stream", 1, 4, 8, 2), Scenario("4-concurrent", 4, 8, 8, 2))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_stack() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    # the stack's admin key, for this process's load clients too (runner.Target reads LLMSERVE_API_KEY)
    key = os.environ.setdefault("LLMSERVE_API_KEY", f"sk-ls-{secrets.token_urlsafe(32)}")
    process = subprocess.Popen(
        [sys.executable, "-m", "llmserve.cli", "up", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "LLMSERVE_ADMIN_KEY": key},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"llmserve up exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    raise SystemExit("the stack did not become ready within 900 s")


def direct_url(router_url: str, api_key: str | None = None) -> str:
    headers = Target("router", router_url, api_key=api_key or os.environ.get("LLMSERVE_API_KEY")).headers()
    replicas = httpx.get(f"{router_url}/api/v1/replicas", timeout=5, headers=headers).json()["replicas"]
    ready = [r for r in replicas if r["state"] == "ready"]
    if not ready:
        raise SystemExit("no ready replica to address directly")
    return str(ready[0]["url"])


def measure(router_url: str, scenarios: tuple[Scenario, ...], model: str = MODEL, api_key: str | None = None
            ) -> dict[str, Any]:
    """``api_key``: the router's (default: LLMSERVE_API_KEY)."""
    engine = direct_url(router_url, api_key)
    router = Target("router", f"{router_url}/v1", api_key=api_key or os.environ.get("LLMSERVE_API_KEY"))
    targets = [Target("direct", f"{engine}/v1", api_key=None), router]
    results: dict[str, Any] = {}
    for scenario in scenarios:
        config = BenchConfig(model=model, requests=scenario.requests, concurrency=scenario.concurrency,
                             max_tokens=scenario.max_tokens, rounds=scenario.rounds, seed=0)
        report = asyncio.run(bench(targets, config))
        direct, routed = report["targets"]["direct"], report["targets"]["router"]
        results[scenario.name] = {
            "concurrency": scenario.concurrency,
            "requests_per_target": scenario.requests,
            "max_tokens": scenario.max_tokens,
            **report["comparison"]["router_vs_direct"],
            "direct_output_tokens_per_s": direct["output_throughput"],
            "router_output_tokens_per_s": routed["output_throughput"],
            "direct_p50_ttft_ms": direct["p50_ttft_ms"],
            "router_p50_ttft_ms": routed["p50_ttft_ms"],
            "failed": direct["failed"] + routed["failed"],
        }
    return {"engine": engine, "router": router_url, "model": model, "scenarios": results}


def _table(result: dict[str, Any]) -> str:
    rows = ["| scenario | added TTFT p50 | added TTFT p99 | added ITL p50 | router/direct tokens/s | "
            "direct tokens/s | router tokens/s |", "|---|---|---|---|---|---|---|"]
    for name, s in result["scenarios"].items():
        rows.append(
            f"| {name} | {s['added_ttft_p50_ms']:.2f} ms | {s['added_ttft_p99_ms']:.2f} ms | "
            f"{s['added_itl_p50_ms']:.2f} ms | {s['output_throughput_ratio'] * 100:.1f}% | "
            f"{s['direct_output_tokens_per_s']:.1f} | {s['router_output_tokens_per_s']:.1f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--router", help="base URL of a running router (default: start `llmserve up`)")
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--quick", action="store_true", help="tiny configuration, seconds instead of minutes")
    parser.add_argument("--output", help="write the JSON here too")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    process = None
    router_url = args.router
    if router_url is None:
        process, router_url = _start_stack()
    try:
        result = measure(router_url.rstrip("/"), QUICK if args.quick else FULL, args.model)
    finally:
        if process is not None:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=90)
    emit(result, args.output)
    print(_table(result), file=sys.stderr)
    failed = sum(s["failed"] for s in result["scenarios"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
