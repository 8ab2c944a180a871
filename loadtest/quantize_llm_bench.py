"""The INT8 (W8A8) version against its float32 source, both served by vLLM, in one run.

    flock /tmp/llmserve-bench.lock python -m loadtest.quantize_llm_bench \\
        [--baseline DIR --quantized DIR] [--rounds 2] [--output result.json]

One engine at a time, started by the local replica backend as ``llmserve up``
starts it (float32 activations, both cores); the order alternates between rounds
(baseline, quantized, then quantized, baseline) so a slow spell on a shared
machine does not land on one side only. Per engine:

- decode tokens/s of one stream and of 16 concurrent streams (128 tokens each,
  ``ignore_eos`` so every stream decodes the same length), TTFT p50 of both;
- memory: RSS of the engine's process tree after the load, and the weights' bytes on disk;
- quality against the float32 engine on the held-out prompts of ``llmserve distill``
  (the same split): the float32 engine answers each greedily (64 tokens); both engines
  then score those answers in one prefill (``prompt_logprobs``), and next-token
  agreement is the share of answer positions where their argmax tokens are equal
  (``fallback.distill.evaluate``'s measure), with the perplexity of the answers; and
  each engine's own greedy answers, side by side, for the first ``--answers`` prompts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from fallback.distill import bundled_prompts
from fallback.teacher import chat_ids
from llmserve.replicas.local import LocalBackend
from llmserve.replicas.spec import EngineSpec
from llmserve.settings import EngineSettings, Settings
from loadtest.overhead import free_port
from loadtest.report import emit
from router.relay.sse import aiter_events

STREAM_PROMPTS = ("Tell me a long story about a lighthouse keeper.", "Explain how a bicycle works.",
                  "Write a letter to a friend about your holiday.", "Describe the water cycle in detail.")
GREEDY = {"temperature": 0, "repetition_penalty": 1.0}


def held_out_prompts(seed: int = 0, fraction: float = 0.1) -> list[str]:
    """The prompts ``llmserve distill`` holds out with its defaults (shuffled with ``seed``, the first tenth)."""
    prompts = bundled_prompts()
    random.Random(seed).shuffle(prompts)
    return prompts[:max(1, int(len(prompts) * fraction))]


def argmax_and_logprob(position: dict[str, Any] | None, actual: int) -> tuple[int, float]:
    """From one ``prompt_logprobs`` entry: the engine's top token and the log-probability of ``actual``."""
    if not position:
        raise ValueError("no prompt logprobs at an answer position")
    top = min(position.items(), key=lambda kv: kv[1]["rank"])
    return int(top[0]), float(position[str(actual)]["logprob"])


def agreement(reference: list[list[int]], candidate: list[list[int]]) -> float:
    same = sum(a == b for ref, cand in zip(reference, candidate, strict=True) for a, b in zip(ref, cand, strict=True))
    total = sum(len(ref) for ref in reference)
    return round(same / max(total, 1), 4)


def p50(values: list[float]) -> float | None:
    return round(statistics.median(values), 1) if values else None


async def _stream(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, **GREEDY}
    started = time.perf_counter()
    first: float | None = None
    tokens = 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for event in aiter_events(response.aiter_bytes()):
            if event.done:
                continue
            chunk = json.loads(event.data)
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if first is None and any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or []):
                first = time.perf_counter()
    ended = time.perf_counter()
    first = first or ended
    return {"tokens": tokens, "ttft_ms": (first - started) * 1000, "started": started, "first": first,
            "ended": ended, "decode_tokens_per_s": (tokens - 1) / (ended - first) if ended > first else None}


async def speed(client: httpx.AsyncClient, url: str, model: str, max_tokens: int, concurrency: int) -> dict[str, Any]:
    single = [await _stream(client, url, model, p, max_tokens) for p in STREAM_PROMPTS[:3]]
    many = await asyncio.gather(*(_stream(client, url, model, STREAM_PROMPTS[i % len(STREAM_PROMPTS)], max_tokens)
                                  for i in range(concurrency)))
    # Aggregate decode rate: tokens after each stream's first, over the span from the first token seen to the last
    # stream's end (prefills overlap the start, so this is the steady batched decode speed).
    span = max(r["ended"] for r in many) - min(r["first"] for r in many)
    return {
        "one_stream_decode_tokens_per_s": round(statistics.mean(r["decode_tokens_per_s"] for r in single), 2),
        "one_stream_ttft_p50_ms": p50([r["ttft_ms"] for r in single]),
        "concurrent_streams": concurrency,
        "concurrent_decode_tokens_per_s": round(sum(r["tokens"] - 1 for r in many) / span, 2),
        "concurrent_per_stream_tokens_per_s": round(statistics.mean(r["decode_tokens_per_s"] for r in many), 2),
        "concurrent_ttft_p50_ms": p50([r["ttft_ms"] for r in many]),
    }


async def _complete(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], **extra: Any
                    ) -> dict[str, Any]:
    body = {"model": model, "prompt": prompt, "return_token_ids": True, **GREEDY, **extra}
    response = await client.post(f"{url}/v1/completions", json=body)
    response.raise_for_status()
    return dict(response.json()["choices"][0])


async def answers(client: httpx.AsyncClient, url: str, model: str, prompts: list[list[int]], max_tokens: int
                  ) -> list[dict[str, Any]]:
    limit = asyncio.Semaphore(16)

    async def one(ids: list[int]) -> dict[str, Any]:
        async with limit:
            choice = await _complete(client, url, model, ids, max_tokens=max_tokens)
        return {"text": choice["text"].strip(), "token_ids": list(choice["token_ids"])}

    return list(await asyncio.gather(*(one(p) for p in prompts)))


async def score(client: httpx.AsyncClient, url: str, model: str, prompts: list[list[int]],
                reference: list[list[int]]) -> dict[str, Any]:
    """Each engine's argmax at every reference answer position (one prefill each), and the answers' NLL."""
    limit = asyncio.Semaphore(8)

    async def one(ids: list[int], answer: list[int]) -> tuple[list[int], float]:
        async with limit:
            choice = await _complete(client, url, model, ids + answer, max_tokens=1, prompt_logprobs=1)
        positions = choice["prompt_logprobs"][len(ids):]
        picked = [argmax_and_logprob(p, token) for p, token in zip(positions, answer, strict=True)]
        return [a for a, _ in picked], -sum(lp for _, lp in picked)

    scored = await asyncio.gather(*(one(p, a) for p, a in zip(prompts, reference, strict=True)))
    tokens = sum(len(a) for a in reference)
    return {"argmax": [s[0] for s in scored],
            "perplexity": round(math.exp(sum(s[1] for s in scored) / max(tokens, 1)), 3), "tokens": tokens}


def _tree_rss_mb(pid: int) -> float:
    import psutil

    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return round(total / 2**20, 1)


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


async def measure(label: str, folder: Path, engine: EngineSettings, logs: Path, prompts: list[list[int]],
                  reference: list[list[int]] | None, args: argparse.Namespace) -> dict[str, Any]:
    """Start one engine of ``folder``, measure it, stop it."""
    spec = EngineSpec.from_settings(folder, "bench", label, engine)
    backend = LocalBackend(engine.model_copy(update={"first_port": free_port()}), logs)
    started = time.perf_counter()
    try:
        replicas = await backend.start(spec, 1)
        await backend.wait_ready(replicas.endpoints)
        ready_s = time.perf_counter() - started
        endpoint = replicas.endpoints[0]
        url, model = endpoint.url, spec.versioned_name
        async with httpx.AsyncClient(timeout=600) as client:
            figures = await speed(client, url, model, args.max_tokens, args.concurrency)
            figures["rss_mb"] = _tree_rss_mb(int(endpoint.details["pid"]))
            own = await answers(client, url, model, prompts, args.answer_tokens)
            scored = await score(client, url, model, prompts, reference or [a["token_ids"] for a in own])
        return {"label": label, "ready_s": round(ready_s, 1), **figures, "answers": own, "scored": scored}
    finally:
        await backend.close()


async def run(baseline: Path, quantized: Path, args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(baseline))
    held = held_out_prompts()
    prompts = [chat_ids(tokenizer, p) for p in held]
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = args.cores  # inherited by the engines: both get the same cores
    engine = EngineSettings(dtype="float32", kv_cache_gib=2, spread_cpus=False)
    logs.mkdir(parents=True, exist_ok=True)
    folders = {"float32": baseline, "int8": quantized}
    runs: dict[str, list[dict[str, Any]]] = {"float32": [], "int8": []}
    reference: list[list[int]] | None = None
    for round_index in range(args.rounds):
        order = ["float32", "int8"] if round_index % 2 == 0 else ["int8", "float32"]
        for label in order:  # round 1 starts with float32: its answers are the reference
            print(f"round {round_index + 1}: {label} ...", file=sys.stderr, flush=True)
            result = await measure(label, folders[label], engine, logs, prompts, reference, args)
            if reference is None:
                reference = [a["token_ids"] for a in result["answers"]]
            runs[label].append(result)
    return summarize(runs, folders, held, args)


SPEED_KEYS = ("one_stream_decode_tokens_per_s", "one_stream_ttft_p50_ms", "concurrent_decode_tokens_per_s",
              "concurrent_per_stream_tokens_per_s", "concurrent_ttft_p50_ms", "rss_mb", "ready_s")


def summarize(runs: dict[str, list[dict[str, Any]]], folders: dict[str, Path], held: list[str],
              args: argparse.Namespace) -> dict[str, Any]:
    base = runs["float32"][0]
    reference_argmax = base["scored"]["argmax"]
    table: dict[str, Any] = {}
    for label, results in runs.items():
        row: dict[str, Any] = {k: round(statistics.median(r[k] for r in results), 2) for k in SPEED_KEYS
                               if all(r.get(k) is not None for r in results)}
        row["per_round"] = {k: [r[k] for r in results] for k in SPEED_KEYS}
        row["weights_mb_on_disk"] = round(weight_bytes(folders[label]) / 2**20, 1)
        first = results[0]
        row["next_token_agreement_with_float32"] = agreement(reference_argmax, first["scored"]["argmax"])
        row["perplexity_of_float32_answers"] = first["scored"]["perplexity"]
        row["greedy_answers_equal_float32"] = (
            f"{sum(a['token_ids'] == b['token_ids'] for a, b in zip(first['answers'], base['answers'], strict=True))}"
            f"/{len(held)}")
        table[label] = row
    for key in ("one_stream_decode_tokens_per_s", "concurrent_decode_tokens_per_s", "rss_mb", "weights_mb_on_disk"):
        if table["float32"].get(key) and table["int8"].get(key):
            table["int8"][f"{key}_ratio"] = round(table["int8"][key] / table["float32"][key], 3)
    side_by_side = [{"prompt": held[i], "float32": base["answers"][i]["text"],
                     "int8": runs["int8"][0]["answers"][i]["text"]} for i in range(min(args.answers, len(held)))]
    return {"baseline": str(folders["float32"]), "quantized": str(folders["int8"]), "rounds": args.rounds,
            "concurrency": args.concurrency, "max_tokens": args.max_tokens, "held_out_prompts": len(held),
            "answer_tokens": args.answer_tokens,
            "scored_tokens": base["scored"]["tokens"], "cores": args.cores, "cpu": _cpu_name(),
            "results": table, "answers": side_by_side}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return "unknown"


def print_table(report: dict[str, Any]) -> None:
    rows = report["results"]
    streams = report["concurrency"]
    head = ("version", "weights MB", "RSS MB", "1-stream tok/s", "TTFT p50 ms", f"{streams}-stream tok/s",
            f"TTFT p50 ms ({streams})", "agreement", "ppl", "greedy equal")
    print("| " + " | ".join(head) + " |", file=sys.stderr)
    print("|" + "---|" * len(head), file=sys.stderr)
    for label, row in rows.items():
        cells = (label, row["weights_mb_on_disk"], row.get("rss_mb"), row.get("one_stream_decode_tokens_per_s"),
                 row.get("one_stream_ttft_p50_ms"), row.get("concurrent_decode_tokens_per_s"),
                 row.get("concurrent_ttft_p50_ms"), row["next_token_agreement_with_float32"],
                 row["perplexity_of_float32_answers"], row["greedy_answers_equal_float32"])
        print("| " + " | ".join(str(c) for c in cells) + " |", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    settings = Settings()
    models = settings.model_repository / settings.model.name
    parser = argparse.ArgumentParser(prog="python -m loadtest.quantize_llm_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=str(models / "v1"), help="the float32 source version's folder")
    parser.add_argument("--quantized", default=str(models / "v1-int8"), help="the quantized version's folder")
    parser.add_argument("--rounds", type=int, default=2, help="engine starts per version, order alternating")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens per stream in the speed runs")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--answer-tokens", type=int, default=64, help="length of the greedy held-out answers")
    parser.add_argument("--answers", type=int, default=8, help="greedy answers shown side by side")
    parser.add_argument("--cores", default="0-1", help="VLLM_CPU_OMP_THREADS_BIND for both engines")
    parser.add_argument("--output", default="result.json", help="where the JSON report goes")
    args = parser.parse_args(argv)
    for path in (args.baseline, args.quantized):
        if not (Path(path) / "config.json").is_file():
            print(f"python -m loadtest.quantize_llm_bench: {path} is not a model folder "
                  "(llmserve prepare; llmserve quantize --version v1-int8)", file=sys.stderr)
            return 2
    if args.rounds < 1 or args.concurrency < 1:
        print("python -m loadtest.quantize_llm_bench: --rounds and --concurrency must be at least 1", file=sys.stderr)
        return 2
    report = asyncio.run(run(Path(args.baseline), Path(args.quantized), args, settings.logs_dir / "quantize-bench"))
    emit(report, args.output)
    print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
