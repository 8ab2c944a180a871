"""The shadows' replays as Prometheus metrics, read from their reports at scrape time.

Replays are kept out of every request metric (they build no request record), so they are counted
apart and labelled as what they are: ``llmserve_shadow_replays_total{model, version, outcome}``
with outcome ``sampled``, ``compared``, ``dropped_queue_full``, ``shed`` or ``unavailable``
(``version`` is the shadow's), and the current ratios shadow/primary as
``llmserve_shadow_ratio{model, version, signal}`` (``ttft``, ``tpot``, ``latency``).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from router.traffic.shadow import Shadows

OUTCOMES = ("sampled", "compared", "dropped_queue_full", "shed", "unavailable")


class ShadowCollector(Collector):
    def __init__(self, shadows: Shadows) -> None:
        self._shadows = shadows

    def collect(self) -> Iterator[Metric]:
        replays = CounterMetricFamily("llmserve_shadow_replays", "Requests replayed to a shadow version, by outcome",
                                      labels=["model", "version", "outcome"])
        ratios = GaugeMetricFamily("llmserve_shadow_ratio", "A shadow's paired ratio to the primary (geometric "
                                   "mean over its report's window)", labels=["model", "version", "signal"])
        for target in self._shadows.targets():
            for outcome in OUTCOMES:
                replays.add_metric([target.model_name, target.version, outcome], target.report.counts.get(outcome, 0))
            summary = target.report.ratios()
            for signal, value in summary.items():
                if value is not None:
                    ratios.add_metric([target.model_name, target.version, signal], value)
        yield replays
        yield ratios
