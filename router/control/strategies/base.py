"""What every rollout strategy shares: the plan, the context it runs in, and the steps before traffic.

A deploy is recorded as ``deploying``; the strategy then starts the version's
replicas and decides how it earns its traffic. A strategy raises
``RolloutFailed(reason)`` when the version cannot serve: the control plane
stops what was started, records ``failed`` with the reason, and the traffic
is untouched.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from llmserve.errors import LLMServeError
from router.control.canary_analysis import CanaryPolicy
from router.control.leases import Leases
from router.control.versions import LocalVersions
from router.store import DeploymentRecord, DeploymentStatus, HistoryEntry, Store, TrafficRecord
from router.traffic.catalog import ServedVersion

logger = logging.getLogger(__name__)

SplitChange = Callable[[dict[str, int]], dict[str, int]]


class StrategyType(str, enum.Enum):
    DIRECT = "direct"  # its traffic_percent once every replica is ready
    CANARY = "canary"  # stepped up while the analysis allows
    BLUE_GREEN = "blue_green"  # 100% at once when ready; the old version kept ready for grace_s
    ROLLING = "rolling"  # the stable version's replicas replaced one at a time
    SHADOW = "shadow"  # no traffic: a sample of the requests replayed to it and compared (strategies/shadow)


@dataclass(frozen=True)
class RolloutPlan:
    """How a new version earns its traffic; made from the API's ``strategy`` object."""

    type: StrategyType = StrategyType.DIRECT
    traffic_percent: int = 0
    canary: CanaryPolicy | None = None
    grace_s: float = 300.0
    sample_percent: int = 0  # shadow: the share of the model's requests replayed to it


class RolloutFailed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Traffic(Protocol):
    """What a strategy may do to a model's traffic and versions (the ``ControlPlane``)."""

    store: Store
    versions: LocalVersions
    leases: Leases

    async def update_split(self, model_name: str, change: SplitChange, entry: HistoryEntry) -> TrafficRecord: ...

    async def rollback(self, model_name: str, to_version: str | None, actor: str) -> Any: ...

    async def retire(self, record: DeploymentRecord) -> None: ...

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> Any: ...


@dataclass
class Rollout:
    """One deploy in progress."""

    record: DeploymentRecord
    plan: RolloutPlan
    actor: str
    predict: bool  # a traditional model: loaded in the router, no replicas
    control: Traffic
    started: float = field(default_factory=time.monotonic)

    @property
    def model_name(self) -> str:
        return self.record.model_name

    @property
    def version(self) -> str:
        return self.record.version


class RolloutStrategy(Protocol):
    async def run(self, rollout: Rollout) -> None: ...


async def launch(rollout: Rollout, replicas: int | None = None) -> ServedVersion:
    try:
        return await rollout.control.versions.launch(rollout.record, rollout.predict, replicas)
    except LLMServeError as exc:  # not prepared, settings that do not fit, a file that does not load
        raise RolloutFailed(str(exc)) from None


async def launch_and_wait(rollout: Rollout) -> ServedVersion:
    """Start every replica and wait until all are ready."""
    served = await launch(rollout)
    try:
        await rollout.control.versions.wait_ready(served)
    except LLMServeError as exc:
        raise RolloutFailed(str(exc)) from None
    return served


async def mark_active(rollout: Rollout) -> tuple[float, str | None]:
    """Every replica is ready: record the version active; returns (seconds to ready, the stable version)."""
    control = rollout.control
    await control.store.update_deployment(rollout.record.id, DeploymentStatus.ACTIVE)
    ready_s = time.monotonic() - rollout.started
    logger.info("deployment %s:%s ready in %.1fs", rollout.model_name, rollout.version, ready_s)
    split = (await control.store.get_traffic(rollout.model_name)).split
    stable = max((v for v in split if split[v] > 0 and v != rollout.version), key=split.__getitem__, default=None)
    return ready_s, stable
