"""Prometheus metrics of the router, in a registry owned by the app (no global state).

Request metrics are labelled by model, version, route and status only: never
by user or request id, so cardinality stays bounded. Latency buckets include
the design's SLO bounds (50 ms for lightweight models, 500 ms for TTFT).
Replica and traffic gauges are read from the catalog when scraped, and the
count of the event loop's asyncio tasks from the loop (a task leak shows as a
count that climbs under steady load; memory and file descriptors are visible
from outside the process, tasks are not).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from router.observe.request_record import RequestRecord
    from router.traffic.catalog import Catalog

BATCH_ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
PREDICT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)


class _CatalogCollector(Collector):
    """Per-replica and per-version state, read from the catalog at scrape time."""

    def __init__(self, catalog: Catalog) -> None:
        self._catalog = catalog

    def collect(self) -> Iterator[GaugeMetricFamily]:
        outstanding = GaugeMetricFamily("llmserve_replica_outstanding_requests",
                                        "Requests in flight from this router to each replica",
                                        labels=["model", "version", "replica"])
        ready = GaugeMetricFamily("llmserve_replica_ready", "1 if the replica receives traffic",
                                  labels=["model", "version", "replica"])
        share = GaugeMetricFamily("llmserve_traffic_share_percent", "Traffic split per version",
                                  labels=["model", "version"])
        for model in self._catalog.models():
            for version, percent in model.split.items():
                share.add_metric([model.name, version], float(percent))
            for served in model.versions.values():
                for replica in served.replicas:
                    labels = [model.name, served.version, replica.id]
                    outstanding.add_metric(labels, float(replica.outstanding))
                    ready.add_metric(labels, 1.0 if replica.routable else 0.0)
        yield outstanding
        yield ready
        yield share


class _LoopCollector(Collector):
    """The asyncio tasks alive in the event loop that scrapes (the router's one loop), counted at scrape time."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        tasks = GaugeMetricFamily("llmserve_router_asyncio_tasks",
                                  "asyncio tasks alive in the router's event loop (the scrape's own included)")
        try:
            tasks.add_metric([], float(len(asyncio.all_tasks())))
        except RuntimeError:  # collected outside a running loop (a test calling exposition()): no sample
            pass
        yield tasks


class RouterMetrics:
    def __init__(self, catalog: Catalog) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["model", "version"]
        self.requests = Counter("llmserve_requests", "Inference requests answered, the router's own refusals "
                                "included (model and version empty when the request named none that is served)",
                                ["model", "version", "route", "status"], registry=self.registry)
        self.http_responses = Counter("llmserve_http_responses", "Every HTTP response, by route template",
                                      ["method", "route", "status"], registry=self.registry)
        self.in_flight = Gauge("llmserve_requests_in_flight", "Inference requests being served",
                               labels, registry=self.registry)
        self.ttft = Histogram("llmserve_time_to_first_token_seconds", "Time to first token, as the router sees it",
                              labels, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("llmserve_inter_token_latency_seconds", "Gaps between streamed chunks",
                             labels, buckets=TOKEN_GAP_BUCKETS, registry=self.registry)
        self.tpot = Histogram("llmserve_time_per_output_token_seconds", "(E2E - TTFT) / (output tokens - 1)",
                              labels, buckets=TOKEN_GAP_BUCKETS, registry=self.registry)
        self.e2e = Histogram("llmserve_e2e_latency_seconds", "Request latency from arrival to the last byte",
                             ["model", "version", "route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.output_tokens = Counter("llmserve_output_tokens", "Generated tokens", labels, registry=self.registry)
        self.predict_queue = Histogram("llmserve_predict_queue_seconds", "Time a predict request waited for its batch",
                                       labels, buckets=PREDICT_BUCKETS, registry=self.registry)
        self.predict_compute = Histogram("llmserve_predict_compute_seconds", "Model time per batch",
                                         labels, buckets=PREDICT_BUCKETS, registry=self.registry)
        self.predict_batch_rows = Histogram("llmserve_predict_batch_rows", "Rows per batch run by the model",
                                            labels, buckets=BATCH_ROWS_BUCKETS, registry=self.registry)
        self.predict_rows = Counter("llmserve_predict_rows", "Rows predicted", labels, registry=self.registry)
        self.predict_rejected = Counter("llmserve_predict_rejected", "Predict requests refused at admission",
                                        ["model", "version", "status"], registry=self.registry)
        self.admission = Counter("llmserve_admission", "Requests by priority class and what admission did: "
                                 "full (the chosen model), fallback, rejected (429), expired (503)",
                                 ["model", "priority", "outcome"], registry=self.registry)
        # per API key: its id, never the secret (the secret is in no label, log or row)
        self.key_requests = Counter("llmserve_key_requests", "Inference requests by API key id and status",
                                    ["key_id", "status"], registry=self.registry)
        self.key_tokens_used = Counter("llmserve_key_tokens", "Tokens (rows for predict) charged to an API key",
                                       ["key_id"], registry=self.registry)
        self.key_refusals = Counter("llmserve_key_rate_limited", "Requests refused by a key's RPM or TPM limit",
                                    ["key_id", "limit"], registry=self.registry)
        self.desired_replicas = Gauge("llmserve_autoscale_desired_replicas", "Replicas the autoscaler wants",
                                      labels, registry=self.registry)
        self.current_replicas = Gauge("llmserve_autoscale_current_replicas", "Replicas live on this router "
                                      "(ready, starting or draining) when the autoscaler last decided",
                                      labels, registry=self.registry)
        self.scale_decisions = Counter("llmserve_autoscale_decisions", "Autoscaler changes by direction and the "
                                       "rule that fired (advisory ones too: mode label)",
                                       ["model", "version", "direction", "rule", "mode"], registry=self.registry)
        self.cold_start_wait = Histogram("llmserve_cold_start_wait_seconds", "How long requests were held for "
                                         "a version to start from zero", labels, buckets=LATENCY_BUCKETS,
                                         registry=self.registry)
        self.batch_lines = Counter("llmserve_batch_lines", "Lines of batches (the Batch API) by outcome: completed "
                                   "(2xx), failed, refused (put back: the batch band was shed)", ["outcome"],
                                   registry=self.registry)
        self.batches_finished = Counter("llmserve_batches_finished", "Batches finished by this router, by final "
                                        "status", ["status"], registry=self.registry)
        self.batch_window = Gauge("llmserve_batch_window", "Lines the batches running on this router may have in "
                                  "flight now (the sum of their AIMD windows; 0 while paused)", registry=self.registry)
        self.batches_running = Gauge("llmserve_batches_running", "Batches this router runs now",
                                     registry=self.registry)
        self.registry.register(_CatalogCollector(catalog))
        self.registry.register(_LoopCollector())

    enabled = True

    def batch_line(self, outcome: str) -> None:
        self.batch_lines.labels(outcome).inc()

    def batch_finished(self, status: str) -> None:
        self.batches_finished.labels(status).inc()

    def batch_load(self, running: int, window: float) -> None:
        self.batches_running.set(running)
        self.batch_window.set(window)

    def key_refused(self, key_id: str, limit: str) -> None:
        self.key_refusals.labels(key_id, limit).inc()

    def key_tokens(self, key_id: str, tokens: int) -> None:
        self.key_tokens_used.labels(key_id).inc(tokens)

    def batch_observer(self, model: str, version: str) -> _BatchMetrics | None:
        return _BatchMetrics(self, model, version)

    def http_response(self, method: str, route: str, status: int) -> None:
        self.http_responses.labels(method, route, str(status)).inc()

    def predict_refused(self, model: str, version: str, status: int) -> None:
        self.predict_rejected.labels(model, version, str(status)).inc()

    def admission_outcome(self, model: str, priority: str, outcome: str) -> None:
        self.admission.labels(model, priority, outcome).inc()

    def autoscaled(self, model: str, version: str, desired: int, current: int, direction: str, rule: str,
                   mode: str) -> None:
        self.desired_replicas.labels(model, version).set(desired)
        self.current_replicas.labels(model, version).set(current)
        if direction != "hold":
            self.scale_decisions.labels(model, version, direction, rule, mode).inc()

    def cold_start_held(self, model: str, version: str, waited_s: float) -> None:
        self.cold_start_wait.labels(model, version).observe(waited_s)

    def started(self, model: str, version: str) -> None:
        self.in_flight.labels(model, version).inc()

    def inter_token_gaps(self, model: str, version: str, gaps_s: list[float]) -> None:
        itl = self.itl.labels(model, version)
        for gap in gaps_s:
            itl.observe(gap)

    def finished(self, record: RequestRecord, latency_s: float, counted_in_flight: bool) -> None:
        model, version = record.model, record.version
        if counted_in_flight:
            self.in_flight.labels(model, version).dec()
        self.requests.labels(model, version, record.route, str(record.status_code)).inc()
        if record.key_id is not None:
            self.key_requests.labels(record.key_id, str(record.status_code)).inc()
        self.e2e.labels(model, version, record.route).observe(latency_s)
        ttft = record.ttft_ms
        if ttft is not None:
            self.ttft.labels(model, version).observe(ttft / 1000)
        self.inter_token_gaps(model, version, record.gaps_s)
        if record.output_tokens:
            self.output_tokens.labels(model, version).inc(record.output_tokens)
            if ttft is not None and record.output_tokens > 1:
                self.tpot.labels(model, version).observe(
                    (latency_s - ttft / 1000) / (record.output_tokens - 1))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class NoMetrics:
    """The metrics of a router that runs without them (``metrics_enabled: false``): every call is a no-op."""

    enabled = False

    def batch_observer(self, model: str, version: str) -> _BatchMetrics | None:
        return None

    def http_response(self, method: str, route: str, status: int) -> None:
        return None

    def predict_refused(self, model: str, version: str, status: int) -> None:
        return None

    def admission_outcome(self, model: str, priority: str, outcome: str) -> None:
        return None

    def autoscaled(self, model: str, version: str, desired: int, current: int, direction: str, rule: str,
                   mode: str) -> None:
        return None

    def cold_start_held(self, model: str, version: str, waited_s: float) -> None:
        return None

    def key_refused(self, key_id: str, limit: str) -> None:
        return None

    def batch_line(self, outcome: str) -> None:
        return None

    def batch_finished(self, status: str) -> None:
        return None

    def batch_load(self, running: int, window: float) -> None:
        return None

    def key_tokens(self, key_id: str, tokens: int) -> None:
        return None

    def started(self, model: str, version: str) -> None:
        return None

    def inter_token_gaps(self, model: str, version: str, gaps_s: list[float]) -> None:
        return None

    def finished(self, record: RequestRecord, latency_s: float, counted_in_flight: bool) -> None:
        return None


Metrics = RouterMetrics | NoMetrics


class _BatchMetrics:
    """The batcher's per-batch figures, for one model version."""

    def __init__(self, metrics: RouterMetrics, model: str, version: str) -> None:
        self._queue = metrics.predict_queue.labels(model, version)
        self._compute = metrics.predict_compute.labels(model, version)
        self._rows_hist = metrics.predict_batch_rows.labels(model, version)
        self._rows = metrics.predict_rows.labels(model, version)

    def batch_done(self, rows: int, queue_s: list[float], compute_s: float) -> None:
        for wait in queue_s:
            self._queue.observe(wait)
        self._compute.observe(compute_s)
        self._rows_hist.observe(rows)
        self._rows.inc(rows)
