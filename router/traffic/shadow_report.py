"""The comparison of a shadow version with the versions that answered the clients: pure, with an injected clock.

Each replayed request gives one paired observation: what the primary (the version the split chose)
answered and what the shadow answered to the same request. ``ShadowReport`` keeps the latest
``max_pairs`` of them (a bounded window: the report describes the shadow as it is now) and a few
side-by-side examples, and summarises them on demand (``to_dict``):

- a generative model: TTFT and TPOT ratios (shadow/primary, streams only), the end-to-end latency
  ratio, the output length ratio, error rates of both, the exact-match rate of greedy requests
  (temperature 0: the only ones whose answers should be the same) and a text similarity
  (``difflib.SequenceMatcher.ratio``, 1.0 = the same text) over every pair both answered;
- a traditional model: label agreement, the mean and max absolute score difference, the latency ratio.

Ratios are paired geometric means, rates Wilson intervals, means normal intervals (``shadow_stats``).
Counters say what never became a pair: sampled, dropped (the replay queue was full), shed (the
shadow was saturated: batch traffic is refused), failed to start.
"""

from __future__ import annotations

import collections
import difflib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from router.traffic.shadow_stats import mean_ci, ratio_ci, wilson

EXAMPLE_CHARS = 200  # each side of an example, truncated
_SIMILARITY_CHARS = 4000  # difflib is quadratic in the worst case: compare the first this many characters


@dataclass(frozen=True)
class Outcome:
    """One side of a pair: how one version answered one request."""

    ok: bool  # a 200 answer, whole
    latency_ms: float
    ttft_ms: float | None = None  # streams only
    tpot_ms: float | None = None  # streams of at least two text chunks
    text: str = ""  # a generative answer's text
    output_tokens: int | None = None
    labels: Sequence[Any] = ()  # a prediction's labels, one a row
    scores: Sequence[float] = ()  # a prediction's scores, one a row (the positive class's probability, say)
    error: str | None = None


@dataclass(frozen=True)
class Pair:
    request_id: str
    primary_version: str
    primary: Outcome
    shadow: Outcome
    greedy: bool = False  # temperature 0: the answers should match exactly


def similarity(a: str, b: str) -> float:
    """difflib's ratio of the two texts (their first ``_SIMILARITY_CHARS`` characters): 1.0 when equal."""
    if a == b:
        return 1.0
    return difflib.SequenceMatcher(None, a[:_SIMILARITY_CHARS], b[:_SIMILARITY_CHARS], autojunk=False).ratio()


def _interval(value: tuple[float, float] | None) -> list[float] | None:
    return None if value is None else [round(value[0], 4), round(value[1], 4)]


def rate(successes: int, n: int) -> dict[str, Any]:
    return {"n": n, "rate": round(successes / n, 4) if n else None, "ci95": _interval(wilson(successes, n))}


def ratio(shadow: list[float], primary: list[float]) -> dict[str, Any]:
    summary = ratio_ci(shadow, primary)
    n = sum(1 for s, p in zip(shadow, primary, strict=True) if s > 0 and p > 0)
    if summary is None:
        return {"n": 0, "ratio": None, "ci95": None}
    return {"n": n, "ratio": round(summary[0], 4), "ci95": _interval(summary[1])}


def mean(values: list[float]) -> dict[str, Any]:
    summary = mean_ci(values)
    if summary is None:
        return {"n": 0, "mean": None, "ci95": None}
    return {"n": len(values), "mean": round(summary[0], 4), "ci95": _interval(summary[1])}


@dataclass
class ShadowReport:
    model_name: str
    shadow_version: str
    sample_percent: int
    predict: bool = False
    clock: Callable[[], float] = time.time
    max_pairs: int = 5000
    max_examples: int = 5
    started_at: float = 0.0
    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    pairs: collections.deque[Pair] = field(init=False)
    examples: collections.deque[dict[str, Any]] = field(init=False)
    updated_at: float | None = None

    def __post_init__(self) -> None:
        self.pairs = collections.deque(maxlen=self.max_pairs)
        self.examples = collections.deque(maxlen=self.max_examples)
        self.started_at = self.started_at or self.clock()

    def count(self, what: str) -> None:
        """An event that is not a pair: ``sampled``, ``dropped_queue_full``, ``shed``, ``unavailable``."""
        self.counts[what] += 1

    def add(self, pair: Pair) -> None:
        self.pairs.append(pair)
        self.counts["compared"] += 1
        self.updated_at = self.clock()
        differs = pair.primary.text != pair.shadow.text or list(pair.primary.labels) != list(pair.shadow.labels)
        if differs or not pair.shadow.ok or len(self.examples) < self.max_examples:
            self.examples.append(self._example(pair))  # the latest, preferring those that disagree

    def _example(self, pair: Pair) -> dict[str, Any]:
        def side(version: str, o: Outcome) -> dict[str, Any]:
            shown: dict[str, Any] = {"version": version, "ok": o.ok, "latency_ms": round(o.latency_ms, 2)}
            if self.predict:
                shown |= {"labels": list(o.labels)[:10], "scores": [round(s, 4) for s in list(o.scores)[:10]]}
            else:
                shown |= {"text": o.text[:EXAMPLE_CHARS] + ("..." if len(o.text) > EXAMPLE_CHARS else ""),
                          "ttft_ms": None if o.ttft_ms is None else round(o.ttft_ms, 2)}
            if o.error:
                shown["error"] = o.error[:EXAMPLE_CHARS]
            return shown

        return {"request_id": pair.request_id, "greedy": pair.greedy,
                "primary": side(pair.primary_version, pair.primary), "shadow": side(self.shadow_version, pair.shadow)}

    # -- the summary ------------------------------------------------------------

    def ratios(self) -> dict[str, float | None]:
        """The paired ratios shadow/primary alone (for the metrics): ``ttft``, ``tpot``, ``latency``."""
        both = [p for p in self.pairs if p.primary.ok and p.shadow.ok]
        result: dict[str, float | None] = {}
        for signal in ("ttft", "tpot", "latency"):
            field_name = f"{signal}_ms"
            pairs = [(getattr(p.shadow, field_name), getattr(p.primary, field_name)) for p in both]
            pairs = [(s, q) for s, q in pairs if s is not None and q is not None]
            summary = ratio_ci([s for s, _ in pairs], [q for _, q in pairs])
            result[signal] = None if summary is None else summary[0]
        return result

    def to_dict(self) -> dict[str, Any]:
        pairs = list(self.pairs)
        both = [p for p in pairs if p.primary.ok and p.shadow.ok]
        summary: dict[str, Any] = {
            "model_name": self.model_name, "shadow_version": self.shadow_version,
            "sample_percent": self.sample_percent, "kind": "predict" if self.predict else "llm",
            "started_at": self.started_at, "updated_at": self.updated_at,
            "age_s": round(self.clock() - self.started_at, 3),
            "counts": {k: self.counts.get(k, 0) for k in ("sampled", "compared", "dropped_queue_full", "shed",
                                                           "unavailable")},
            "window_pairs": len(pairs),
            "primary_error_rate": rate(sum(not p.primary.ok for p in pairs), len(pairs)),
            "shadow_error_rate": rate(sum(not p.shadow.ok for p in pairs), len(pairs)),
            "latency_ratio": ratio([p.shadow.latency_ms for p in both], [p.primary.latency_ms for p in both]),
        }
        summary |= self._predict(both) if self.predict else self._llm(both)
        summary["examples"] = list(self.examples)
        return summary

    @staticmethod
    def _llm(both: list[Pair]) -> dict[str, Any]:
        timed = [p for p in both if p.primary.ttft_ms is not None and p.shadow.ttft_ms is not None]
        paced = [p for p in both if p.primary.tpot_ms is not None and p.shadow.tpot_ms is not None]
        sized = [p for p in both if p.primary.output_tokens and p.shadow.output_tokens]
        greedy = [p for p in both if p.greedy]
        return {
            "ttft_ratio": ratio([p.shadow.ttft_ms or 0.0 for p in timed], [p.primary.ttft_ms or 0.0 for p in timed]),
            "tpot_ratio": ratio([p.shadow.tpot_ms or 0.0 for p in paced], [p.primary.tpot_ms or 0.0 for p in paced]),
            "output_length_ratio": ratio([float(p.shadow.output_tokens or 0) for p in sized],
                                         [float(p.primary.output_tokens or 0) for p in sized]),
            "exact_match_greedy": rate(sum(p.primary.text == p.shadow.text for p in greedy), len(greedy)),
            "text_similarity": mean([similarity(p.primary.text, p.shadow.text) for p in both]),
        }

    @staticmethod
    def _predict(both: list[Pair]) -> dict[str, Any]:
        rows = [(a, b) for p in both if len(p.primary.labels) == len(p.shadow.labels)
                for a, b in zip(p.primary.labels, p.shadow.labels, strict=True)]
        diffs = [abs(a - b) for p in both if len(p.primary.scores) == len(p.shadow.scores)
                 for a, b in zip(p.primary.scores, p.shadow.scores, strict=True)]
        return {
            "label_agreement": rate(sum(a == b for a, b in rows), len(rows)),
            "score_abs_diff": {**mean(diffs), "max": round(max(diffs), 6) if diffs else None},
        }
