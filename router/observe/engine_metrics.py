"""The engines' own vLLM metrics, scraped by the router and re-exposed per version and replica.

One background loop scrapes every replica's ``/metrics`` every few seconds
(never on the request path, never inside a Prometheus scrape) and keeps the
latest values; the collector turns them into gauges labelled with model,
version and replica, so one Prometheus job on the router sees everything.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import aiohttp
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from llmserve.loops import PeriodicLoop
from llmserve.replicas.backend import EndpointState
from router.observe.engine_samples import ENGINE_SAMPLES, parse_engine_metrics
from router.traffic.catalog import Catalog

logger = logging.getLogger(__name__)

# engines that may answer /metrics (a starting one may not be listening yet)
_SCRAPED = (EndpointState.READY, EndpointState.UNHEALTHY, EndpointState.DRAINING)

class EngineMetricsScraper(Collector):
    def __init__(self, catalog: Catalog, interval_s: float = 5.0) -> None:
        self._catalog = catalog
        self._latest: dict[str, tuple[str, str, dict[str, float]]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._loop = PeriodicLoop("engine metrics scraper", interval_s, self._tick, on_close=self._close_session)

    def start(self) -> None:
        self._loop.start()

    async def close(self) -> None:
        await self._loop.close()

    async def _tick(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0), trust_env=False)
        await self.scrape_once(self._session)

    async def _close_session(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def scrape_once(self, session: aiohttp.ClientSession) -> None:
        seen = set()
        for model in self._catalog.models():
            for served in model.versions.values():
                for replica in served.replicas:
                    if replica.state not in _SCRAPED:
                        continue
                    seen.add(replica.id)
                    try:
                        async with session.get(f"{replica.url}/metrics") as response:
                            text = await response.text()
                    except (aiohttp.ClientError, asyncio.TimeoutError):
                        continue
                    try:
                        self._latest[replica.id] = (model.name, served.version, parse_engine_metrics(text))
                    except ValueError:
                        logger.warning("replica %s served metrics that do not parse", replica.id)
        for gone in set(self._latest) - seen:
            del self._latest[gone]

    def values_for(self, model: str, version: str) -> list[dict[str, float]]:
        """The latest scraped values of each replica of one version (for admission control)."""
        return [values for m, v, values in self._latest.values() if m == model and v == version]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families = {source: GaugeMetricFamily(name, text, labels=["model", "version", "replica"])
                    for source, (name, text) in ENGINE_SAMPLES.items()}
        for replica_id, (model, version, values) in self._latest.items():
            for source, value in values.items():
                families[source].add_metric([model, version, replica_id], value)
        yield from families.values()
