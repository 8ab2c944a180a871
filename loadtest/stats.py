"""Latency and throughput statistics, named as vLLM's benchmark names them.

- TTFT: from sending the request to the first chunk that carries output text.
- ITL: the gaps between consecutive chunks that carry output text.
- E2E: from sending the request to the end of the stream.
- Output throughput: output tokens (from the usage the server reports) per second of wall time.
Failed requests are counted, and left out of the latency figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from llmserve.stats import percentile

__all__ = ["RequestResult", "percentile", "summarize", "summarize_ms"]


@dataclass
class RequestResult:
    ok: bool
    status: int = 0
    error: str = ""
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    served_by: str = ""


def summarize_ms(values_s: Sequence[float], prefix: str) -> dict[str, float]:
    ms = [v * 1000 for v in values_s]
    out = {f"mean_{prefix}_ms": (sum(ms) / len(ms)) if ms else float("nan")}
    for q in (50, 90, 99):
        out[f"p{q}_{prefix}_ms"] = percentile(ms, q)
    return out


def summarize(results: Sequence[RequestResult], duration_s: float) -> dict[str, object]:
    ok = [r for r in results if r.ok]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            key = str(r.status or r.error or "error")
            errors[key] = errors.get(key, 0) + 1
    output_tokens = sum(r.output_tokens for r in ok)
    summary: dict[str, object] = {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": errors,
        "duration": duration_s,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration_s if duration_s > 0 else 0.0,
        "output_throughput": output_tokens / duration_s if duration_s > 0 else 0.0,
    }
    summary.update(summarize_ms([r.ttft_s for r in ok], "ttft"))
    summary.update(summarize_ms([gap for r in ok for gap in r.itl_s], "itl"))
    summary.update(summarize_ms([r.e2e_s for r in ok], "e2el"))
    return summary
