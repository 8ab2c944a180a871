"""Admission control: priority classes, saturation with hysteresis, and load shedding.

Every request has a class, ``critical``, ``standard`` or ``batch``: its API
key's default, or the ``X-Priority`` header within what the key allows (a
class it may not use is a 403, a malformed header a 400). With authentication
off, ``AdmissionSettings.anonymous`` says both.

A version is *saturated* when any of its signals passes its threshold: the
router's requests in flight per ready replica (immediate), the engines' own
waiting queues and KV-cache usage (scraped every few seconds), and recent
TTFT p90 against the SLO. It stops being saturated only once every signal is
below ``clear_ratio`` of its threshold and the state has held ``min_hold_s``,
so it does not flap at the boundary.

While the chosen version is saturated:

- ``critical`` goes to it anyway: the full model keeps its latency for them;
- ``standard`` goes to the model's fallback (a distilled student), saying so
  in ``X-Fallback`` and the response's ``model``; if the fallback is saturated
  too (or there is none) it waits up to ``queue_wait_s`` for room on either,
  then gets 429 with Retry-After;
- ``batch`` gets 429 at once, with Retry-After from the current drain rate.

A request that waited past its deadline (``X-Deadline-Ms``) gets 503 with
Retry-After. Nothing is dropped silently and nothing waits unbounded.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from llmserve.settings import PRIORITIES, AdmissionSettings
from llmserve.stats import percentile
from router.errors import APIError, DeadlineExceeded, InvalidRequest, PriorityForbidden, ShedLoad
from router.observe.metrics import Metrics, NoMetrics
from router.traffic.catalog import Catalog, ServedVersion
from router.traffic.demand import Demand

if TYPE_CHECKING:
    from router.observe.engine_metrics import EngineMetricsScraper
    from router.observe.samples import SampleWindows

logger = logging.getLogger(__name__)


class PriorityPolicy(Protocol):
    """What a caller's requests may ask for (``router.access.auth.Caller`` is one)."""

    @property
    def name(self) -> str: ...

    @property
    def priority(self) -> str: ...

    @property
    def priorities(self) -> tuple[str, ...]: ...

    def may_use(self, model: str) -> bool:
        """Whether a fallback to ``model`` may answer this caller (a key limited to some models)."""
        ...


def resolve_priority(headers: Mapping[str, str], policy: PriorityPolicy) -> str:
    """The request's class: the caller's default, or ``X-Priority`` within what the caller may use."""
    wanted = headers.get("x-priority")
    if wanted is None:
        return policy.priority
    value = wanted.strip().lower()
    if value not in PRIORITIES:
        raise InvalidRequest(f"X-Priority must be one of {', '.join(PRIORITIES)}, got {wanted!r}",
                             param="X-Priority")
    if value not in policy.priorities:
        raise PriorityForbidden(f"{policy.name} may not use priority {value!r}; allowed: "
                                f"{', '.join(policy.priorities)}", param="X-Priority")
    return value


@dataclass
class Saturation:
    saturated: bool = False
    changed_at: float = 0.0
    reasons: list[str] = field(default_factory=list)
    checked_at: float = -1.0


@dataclass(frozen=True)
class Admitted:
    served: ServedVersion
    fallback_from: str | None = None  # the model whose traffic this fallback takes


class Admission:
    def __init__(self, settings: AdmissionSettings, catalog: Catalog, samples: SampleWindows,
                 engines: EngineMetricsScraper | None = None, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.monotonic, demand: Demand | None = None) -> None:
        self.settings = settings
        self._catalog = catalog
        self._samples = samples
        self._engines = engines
        self._metrics: Metrics = metrics or NoMetrics()
        self._clock = clock
        self._state: dict[tuple[str, str], Saturation] = {}
        self._demand = demand or Demand()

    # -- signals --------------------------------------------------------------

    def signals(self, served: ServedVersion) -> dict[str, float]:
        """Each signal as a fraction of its threshold (1.0 = at the threshold)."""
        s = self.settings
        ready = served.ready_replicas or served.replicas
        n = max(len(ready), 1)
        values = {"outstanding": sum(r.outstanding for r in served.replicas) / n / s.max_outstanding_per_replica}
        if self._engines is not None:
            engine = self._engines.values_for(served.model_name, served.version)
            if engine:
                values["engine_waiting"] = (sum(v.get("vllm:num_requests_waiting", 0.0) for v in engine)
                                            / len(engine) / s.max_engine_waiting)
                values["kv_cache"] = max(v.get("vllm:kv_cache_usage_perc", 0.0) for v in engine) / s.max_kv_cache_usage
        # Slow answers count only while work is queueing here: TTFT over the SLO at low concurrency means
        # slow hardware, not overload, and refusing requests would not make it faster (seen on a 2-core box:
        # four users and two engines put TTFT p90 over 500 ms with nothing queued).
        if values["outstanding"] >= 0.5:
            ttfts, _, _ = self._samples.since(served.model_name, served.version, self._clock() - s.ttft_window_s)
            if len(ttfts) >= 10:
                values["ttft_p90"] = percentile(ttfts, 90) / s.ttft_slo_ms
        return values

    def saturation(self, served: ServedVersion) -> Saturation:
        """The version's state, with hysteresis; re-evaluated at most every 50 ms."""
        key = (served.model_name, served.version)
        state = self._state.setdefault(key, Saturation())
        now = self._clock()
        if now - state.checked_at < 0.05:
            return state
        state.checked_at = now
        signals = self.signals(served)
        over = [name for name, value in signals.items() if value >= 1.0]
        if not state.saturated and over:
            state.saturated, state.changed_at, state.reasons = True, now, over
        elif state.saturated:
            if over:
                state.reasons = over
            elif all(v < self.settings.clear_ratio for v in signals.values()) \
                    and now - state.changed_at >= self.settings.min_hold_s:
                state.saturated, state.changed_at, state.reasons = False, now, []
        return state

    def retry_after_s(self, served: ServedVersion) -> int:
        """Seconds until the work in flight drains at the recent completion rate (1 to 60)."""
        window = 10.0
        _, _, done = self._samples.since(served.model_name, served.version, self._clock() - window)
        in_flight = sum(r.outstanding for r in served.replicas)
        rate = done / window
        if rate <= 0:
            return 5
        return max(1, min(60, math.ceil(in_flight / rate)))

    # -- the decision -----------------------------------------------------------

    async def admit(self, served: ServedVersion, priority: str, user: str | None,
                    deadline_s: float | None = None, may_use: Callable[[str], bool] | None = None) -> Admitted:
        """Where this request goes, or a ShedLoad or DeadlineExceeded error. ``deadline_s``: seconds it may wait."""
        if not self.settings.enabled or priority == "critical" or not self.saturation(served).saturated:
            self.count(served.model_name, priority, "full")
            return Admitted(served)
        if priority == "batch":
            self.count(served.model_name, priority, "rejected")
            raise ShedLoad(f"{served.versioned_name} is saturated ({', '.join(self.saturation(served).reasons)}); "
                            "batch traffic is refused until it drains", self.retry_after_s(served))
        fallback = self.fallback_for(served, user, may_use)
        if fallback is not None and not self.saturation(fallback).saturated:
            self.count(served.model_name, priority, "fallback")
            return Admitted(fallback, fallback_from=served.model_name)
        # Both saturated: wait (bounded) for room on either; counted as waiting, the autoscaler's queue signal.
        counts = self._demand.of(served.model_name, served.version)
        counts.waiting += 1
        try:
            return await self._wait_for_room(served, fallback, priority, deadline_s)
        finally:
            counts.waiting -= 1

    async def _wait_for_room(self, served: ServedVersion, fallback: ServedVersion | None, priority: str,
                             deadline_s: float | None) -> Admitted:
        started = self._clock()
        limit = self.settings.queue_wait_s if deadline_s is None else min(self.settings.queue_wait_s, deadline_s)
        while self._clock() - started < limit:
            # a poll: saturation comes from scraped engine metrics and TTFT windows too, which notify nobody
            await asyncio.sleep(self.settings.recheck_s)
            if not self.saturation(served).saturated and self._has_room(served):
                self.count(served.model_name, priority, "full")
                return Admitted(served)
            if fallback is not None and not self.saturation(fallback).saturated and self._has_room(fallback):
                self.count(served.model_name, priority, "fallback")
                return Admitted(fallback, fallback_from=served.model_name)
        if deadline_s is not None and deadline_s <= self.settings.queue_wait_s:
            self.count(served.model_name, priority, "expired")
            raise DeadlineExceeded(f"{served.versioned_name} stayed saturated past the request's deadline",
                       self.retry_after_s(served))
        self.count(served.model_name, priority, "rejected")
        where = f"{served.versioned_name} and its fallback are" if fallback else f"{served.versioned_name} is"
        raise ShedLoad(f"{where} saturated; waited {limit:.1f}s for room", self.retry_after_s(served))

    def _has_room(self, served: ServedVersion) -> bool:
        """Whether one more waiting request may go to ``served`` now that saturation has cleared.

        Without it every waiter sees the same cached "clear" within one re-check and all go at once:
        found by the soak, 40 requests a replica against a threshold of 16 saturated it again at once,
        and the 2 s hold that follows refused a third of the traffic for minutes. So a waiter goes only
        while the version's requests in flight, counted live (each one admitted is counted before the
        next waiter looks), are under ``clear_ratio`` of its threshold: still clear when they land.
        """
        ready = max(len(served.ready_replicas or served.replicas), 1)
        target = self.settings.clear_ratio * self.settings.max_outstanding_per_replica * ready
        return sum(r.outstanding for r in served.replicas) < target

    def fallback_for(self, served: ServedVersion, user: str | None,
                     may_use: Callable[[str], bool] | None = None) -> ServedVersion | None:
        """The version of ``served``'s fallback model that would answer this user, if one can (and the
        caller may use it: a key limited to some models never lands on another)."""
        name = self.settings.fallbacks.get(served.model_name)
        if name is None or self._catalog.find(name) is None or (may_use is not None and not may_use(name)):
            return None
        try:
            candidate = self._catalog.resolve(name, None, user, retry_after_s=1, predict=served.predictor is not None)
        except APIError:
            return None
        return candidate if candidate.can_answer else None

    def count(self, model: str, priority: str, outcome: str) -> None:
        if outcome in ("rejected", "expired"):
            logger.info("admission: %s request to %s %s", priority, model, outcome)
        self._metrics.admission_outcome(model, priority, outcome)


def parse_deadline_ms(raw: object, where: str, param: str) -> float | None:
    """A deadline in milliseconds (header or body parameter); ``where`` names it in the error."""
    if raw is None:
        return None
    try:
        value = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InvalidRequest(f"the deadline ({where}) must be a number of milliseconds", param=param) from None
    if not value > 0:
        raise InvalidRequest(f"the deadline ({where}) must be above 0 ms", param=param)
    return value


def deadline_s(headers: Mapping[str, str]) -> float | None:
    value = parse_deadline_ms(headers.get("x-deadline-ms"), "X-Deadline-Ms", "X-Deadline-Ms")
    return None if value is None else value / 1000


async def admit_request(admission: Admission | None, headers: Mapping[str, str], served: ServedVersion,
                        user: str | None, policy: PriorityPolicy,
                        priority: str | None = None) -> tuple[ServedVersion, dict[str, str]]:
    """The version that answers (the chosen one or its fallback) and the headers that say so; ``priority``:
    a class the router chose for the request (an async job's ``batch``), instead of X-Priority's."""
    if admission is None:
        return served, {}
    priority = priority or resolve_priority(headers, policy)
    admitted = await admission.admit(served, priority, user, deadline_s(headers), policy.may_use)
    extra = {"x-priority": priority}
    if admitted.fallback_from is not None:
        extra["x-fallback"] = admitted.served.versioned_name
    return admitted.served, extra
