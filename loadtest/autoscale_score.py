"""How one run of the autoscaling benchmark is scored, from what its clients and the router's API saw.

- A request *meets the SLO* when it got a complete answer (200, no error event,
  ``[DONE]``) with TTFT <= ``ttft_ms`` measured from its *intended* send time
  (a generator that fell behind still counts the wait) and TPOT <= ``tpot_ms``.
  ``slo_attainment`` is the share of all requests sent that met it: failed and
  refused ones count as misses. ``goodput`` is those requests per second of trace.
- ``failed``: no complete answer (non-200, an error event, no ``[DONE]``);
  ``lost``: no answer at all (no status, or a cut stream without an error event:
  ``loadtest.chaos.tally``'s rule), a subset of ``failed``.
- ``replica_seconds``: the integral of live replicas (starting, ready or
  draining: a starting GPU costs as much as a serving one) over the trace,
  from the router's ``live_replicas`` sampled every half second.
- ``direction_changes``: decisions whose direction (up/down) differs from the
  previous decision's, from the decisions the router recorded (``from``/``to``);
  counted per steady phase too, against the goal's allowance there.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llmserve.stats import percentile
from loadtest.autoscale_trace import Compression, Trace
from loadtest.runner import Record, late_sends


@dataclass(frozen=True)
class Objective:
    ttft_ms: float = 500.0
    tpot_ms: float = 100.0


@dataclass(frozen=True)
class Sample:
    t: float  # seconds from the trace's start
    live: int
    ready: int
    cpu: float | None = None  # the machine's busy share since the previous sample (/proc/stat), 0..1


def cpu_times() -> tuple[float, float] | None:
    """(busy, total) jiffies of the whole machine, or None where there is no /proc/stat."""
    try:
        with open("/proc/stat") as fh:
            fields = [float(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def complete(record: Record) -> bool:
    return record.status == 200 and record.ok and record.complete and not record.error_event


def lost(record: Record) -> bool:
    """No answer at all: no status line, or a stream cut without an error event (a clean refusal is an answer)."""
    return record.status == 0 or (record.status == 200 and not record.error_event and not record.complete)


def ttft_from_intended_ms(record: Record) -> float | None:
    return None if record.first_token_s is None else (record.first_token_s - record.intended_s) * 1000


def meets(record: Record, slo: Objective) -> bool:
    if not complete(record):
        return False
    ttft, tpot = ttft_from_intended_ms(record), record.tpot_ms
    return ttft is not None and ttft <= slo.ttft_ms and (tpot is None or tpot <= slo.tpot_ms)


def replica_seconds(samples: Sequence[Sample], end_s: float) -> float:
    """Each sample's live count held until the next sample, clipped to [0, end_s]."""
    total = 0.0
    for sample, following in zip(samples, [*samples[1:], None], strict=True):
        start = max(0.0, sample.t)
        stop = min(end_s, following.t if following is not None else end_s)
        if stop > start:
            total += sample.live * (stop - start)
    return total


def reversals(decisions: Sequence[dict[str, Any]]) -> list[float]:
    """When a decision went the other way from the one before it (seconds from the trace's start)."""
    times: list[float] = []
    last = ""
    for decision in sorted(decisions, key=lambda d: d["t"]):
        direction = "up" if decision["to"] > decision["from"] else "down" if decision["to"] < decision["from"] else ""
        if not direction:
            continue
        if last and direction != last:
            times.append(decision["t"])
        last = direction
    return times


def steady_changes(changes: Sequence[float], trace: Trace, compression: Compression) -> dict[str, Any]:
    """Per steady phase: its changes of direction and what the goal allows there (one per scaled 10 min)."""
    out: dict[str, Any] = {}
    for phase, start, end in trace.spans():
        if not phase.steady:
            continue
        count = sum(1 for t in changes if start <= t < end)
        allowed = compression.allowed_changes(end - start)
        out[phase.name] = {"changes": count, "allowed": round(allowed, 2), "within": count <= allowed}
    return out


_HIST = re.compile(r'^llmserve_cold_start_wait_seconds_(bucket|count|sum)\{([^}]*)\} ([0-9.e+-]+|\+Inf)$')


def cold_start_holds(metrics_text: str, model: str) -> dict[str, Any]:
    """Held requests and their wait, from the router's ``llmserve_cold_start_wait_seconds`` histogram."""
    count, total = 0.0, 0.0
    buckets: list[tuple[float, float]] = []
    for line in metrics_text.splitlines():
        match = _HIST.match(line)
        if not match or f'model="{model}"' not in match.group(2):
            continue
        kind, labels, value = match.groups()
        if kind == "count":
            count += float(value)
        elif kind == "sum":
            total += float(value)
        else:
            bound = re.search(r'le="([^"]+)"', labels)
            if bound:
                buckets.append((float(bound.group(1)), float(value)))
    buckets.sort()

    def upper_bound(q: float) -> float | None:  # the smallest bucket bound holding share q (None: past the top)
        for bound, cumulative in buckets:
            if count and cumulative >= q * count:
                return bound if bound != float("inf") else None
        return None

    return {"holds": int(count), "wait_mean_s": round(total / count, 3) if count else None,
            "wait_p50_le_s": upper_bound(0.5), "wait_max_le_s": upper_bound(1.0)}


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def summarize(records: Sequence[Record], samples: Sequence[Sample], decisions: Sequence[dict[str, Any]],
              trace: Trace, compression: Compression, slo: Objective, cold: dict[str, Any]) -> dict[str, Any]:
    """One run's figures: the report's keys and the evidence behind them."""
    sent = len(records)
    good = [r for r in records if meets(r, slo)]
    done = [r for r in records if complete(r)]
    ttft = [v for r in done if (v := ttft_from_intended_ms(r)) is not None]
    tpot = [v for r in done if (v := r.tpot_ms) is not None]
    changes = reversals(decisions)
    cost = replica_seconds(samples, trace.duration_s)
    steady = steady_changes(changes, trace, compression)
    by_phase: dict[str, float | None] = {}
    for phase, start, end in trace.spans():
        mine = [r for r in records if start <= r.intended_s < end]
        by_phase[phase.name] = round(sum(meets(r, slo) for r in mine) / len(mine), 4) if mine else None
    width = max(trace.duration_s / 40, 0.5)
    bins: list[list[float]] = []
    for i in range(math.ceil(trace.duration_s / width)):
        mine = [r for r in records if i * width <= r.intended_s < (i + 1) * width]
        if mine:
            bins.append([round((i + 0.5) * width, 2), round(sum(meets(r, slo) for r in mine) / len(mine), 4)])
    cpu = sorted(c for s in samples if s.t >= 0 and (c := s.cpu) is not None)
    statuses: dict[str, int] = {}
    for r in records:
        if not complete(r):
            key = str(r.status) if not r.error_event else "error_event"
            statuses[key] = statuses.get(key, 0) + 1
    return {
        "requests": sent,
        "slo_attainment": round(len(good) / sent, 4) if sent else 0.0,
        "ttft_attainment": round(sum(1 for v in ttft if v <= slo.ttft_ms) / sent, 4) if sent else 0.0,
        "tpot_attainment": round(sum(1 for v in tpot if v <= slo.tpot_ms) / sent, 4) if sent else 0.0,
        "goodput": round(len(good) / trace.duration_s, 3),
        "met_slo": len(good),
        "replica_seconds": round(cost, 1),
        "replica_seconds_raw": cost,
        "direction_changes": len(changes),
        "direction_changes_steady": steady,
        "failed": sent - len(done),
        "lost": sum(1 for r in records if lost(r)),
        "failed_by_status": statuses,
        "cold_start": cold,
        "ttft_p50_ms": _round(percentile(ttft, 50)) if ttft else None,
        "ttft_p99_ms": _round(percentile(ttft, 99)) if ttft else None,
        "tpot_p50_ms": _round(percentile(tpot, 50)) if tpot else None,
        "tpot_p99_ms": _round(percentile(tpot, 99)) if tpot else None,
        "attainment_by_phase": by_phase,
        "max_live_replicas": max((s.live for s in samples), default=0),
        # whether the machine, not the replicas, could be what limits: its CPU over the run
        "cpu_busy_mean": round(sum(cpu) / len(cpu), 3) if cpu else None,
        "cpu_busy_p90": round(percentile(cpu, 90), 3) if cpu else None,
        "late_sends": late_sends(list(records)),
        "scale_events": [{"t": round(d["t"], 2), "from": d["from"], "to": d["to"], "rule": d["rule"]}
                         for d in sorted(decisions, key=lambda d: d["t"])],
        "attainment_bins": bins,
        "timeline": [[round(s.t, 2), s.live, s.ready, None if s.cpu is None else round(s.cpu, 3)] for s in samples],
    }
