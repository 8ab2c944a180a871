"""The autoscaler loop: one decision per autoscaled version per period, applied through the store.

Each period, for every active version whose deployment carries a policy:

1. skip it while an operation drives it (a rollout, a rollback's drain):
   those own its replicas until they finish;
2. claim the version's lease in the store (``autoscale:<deployment id>``): with
   several routers on one Redis exactly one decides for a version at a time;
3. measure its ``Signals`` (``signals``) and ask ``desired_replicas``;
4. mode ``on``: write the desired count on the deployment record
   (``Store.set_scaling``); every router's reconciler then scales its own
   replica set to it through the replica backend (local processes here, a
   Deployment's replicas on Kubernetes), scale-downs draining first. Mode
   ``advisory``: the same decision, recorded and logged, not applied.

Every change (and every advisory one) goes into the model's history with its
evidence, is counted in ``llmserve_autoscale_decisions``, and the latest
decision of each version is readable at ``GET /api/v1/deployments/{m}/autoscaling``.
Requests held for a version at zero wake the loop at once (``wake``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from llmserve.loops import PeriodicLoop
from llmserve.settings import AutoscaleSettings
from router.control.autoscale.checks import cpu_budget
from router.control.autoscale.policy import (
    AutoscalingPolicy,
    Decision,
    Memory,
    Mode,
    PolicyError,
    desired_replicas,
    within_budget,
)
from router.control.autoscale.signals import SignalSource
from router.control.versions import LocalVersions
from router.observe.metrics import Metrics, NoMetrics
from router.store import DeploymentRecord, DeploymentStatus, HistoryEntry, Store
from router.traffic.cold_start import ColdStarts

logger = logging.getLogger(__name__)

ACTOR = "autoscaler"


class Scaled(Protocol):
    """What the autoscaler needs of the control plane."""

    store: Store
    versions: LocalVersions


@dataclass
class Latest:
    """A version's last decision and its evidence (the GET view)."""

    at: float
    policy: dict[str, Any]
    signals: dict[str, Any]
    decision: dict[str, Any]
    applied: bool
    acting_router: str


class Autoscaler:
    def __init__(self, control: Scaled, source: SignalSource, cold_starts: ColdStarts, router_id: str,
                 settings: AutoscaleSettings, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 leading: Callable[[], bool] = lambda: True) -> None:
        self._control = control
        self._source = source
        self._cold = cold_starts
        self._router_id = router_id
        self._settings = settings
        self._metrics: Metrics = metrics or NoMetrics()
        self._clock = clock
        self._wall = wall
        self._leading = leading  # on Kubernetes only the router holding the leader Lease decides
        self._cpu_budget = cpu_budget()
        self._memory: dict[str, Memory] = {}  # deployment id -> what its next decision needs of the past
        self._advised: dict[str, tuple[int, str]] = {}  # deployment id -> the advisory change last recorded
        self.latest: dict[tuple[str, str], Latest] = {}
        self._loop = PeriodicLoop("autoscaler", settings.interval_s, self.tick)

    def start(self) -> None:
        self._loop.start()

    async def close(self) -> None:
        await self._loop.close()

    def wake(self, _model: str = "", _version: str = "") -> None:
        """Decide now (demand arrived for a version with no replica)."""
        self._loop.wake()

    async def tick(self) -> None:
        for record in await self._control.store.list_deployments():
            if record.status is not DeploymentStatus.ACTIVE or not record.autoscaling:
                if record.status is not DeploymentStatus.ACTIVE:
                    self._cold.allow(record.model_name, record.version, False)
                    self._memory.pop(record.id, None)
                continue
            try:
                await self._decide(record)
            except PolicyError as exc:  # written by an older router, say: not this loop's to fix
                logger.warning("autoscaling of %s:%s skipped: %s", record.model_name, record.version, exc)

    async def _decide(self, record: DeploymentRecord) -> None:
        key = (record.model_name, record.version)
        policy = AutoscalingPolicy.from_dict(record.autoscaling)
        self._cold.allow(*key, policy.mode is Mode.ON and policy.min_replicas == 0)  # every router holds
        served = self._control.versions.get(key)
        if policy.mode is Mode.OFF or served is None or record.operation or not self._leading():
            return
        now = self._wall()
        if not await self._control.store.claim_lease(f"autoscale:{record.id}", self._router_id,
                                                     now + self._settings.lease_s, now):
            return  # another router acts for this version
        signals = self._source.measure(served)
        decision = desired_replicas(signals, record.replicas, policy, self._clock(), self._memory.get(record.id))
        if served.predictor is not None:
            decision = self._within_cpu_budget(decision, key)
        self._memory[record.id] = decision.memory
        applied = policy.mode is Mode.ON and decision.desired != record.replicas
        self.latest[key] = Latest(now, policy.to_dict(), signals.to_dict(), decision.to_dict(), applied,
                                  self._router_id)
        current = served.predictor.batcher.instances if served.predictor is not None else \
            len(served.replica_set.live) if served.replica_set is not None else 0
        self._metrics.autoscaled(*key, decision.desired, current, decision.direction, decision.rule, policy.mode.value)
        if decision.desired == record.replicas:
            self._advised.pop(record.id, None)
            return
        if policy.mode is Mode.ADVISORY:  # the same advice again each period is not news: recorded once
            advice = (decision.desired, decision.rule)
            if self._advised.get(record.id) == advice:
                return
            self._advised[record.id] = advice
        await self._record(record, decision, signals.to_dict(), policy.mode)
        if applied:
            await self._control.store.set_scaling(record.id, replicas=decision.desired)

    def _within_cpu_budget(self, decision: Decision, key: tuple[str, str]) -> Decision:
        others = sum(served.predictor.batcher.instances - 1 for other, served in self._control.versions.items()
                     if other != key and served.predictor is not None)
        return within_budget(decision, self._cpu_budget, others)

    async def _record(self, record: DeploymentRecord, decision: Decision, signals: dict[str, Any],
                      mode: Mode) -> None:
        verb = "scales" if mode is Mode.ON else "would scale (advisory)"
        logger.info("autoscaler: %s:%s %s %d -> %d (%s: %s)", record.model_name, record.version, verb,
                    decision.current, decision.desired, decision.rule, decision.reason)
        action = "autoscale" if mode is Mode.ON else "autoscale_advice"
        await self._control.store.append_history(HistoryEntry(
            record.model_name, action, ACTOR,
            {"version": record.version, **decision.to_dict(), "signals": signals, "router": self._router_id}))
