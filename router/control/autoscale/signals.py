"""Measure one version's ``Signals`` from what the router already holds: no new probes.

- replica states from the version's endpoints (the backend keeps them current);
- requests in flight per class, waiting for room and held for a cold start from ``Demand``;
- the engines' waiting queues, KV-cache use and running sequences from the scraped
  ``/metrics`` of each ready replica (``EngineMetricsScraper``; absent when metrics are off);
- p99 TTFT, time per output token and latency over ``window_s`` from ``SampleWindows``:
  the critical class when it has ``min_samples`` requests, else the standard one
  (batch latency never drives scaling: batch waits for spare capacity by design);
- a predict version: its "replicas" are its batcher's threads (``instances``), its queued
  rows count as waiting, and the threads' share of time spent in the model is its utilisation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from llmserve.replicas.backend import EndpointState
from llmserve.stats import percentile
from router.control.autoscale.policy import Signals
from router.observe.samples import SampleWindows
from router.traffic.catalog import ServedVersion
from router.traffic.demand import Demand

if TYPE_CHECKING:
    from router.observe.engine_metrics import EngineMetricsScraper


class SignalSource:
    def __init__(self, demand: Demand, samples: SampleWindows, engines: EngineMetricsScraper | None,
                 window_s: float = 60.0, min_samples: int = 20, clock: Callable[[], float] | None = None) -> None:
        self._demand = demand
        self._samples = samples
        self._engines = engines
        self._window_s = window_s
        self._min_samples = min_samples
        self._clock = clock or samples.now
        self._busy: dict[tuple[str, str], tuple[float, float]] = {}  # predict version -> (at, busy_s) last seen

    def measure(self, served: ServedVersion) -> Signals:
        states = [r.state for r in served.replicas]
        counts = self._demand.of(served.model_name, served.version)
        ready = sum(1 for s in states if s is EndpointState.READY)
        engine_waiting, utilisation = self._engine_load(served)
        if served.predictor is not None:  # its "replicas" are the batcher's threads
            ready = served.predictor.batcher.instances
            engine_waiting = float(served.predictor.batcher.queued_rows)
            utilisation = self._compute_share(served)
        start = self._clock() - self._window_s
        window = self._samples.latencies(served.model_name, served.version, start, ("critical",))
        if window.requests < self._min_samples:
            window = self._samples.latencies(served.model_name, served.version, start, ("critical", "standard"))
        return Signals(
            ready=ready,
            starting=sum(1 for s in states if s is EndpointState.STARTING),
            draining=sum(1 for s in states if s is EndpointState.DRAINING),
            in_flight=float(counts.interactive),
            batch_in_flight=float(counts.batch),
            queued=counts.waiting + counts.held,
            held=counts.held,
            engine_waiting=engine_waiting,
            utilisation=utilisation,
            ttft_p99_ms=percentile(window.ttft, 99) if window.ttft else None,
            itl_p99_ms=percentile(window.tpot, 99) if window.tpot else None,
            latency_p99_ms=percentile(window.total, 99) if window.total else None,
            samples=window.requests,
        )

    def _compute_share(self, served: ServedVersion) -> float | None:
        """The share of the batcher's threads' time spent running the model since the last look."""
        assert served.predictor is not None
        batcher, key, now = served.predictor.batcher, (served.model_name, served.version), self._clock()
        last = self._busy.get(key)
        self._busy[key] = (now, batcher.busy_s)
        if last is None or now <= last[0]:
            return None
        return min(1.0, (batcher.busy_s - last[1]) / ((now - last[0]) * batcher.instances))

    def _engine_load(self, served: ServedVersion) -> tuple[float, float | None]:
        """(requests waiting in the engines, mean utilisation over them: KV-cache use or busy share)."""
        if self._engines is None or served.replica_set is None:
            return 0.0, None
        values = self._engines.values_for(served.model_name, served.version)
        if not values:
            return 0.0, None
        seqs = max(served.replica_set.spec.max_num_seqs, 1)
        waiting = sum(v.get("vllm:num_requests_waiting", 0.0) for v in values)
        busy = [max(v.get("vllm:kv_cache_usage_perc", 0.0), v.get("vllm:num_requests_running", 0.0) / seqs)
                for v in values]
        return waiting, min(1.0, sum(busy) / len(busy))
