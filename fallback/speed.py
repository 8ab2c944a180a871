"""Student versus teacher in vLLM, and the student as the teacher's draft model.

    python -m fallback.speed [--teacher DIR --student DIR --requests 3 --max-tokens 128]

Runs one engine at a time on loopback, each configuration over three
workloads (open chat, copying a given text, code), one stream, greedy:

- ``teacher``: no speculation (the baseline);
- ``teacher+ngram``: prompt-lookup speculation (4 tokens, n-grams 2..4);
- ``teacher+draft``: the distilled student as the draft model (``--draft-tokens``, 4);
- ``student``: the student alone (the fallback's own speed).

Reports per configuration and workload: decode tokens/s, TTFT, the draft
acceptance rate (from vLLM's spec-decode counters), and whether every greedy
output equals the teacher's without speculation.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any, Literal

import httpx

from llmserve.errors import LLMServeError
from llmserve.replicas.local import LocalBackend
from llmserve.replicas.spec import DraftModelSpeculation, EngineSpec, NgramSpeculation
from llmserve.settings import EngineSettings, Settings
from loadtest.overhead import free_port
from loadtest.report import emit
from router.observe.engine_samples import parse_engine_metrics
from router.relay.sse import iter_events

PASSAGE = ("The lighthouse stood at the edge of the cliff for two hundred years. Every night its keeper climbed "
           "the one hundred and twelve steps, trimmed the wick, polished the great lens and watched the beam "
           "sweep across the dark water. Ships that had never seen the keeper trusted him with their lives, and "
           "in all those years not one of them was lost on the rocks below.")
WORKLOADS: dict[str, list[str]] = {
    "chat": ["What is the capital of France?", "Give me three tips for sleeping better.",
             "Explain what a rainbow is to a child."],
    "copy": [f"Repeat the following text exactly, word for word:\n\n{PASSAGE}",
             f"Copy this paragraph without changing anything:\n\n{PASSAGE}",
             f"Rewrite the text below exactly as it is:\n\n{PASSAGE}"],
    "code": ["Write a Python function that returns the factorial of n.",
             "Write a Python function that checks whether a string is a palindrome.",
             "Write a Python function that sums the even numbers in a list."],
}


def _spec_counters(url: str) -> tuple[float, float]:
    values = parse_engine_metrics(httpx.get(f"{url}/metrics", timeout=10).text)
    return (values.get("vllm:spec_decode_num_draft_tokens_total", 0.0),
            values.get("vllm:spec_decode_num_accepted_tokens_total", 0.0))


def _one(url: str, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first = None
    text, tokens = [], 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as response:
        response.raise_for_status()
        for event in iter_events(response.iter_bytes()):
            if event.done:
                continue
            chunk = json.loads(event.data)
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices") or []:
                delta = (choice.get("delta") or {}).get("content")
                if delta:
                    first = first or time.perf_counter()
                    text.append(delta)
    ended = time.perf_counter()
    decode_s = ended - (first or ended)
    return {"text": "".join(text), "tokens": tokens, "ttft_ms": ((first or ended) - started) * 1000,
            "decode_tokens_per_s": (tokens - 1) / decode_s if tokens > 1 and decode_s > 0 else None}


def measure(spec: EngineSpec, requests: int, max_tokens: int, logs: Path) -> dict[str, Any]:
    """One engine of ``spec``, started and stopped by the local replica backend (as ``llmserve up`` runs it)."""
    return asyncio.run(_measure(spec, requests, max_tokens, logs))


async def _measure(spec: EngineSpec, requests: int, max_tokens: int, logs: Path) -> dict[str, Any]:
    backend = LocalBackend(EngineSettings(first_port=free_port()), logs)
    try:
        replicas = await backend.start(spec, 1)
        await backend.wait_ready(replicas.endpoints)  # health, then the supervisor's one-token warm-up
        # the measurement is blocking HTTP: in a thread, so the backend keeps health-checking meanwhile
        return await asyncio.to_thread(_workloads, replicas.endpoints[0].url, spec, requests, max_tokens)
    finally:
        await backend.close()


def _workloads(url: str, spec: EngineSpec, requests: int, max_tokens: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for workload, prompts in WORKLOADS.items():
        drafted0, accepted0 = _spec_counters(url)
        runs = [_one(url, spec.versioned_name, p, max_tokens) for p in prompts[:requests]]
        drafted1, accepted1 = _spec_counters(url)
        speeds = [r["decode_tokens_per_s"] for r in runs if r["decode_tokens_per_s"]]
        drafted = drafted1 - drafted0
        results[workload] = {
            "decode_tokens_per_s": round(sum(speeds) / len(speeds), 1) if speeds else None,
            "ttft_ms": round(sum(r["ttft_ms"] for r in runs) / len(runs), 1),
            "acceptance_rate": round((accepted1 - accepted0) / drafted, 3) if drafted else None,
            "outputs": [r["text"] for r in runs],
        }
    return results


CONFIGURATIONS = ("teacher", "teacher+ngram", "teacher+draft", "student")


def run(teacher: Path, student: Path, requests: int, max_tokens: int, logs: Path,
        dtype: Literal["bfloat16", "float32"] = "bfloat16",
        draft_tokens: int = 4, only: tuple[str, ...] = CONFIGURATIONS) -> dict[str, Any]:
    engine = EngineSettings(dtype=dtype)
    configs = {
        "teacher": EngineSpec.from_settings(teacher, "teacher", "v1", engine),
        "teacher+ngram": EngineSpec.from_settings(teacher, "teacher", "ngram", engine,
                                                  speculation=NgramSpeculation()),
        "teacher+draft": EngineSpec.from_settings(teacher, "teacher", "draft", engine,
                                                  speculation=DraftModelSpeculation(student, draft_tokens)),
        "student": EngineSpec.from_settings(student, "student", "v1", engine),
    }
    logs.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, spec in configs.items():
        if name not in only and name != "teacher":  # the teacher is every ratio's baseline
            continue
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        try:
            results[name] = measure(spec, requests, max_tokens, logs)
        except (LLMServeError, httpx.HTTPError) as exc:
            results[name] = {"error": str(exc)}
    baseline = results["teacher"]
    summary: dict[str, Any] = {}
    for name, by_workload in results.items():
        if "error" in by_workload:
            summary[name] = by_workload
            continue
        summary[name] = {}
        for workload, figures in by_workload.items():
            base = baseline.get(workload, {}) if "error" not in baseline else {}
            speedup = (figures["decode_tokens_per_s"] / base["decode_tokens_per_s"]
                       if base.get("decode_tokens_per_s") and figures["decode_tokens_per_s"] else None)
            summary[name][workload] = {
                **{k: v for k, v in figures.items() if k != "outputs"},
                "speedup_vs_teacher": round(speedup, 2) if speedup else None,
                "greedy_outputs_equal_teacher": (
                    f"{sum(a == b for a, b in zip(figures['outputs'], base.get('outputs') or [], strict=False))}"
                    f"/{len(figures['outputs'])}") if name.startswith("teacher") else None,
            }
    return {"teacher": str(teacher), "student": str(student), "requests_per_workload": requests,
            "max_tokens": max_tokens, "dtype": dtype, "draft_tokens": draft_tokens, "results": summary,
            "sample_outputs": {name: {w: r[w]["outputs"][0] for w in r} for name, r in results.items()
                               if "error" not in r}}


def main(argv: list[str] | None = None) -> int:
    settings = Settings()
    repo = settings.model_repository
    parser = argparse.ArgumentParser(prog="python -m fallback.speed", description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=str(repo / settings.model.name / "v1"))
    parser.add_argument("--student", default=str(repo / f"{settings.model.name}-student" / "v1"))
    parser.add_argument("--requests", type=int, default=3, help="prompts per workload")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="engine dtype (float32 shows whether speculation alone changes greedy outputs)")
    parser.add_argument("--draft-tokens", type=int, default=4, help="tokens the student drafts per step")
    parser.add_argument("--configurations", default=",".join(CONFIGURATIONS),
                        help="which to measure, comma-separated (the teacher always is)")
    parser.add_argument("--output", help="also write the JSON report here")
    args = parser.parse_args(argv)
    only = tuple(c.strip() for c in args.configurations.split(",") if c.strip())
    unknown = sorted(set(only) - set(CONFIGURATIONS))
    if args.draft_tokens < 1:
        print("python -m fallback.speed: --draft-tokens must be at least 1", file=sys.stderr)
        return 2
    if unknown:
        print(f"python -m fallback.speed: unknown configuration {', '.join(unknown)}; "
              f"choose from {', '.join(CONFIGURATIONS)}", file=sys.stderr)
        return 2
    for path in (args.teacher, args.student):
        if not (Path(path) / "config.json").is_file():
            print(f"python -m fallback.speed: {path} is not a model folder (run llmserve distill first)",
                  file=sys.stderr)
            return 2
    report = run(Path(args.teacher), Path(args.student), args.requests, args.max_tokens,
                 settings.logs_dir / "speed", args.dtype, args.draft_tokens, only)
    emit(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
