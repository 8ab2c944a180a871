"""The router's overhead: the same engine addressed directly and through the router.

    python -m loadtest.overhead                 # starts `llmserve up` itself, then stops it
    python -m loadtest.overhead --router URL    # measures a running stack
    python -m loadtest.overhead --quick         # the tiny configuration CI runs
    python -m loadtest.overhead --scenario ttft --router-cpus 1   # the router on core 1, its engine on the rest

The direct address is the router's first ready replica (from
``/api/v1/replicas``). Each scenario interleaves the two targets in rounds
(``loadtest.cli.bench``, as ``python -m loadtest bench`` does) and reports
added TTFT (p50, p99), added ITL p50 and the router's output throughput as a
fraction of direct; single-stream and 32-concurrent tokens/s come from the
same runs.

``--router-cpus`` pins the router it started (every thread of ``llmserve up``)
and this load generator to those CPUs, and every process of each engine
replica to the others (``--engine-cpus``), once the stack is ready: the
router's cost with a core of its own, against the shared default.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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


def scenario_key(scenario: Scenario) -> str:
    """What ``--scenario`` calls it: the first word of its name (ttft, single-stream, 32-concurrent)."""
    return scenario.name.split(" ")[0]


def parse_cpus(text: str) -> set[int]:
    """``0,2-3`` -> {0, 2, 3} (taskset's list syntax)."""
    cpus: set[int] = set()
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def process_group(pgid: int) -> list[int]:
    """The live processes of a process group (an engine replica runs in its own), from /proc."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != b"Z":
            members.append(int(entry))
    return members


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of ``pid`` onto ``cpus`` (a process's affinity is per thread; threads started later
    inherit their creator's)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(tid), cpus)


def pin_stack(router_pid: int, router_url: str, router_cpus: set[int], engine_cpus: set[int]) -> dict[str, Any]:
    """The router process and this process onto ``router_cpus``, each ready replica's processes onto
    ``engine_cpus``; returns the layout, for the report."""
    headers = Target("router", router_url).headers()
    replicas = httpx.get(f"{router_url}/api/v1/replicas", timeout=5, headers=headers).json()["replicas"]
    engines = [pid for r in replicas if r["state"] == "ready" and r.get("pid") for pid in process_group(r["pid"])]
    for pid in engines:
        pin(pid, engine_cpus)
    pin(router_pid, router_cpus)
    pin(os.getpid(), router_cpus)
    return {"router_and_load_generator": sorted(router_cpus), "engines": sorted(engine_cpus),
            "engine_processes": len(engines)}


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
    parser.add_argument("--scenario", action="append", choices=[scenario_key(s) for s in FULL],
                        help="run only this scenario (repeatable; default: all)")
    parser.add_argument("--router-cpus", type=parse_cpus, default=None,
                        help="pin the router it starts and the load generator to these CPUs (taskset syntax: 1, 0,2-3)")
    parser.add_argument("--engine-cpus", type=parse_cpus, default=None,
                        help="with --router-cpus: the engines' CPUs (default: every other CPU this process may use)")
    args = parser.parse_args(argv)
    if args.router_cpus is not None and args.router is not None:
        parser.error("--router-cpus pins a router this command starts; leave out --router")
    scenarios = QUICK if args.quick else tuple(s for s in FULL if not args.scenario or scenario_key(s) in args.scenario)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    process = None
    router_url = args.router
    if router_url is None:
        process, router_url = _start_stack()
    try:
        layout = None
        if args.router_cpus is not None:
            assert process is not None
            engine_cpus = args.engine_cpus or (os.sched_getaffinity(0) - args.router_cpus)
            if not engine_cpus:
                parser.error("--router-cpus leaves no CPU for the engines")
            layout = pin_stack(process.pid, router_url, args.router_cpus, engine_cpus)
        result = measure(router_url.rstrip("/"), scenarios, args.model)
        if layout is not None:
            result["cpus"] = layout
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
