"""A run's figures, named and defined as ``vllm bench serve`` defines them.

- TTFT: from sending a request to its first chunk that carries output text.
- ITL: the gaps between consecutive chunks that carry text.
- TPOT: (E2E - TTFT) / (output tokens - 1), for requests with 2+ output tokens.
- E2E latency (``e2el``): from sending to the end of the stream.
Failed and warm-up requests are left out of every latency figure. Open-loop
runs also report TTFT and E2E from each request's *intended* send time (the
``*_from_intended_*`` keys, as wrk2 does), the generator's lag, and the time
requests waited for a concurrency-cap slot. ``compare`` sets targets side by
side: ``added_*`` figures are differences from the first target, ``*_ratio``
figures quotients.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from llmserve.stats import percentile
from loadtest.runner import LATE_SEND_MS, Record
from loadtest.slo import SLO

PERCENTILES = (50, 90, 95, 99)
NO_SLO = SLO({})  # every completed request is good

# What ``compare`` reports: its key -> the summary's figure. ``run`` and ``sweep``
# judge latency by TPOT and goodput; ``bench`` (and the overhead benchmarks
# built on it) by ITL and tokens/s, the figures its README tables quote.
RUN_COMPARISON = {"added_ttft_p50_ms": "p50_ttft_ms", "added_ttft_p99_ms": "p99_ttft_ms",
                  "added_tpot_p50_ms": "p50_tpot_ms", "output_throughput_ratio": "output_throughput",
                  "goodput_ratio": "request_goodput"}
BENCH_COMPARISON = {"added_ttft_p50_ms": "p50_ttft_ms", "added_ttft_p99_ms": "p99_ttft_ms",
                    "added_itl_p50_ms": "p50_itl_ms", "output_throughput_ratio": "output_throughput"}


def distribution(values_ms: Sequence[float], name: str) -> dict[str, float]:
    """mean, median, std, p50/p90/p95/p99 and max, with vLLM's key names."""
    values = list(values_ms)
    if not values:
        nan = float("nan")
        return {f"mean_{name}_ms": nan, f"median_{name}_ms": nan, f"std_{name}_ms": nan,
                **{f"p{q}_{name}_ms": nan for q in PERCENTILES}, f"max_{name}_ms": nan}
    out = {
        f"mean_{name}_ms": statistics.fmean(values),
        f"median_{name}_ms": statistics.median(values),
        f"std_{name}_ms": statistics.pstdev(values),
    }
    out.update({f"p{q}_{name}_ms": percentile(values, q) for q in PERCENTILES})
    out[f"max_{name}_ms"] = max(values)
    return out


def slo_values(record: Record) -> dict[str, float | None]:
    # As vLLM's goodput does, a one-token answer has TPOT 0 (it has no gaps to be slow in).
    tpot = record.tpot_ms if record.tpot_ms is not None else (0.0 if record.ok else None)
    return {"ttft": record.ttft_ms, "tpot": tpot, "e2el": record.e2el_ms,
            "itl": max(record.itl_s) * 1000 if record.itl_s else (0.0 if record.ok else None)}


def summarize(records: Sequence[Record], duration_s: float, slo: SLO = NO_SLO) -> dict[str, object]:
    measured = [r for r in records if not r.warmup]
    ok = [r for r in measured if r.ok]
    errors = Counter(str(r.status or r.error.split(":")[0] or "error") for r in measured if not r.ok)
    good = [r for r in ok if slo.met_by(slo_values(r))]
    total_out = sum(r.output_tokens for r in ok)
    total_in = sum(r.input_tokens for r in ok)
    per_second = (lambda n: n / duration_s) if duration_s > 0 else (lambda n: 0.0)
    summary: dict[str, object] = {
        "duration": duration_s,
        "num_prompts": len(measured),
        "completed": len(ok),
        "failed": len(measured) - len(ok),
        "errors": dict(errors),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": per_second(len(ok)),
        "output_throughput": per_second(total_out),
        "total_token_throughput": per_second(total_in + total_out),
        "request_goodput": per_second(len(good)),
        "slo_attainment": len(good) / len(measured) if measured else 0.0,
        "versions": dict(Counter(r.version or "-" for r in ok)),
    }
    summary.update(distribution([r.ttft_ms for r in ok if r.ttft_ms is not None], "ttft"))
    summary.update(distribution([r.tpot_ms for r in ok if r.tpot_ms is not None], "tpot"))
    summary.update(distribution([gap * 1000 for r in ok for gap in r.itl_s], "itl"))
    summary.update(distribution([r.e2el_ms for r in ok if r.e2el_ms is not None], "e2el"))
    # Coordinated omission: the same latencies measured from when each request was due.
    summary.update(distribution(
        [(r.first_token_s - r.intended_s) * 1000 for r in ok if r.first_token_s is not None], "ttft_from_intended"))
    summary.update(distribution(
        [(r.end_s - r.intended_s) * 1000 for r in ok if r.end_s is not None], "e2el_from_intended"))
    lags = [r.generator_lag_s * 1000 for r in measured]
    waits = [r.queue_wait_ms for r in measured]
    summary.update({
        "max_generator_lag_ms": max(lags, default=0.0),
        "late_sends": sum(1 for lag in lags if lag > LATE_SEND_MS),
        "mean_cap_wait_ms": statistics.fmean(waits) if waits else 0.0,
        "max_cap_wait_ms": max(waits, default=0.0),
    })
    return summary


def compare(summaries: Mapping[str, Mapping[str, Any]], figures: Mapping[str, str] = RUN_COMPARISON
            ) -> dict[str, dict[str, float]]:
    """Each target against the first (``"B_vs_A"``), for targets measured interleaved in one run.

    A ratio against a zero is NaN (the first target did nothing to compare with).
    """
    names = list(summaries)
    base = summaries[names[0]]
    out = {}
    for name in names[1:]:
        other = summaries[name]
        out[f"{name}_vs_{names[0]}"] = {
            key: (other[figure] - base[figure]) if key.startswith("added_")
            else (other[figure] / base[figure] if base[figure] else float("nan"))
            for key, figure in figures.items()
        }
    return out
