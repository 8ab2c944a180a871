"""How sampling settings change what a model answers: the measurement behind a version's defaults.

    python -m loadtest.sampling_quality --url http://127.0.0.1:8000/v1 --model smollm2-135m-instruct \\
        --setting temperature=0 --setting temperature=0.2,top_p=0.9 --setting temperature=1 --samples 10

For each setting it sends every factual question ``--samples`` times and
counts the answers that contain an accepted answer (accuracy), and sends open
prompts (write, explain, list) and measures how much the answers repeat
themselves (the share of word 4-grams that are repeats; a "loop" is an answer
over 30% repeats) and how often they run to the token limit. Small models are
wrong more often as the temperature rises and loop more often as it falls;
the figures say where the balance lies. ``--output`` writes them as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from loadtest.report import emit

# (question, accepted answers): short facts an instruction-tuned model of any size should know
QUESTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("What is the capital of France?", ("paris",)),
    ("What is the capital of Japan?", ("tokyo",)),
    ("What is the capital of Italy?", ("rome",)),
    ("What is the capital of Germany?", ("berlin",)),
    ("What is the capital of Spain?", ("madrid",)),
    ("What is the largest planet in our solar system?", ("jupiter",)),
    ("What planet is known as the Red Planet?", ("mars",)),
    ("What is the chemical symbol for water?", ("h2o", "h₂o")),
    ("How many days are there in a week?", ("seven", "7")),
    ("How many legs does a spider have?", ("eight", "8")),
    ("What gas do plants absorb from the air?", ("carbon dioxide", "co2")),
    ("Who wrote Romeo and Juliet?", ("shakespeare",)),
    ("What is the boiling point of water in degrees Celsius?", ("100",)),
    ("What is the largest ocean on Earth?", ("pacific",)),
    ("What language is mainly spoken in Brazil?", ("portuguese",)),
    ("What is 2 plus 2?", ("4", "four")),
)

OPEN_PROMPTS: tuple[str, ...] = (
    "Write a short story about a robot who learns to paint.",
    "Explain how a rainbow forms.",
    "Give me five tips for sleeping better.",
    "Describe a typical day of a farmer.",
    "Why do people enjoy music?",
    "Write a poem about the sea.",
)


@dataclass(frozen=True)
class Setting:
    """Sampling parameters as ``name=value,...``; an empty setting leaves everything to the engine."""

    params: dict[str, float]

    @property
    def label(self) -> str:
        return ",".join(f"{k}={v:g}" for k, v in self.params.items()) or "engine default"


_ALLOWED = {"temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
            "frequency_penalty"}


def parse_setting(text: str) -> Setting:
    params: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or name not in _ALLOWED:
            raise ValueError(f"bad setting {part!r}: use name=value with a name from {sorted(_ALLOWED)}")
        try:
            params[name] = float(value)
        except ValueError:
            raise ValueError(f"bad setting {part!r}: {value!r} is not a number") from None
    return Setting(params)


def repeated_share(text: str, n: int = 4) -> float:
    """The share of word n-grams that already occurred earlier in the text (0: no repeats)."""
    words = text.lower().split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1 - len(set(grams)) / len(grams)


def is_correct(answer: str, accepted: Sequence[str]) -> bool:
    lowered = answer.lower()
    return any(a in lowered for a in accepted)


async def _ask(http: httpx.AsyncClient, url: str, model: str, prompt: str, params: dict[str, float],
               max_tokens: int, gate: asyncio.Semaphore) -> tuple[str, str]:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": prompt}],
                            "max_tokens": max_tokens, **params}
    async with gate:
        response = await http.post(f"{url}/chat/completions", json=body)
    response.raise_for_status()
    choice = response.json()["choices"][0]
    return choice["message"]["content"] or "", choice["finish_reason"] or ""


async def measure(url: str, model: str, settings: list[Setting], samples: int, open_samples: int,
                  concurrency: int, fact_tokens: int, open_tokens: int,
                  questions: Sequence[tuple[str, tuple[str, ...]]] = QUESTIONS,
                  open_prompts: Sequence[str] = OPEN_PROMPTS) -> list[dict[str, Any]]:
    gate = asyncio.Semaphore(concurrency)
    results = []
    async with httpx.AsyncClient(timeout=600, trust_env=False) as http:
        for setting in settings:
            facts = await asyncio.gather(*(
                _ask(http, url, model, q, setting.params, fact_tokens, gate)
                for q, _ in questions for _ in range(samples)))
            accepted = [a for _, a in questions for _ in range(samples)]
            opened = await asyncio.gather(*(
                _ask(http, url, model, p, setting.params, open_tokens, gate)
                for p in open_prompts for _ in range(open_samples)))
            repeats = [repeated_share(text) for text, _ in opened]
            correct = [is_correct(text, ok) for (text, _), ok in zip(facts, accepted, strict=True)]
            per_question = {q: sum(correct[i * samples:(i + 1) * samples]) / samples
                            for i, (q, _) in enumerate(questions)}
            results.append({
                "setting": setting.label, "params": setting.params,
                "accuracy": sum(correct) / len(correct),
                "questions_always_right": sum(1 for v in per_question.values() if v == 1.0),
                "open_repeated_share_mean": sum(repeats) / len(repeats),
                "open_loop_rate": sum(1 for r in repeats if r > 0.3) / len(repeats),
                "open_hit_limit_rate": sum(1 for _, f in opened if f == "length") / len(opened),
                "example": {"question": questions[0][0], "answer": facts[0][0]},
                "per_question": per_question,
            })
            print(f"{setting.label:>36}: accuracy {results[-1]['accuracy']:.0%}, "
                  f"loops {results[-1]['open_loop_rate']:.0%}, hit limit {results[-1]['open_hit_limit_rate']:.0%}",
                  file=sys.stderr, flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.sampling_quality", description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="OpenAI base URL, for example http://127.0.0.1:8000/v1")
    parser.add_argument("--model", required=True)
    parser.add_argument("--setting", action="append", default=[],
                        help="sampling parameters, name=value[,name=value]; repeat; '' = the engine's default")
    parser.add_argument("--samples", type=int, default=10, help="answers per factual question and setting")
    parser.add_argument("--open-samples", type=int, default=3, help="answers per open prompt and setting")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--fact-tokens", type=int, default=48)
    parser.add_argument("--open-tokens", type=int, default=200)
    parser.add_argument("--questions", type=int, default=len(QUESTIONS), help="use only the first N questions")
    parser.add_argument("--output", help="write the figures here as JSON")
    args = parser.parse_args(argv)
    try:
        settings = [parse_setting(s) for s in args.setting] or [Setting({"temperature": 0.0})]
    except ValueError as exc:
        parser.error(str(exc))
    for name in ("samples", "open_samples", "concurrency", "fact_tokens", "open_tokens", "questions"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    try:
        results = asyncio.run(measure(args.url.rstrip("/"), args.model, settings, args.samples, args.open_samples,
                                      args.concurrency, args.fact_tokens, args.open_tokens,
                                      QUESTIONS[:args.questions], OPEN_PROMPTS[:max(1, args.questions // 3)]))
    except httpx.HTTPError as exc:
        print(f"python -m loadtest.sampling_quality: {args.url}: {exc}", file=sys.stderr)
        return 2
    emit({"model": args.model, "url": args.url, "samples": args.samples, "results": results}, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
