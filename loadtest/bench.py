"""Streamed-request benchmark against one or more OpenAI-compatible base URLs.

Sends N streamed requests at a fixed concurrency to each target and prints
JSON with TTFT, ITL and end-to-end latency (mean, p50, p90, p99), output
tokens/s and errors per target. With two or more targets the requests are
interleaved in rounds (A, B, B, A, A, B, ...), so both see the same machine
noise, and the JSON adds each target's figures relative to the first:

    python -m loadtest bench --target direct=http://127.0.0.1:8100/v1 \\
        --target router=http://127.0.0.1:8000/v1 --model smollm2-135m-instruct \\
        --requests 64 --concurrency 8 --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass

import aiohttp

from loadtest.report import emit
from loadtest.stats import RequestResult, summarize

DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a hash table is in two sentences.",
    "Give me three tips for learning a new language.",
    "What is the boiling point of water at sea level?",
    "Summarize the plot of Romeo and Juliet.",
    "How do airplanes stay in the air?",
    "List five fruits that are rich in vitamin C.",
)


@dataclass(frozen=True)
class Target:
    name: str
    base_url: str


@dataclass(frozen=True)
class BenchConfig:
    model: str
    requests: int
    concurrency: int
    max_tokens: int
    rounds: int
    seed: int
    chat: bool = True
    timeout_s: float = 300.0


def _content_of(chunk: dict[str, object], chat: bool) -> str:
    choices = chunk.get("choices") or []
    if not isinstance(choices, list) or not choices:
        return ""
    choice = choices[0]
    if chat:
        return (choice.get("delta") or {}).get("content") or ""
    return choice.get("text") or ""


async def stream_one(
    client: aiohttp.ClientSession, target: Target, config: BenchConfig, prompt: str
) -> RequestResult:
    """One streamed request; times the first and each later chunk that carries text."""
    path = "/chat/completions" if config.chat else "/completions"
    body: dict[str, object] = {
        "model": config.model,
        "max_tokens": config.max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        # Fixed-length outputs make the targets comparable.
        "ignore_eos": True,
    }
    if config.chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    result = RequestResult(ok=False)
    start = time.perf_counter()
    last = start
    try:
        async with client.post(target.base_url + path, json=body) as response:
            result.status = response.status
            result.served_by = response.headers.get("x-served-by", "")
            if response.status != 200:
                result.error = (await response.text())[:200]
                return result
            buffer = b""
            async for raw in response.content.iter_any():
                buffer += raw
                *events, buffer = buffer.split(b"\n\n")
                for event in events:
                    if not event.startswith(b"data: "):
                        continue
                    data = event[6:]
                    if data == b"[DONE]":
                        continue
                    chunk = json.loads(data)
                    if "error" in chunk:
                        result.error = str(chunk["error"])[:200]
                        return result
                    now = time.perf_counter()
                    if _content_of(chunk, config.chat):
                        if result.ttft_s == 0.0:
                            result.ttft_s = now - start
                        else:
                            result.itl_s.append(now - last)
                        last = now
                    usage = chunk.get("usage")
                    if usage:
                        result.output_tokens = int(usage.get("completion_tokens") or 0)
        result.e2e_s = time.perf_counter() - start
        result.ok = result.ttft_s > 0
        if not result.ok:
            result.error = "stream ended without output"
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


async def run_batch(
    client: aiohttp.ClientSession, target: Target, config: BenchConfig, prompts: list[str]
) -> tuple[list[RequestResult], float]:
    semaphore = asyncio.Semaphore(config.concurrency)

    async def limited(prompt: str) -> RequestResult:
        async with semaphore:
            return await stream_one(client, target, config, prompt)

    start = time.perf_counter()
    results = await asyncio.gather(*(limited(p) for p in prompts))
    return list(results), time.perf_counter() - start


async def run(targets: list[Target], config: BenchConfig) -> dict[str, object]:
    rng = random.Random(config.seed)
    per_round = max(1, config.requests // config.rounds)
    results: dict[str, list[RequestResult]] = {t.name: [] for t in targets}
    durations: dict[str, float] = {t.name: 0.0 for t in targets}
    # aiohttp, as vLLM's own benchmark uses: its per-chunk cost is low and
    # steady, so it adds less noise to the latencies it measures.
    connector = aiohttp.TCPConnector(limit=config.concurrency * 2)
    timeout = aiohttp.ClientTimeout(total=config.timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False) as client:
        # Warm-up, not counted: opens connections and touches every code path once.
        for target in targets:
            await run_batch(client, target, config, [DEFAULT_PROMPTS[0]] * min(config.concurrency, 4))
        for round_index in range(config.rounds):
            prompts = [rng.choice(DEFAULT_PROMPTS) for _ in range(per_round)]
            order = targets if round_index % 2 == 0 else list(reversed(targets))
            for target in order:
                batch, elapsed = await run_batch(client, target, config, prompts)
                results[target.name].extend(batch)
                durations[target.name] += elapsed
    report: dict[str, object] = {
        "config": {**config.__dict__, "targets": {t.name: t.base_url for t in targets}},
        "targets": {name: summarize(results[name], durations[name]) for name in results},
    }
    if len(targets) > 1:
        base = report["targets"][targets[0].name]  # type: ignore[index]
        comparison = {}
        for target in targets[1:]:
            other = report["targets"][target.name]  # type: ignore[index]
            comparison[f"{target.name}_vs_{targets[0].name}"] = {
                "added_ttft_p50_ms": other["p50_ttft_ms"] - base["p50_ttft_ms"],
                "added_ttft_p99_ms": other["p99_ttft_ms"] - base["p99_ttft_ms"],
                "added_itl_p50_ms": other["p50_itl_ms"] - base["p50_itl_ms"],
                "output_throughput_ratio": (other["output_throughput"] / base["output_throughput"])
                if base["output_throughput"] else float("nan"),
            }
        report["comparison"] = comparison
    return report


def _parse_target(text: str) -> Target:
    name, sep, url = text.partition("=")
    if not sep:
        name, url = "target", text
    return Target(name=name, base_url=url.rstrip("/"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest bench", description=__doc__.splitlines()[0])
    parser.add_argument("--target", action="append", required=True, type=_parse_target,
                        help="NAME=BASE_URL (OpenAI base URL ending in /v1); repeat to compare")
    parser.add_argument("--model", required=True)
    parser.add_argument("--requests", "-n", type=int, default=32)
    parser.add_argument("--concurrency", "-c", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4, help="interleaving rounds when comparing targets")
    parser.add_argument("--completions", action="store_true", help="use /completions instead of /chat/completions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1 or args.max_tokens < 1 or args.rounds < 1:
        parser.error("--requests, --concurrency, --max-tokens and --rounds must be at least 1")
    config = BenchConfig(model=args.model, requests=args.requests, concurrency=args.concurrency,
                         max_tokens=args.max_tokens, rounds=args.rounds, seed=args.seed, chat=not args.completions)
    report = asyncio.run(run(args.target, config))
    emit(report, args.output)
    failed = sum(t["failed"] for t in report["targets"].values())  # type: ignore[union-attr]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
