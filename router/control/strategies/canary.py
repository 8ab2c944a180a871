"""A canary rollout: step the new version's traffic up while the analysis says it is healthy.

Loop, per step of the policy (for example 5%, 25%, 50%, 100%):
1. give the canary the step's share (taken from the others in proportion);
2. bake: wait ``bake_s``, then analyse the window since the step began
   (TTFT of this step; errors since the rollout began) every ``interval_s``;
3. PROMOTE -> next step; ROLLBACK -> the control plane's instant rollback to
   stable; HOLD -> keep waiting.
Each promote or rollback decision is written to the history with its
evidence; the latest evidence is readable at ``/api/v1/deployments/{model}/canary``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from router.control.canary_analysis import CanaryPolicy, Decision, analyze
from router.control.strategies.base import Rollout, Traffic, launch_and_wait, mark_active
from router.control.strategies.direct import give_share
from router.observe.samples import SampleWindows
from router.store import HistoryEntry
from router.traffic.split import rebalance

logger = logging.getLogger(__name__)


class CanaryStatus(str, enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"
    ABORTED = "aborted"


class Command(str, enum.Enum):
    ABORT = "abort"
    PROMOTE = "promote"


class Canary:
    """The strategy: start every replica, then step the traffic up under ``CanaryRollout``.

    The first version of a model has no stable version to compare with: it is activated like ``direct``.
    """

    def __init__(self, samples: SampleWindows, rollouts: dict[str, CanaryRollout], interval_s: float = 0.5) -> None:
        self._samples = samples
        self._rollouts = rollouts  # the latest per model, readable at /api/v1/deployments/{model}/canary
        self._interval_s = interval_s

    async def run(self, rollout: Rollout) -> None:
        await launch_and_wait(rollout)
        ready_s, stable = await mark_active(rollout)
        policy = rollout.plan.canary
        if stable is None or policy is None:
            await give_share(rollout, rollout.plan.traffic_percent, ready_s)
            return
        state = CanaryState(rollout.model_name, rollout.version, stable, policy)
        canary = CanaryRollout(rollout.control, self._samples, state, rollout.actor, self._interval_s)
        self._rollouts[rollout.model_name] = canary
        await canary.run()  # in the rollout's task: its lease on the deployment lasts until the canary ends


@dataclass
class CanaryState:
    model_name: str
    canary_version: str
    stable_version: str
    policy: CanaryPolicy
    status: CanaryStatus = CanaryStatus.RUNNING
    step: int = 0
    decisions: list[dict[str, Any]] = field(default_factory=list)
    latest: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name, "canary_version": self.canary_version,
            "stable_version": self.stable_version, "status": self.status.value, "step_percent": self.step,
            "policy": {**self.policy.__dict__, "steps": list(self.policy.steps)},
            "latest_analysis": self.latest, "decisions": self.decisions,
        }


class CanaryRollout:
    def __init__(
        self,
        control: Traffic,
        samples: SampleWindows,
        state: CanaryState,
        actor: str,
        interval_s: float = 0.5,
    ) -> None:
        self._control = control
        self._samples = samples
        self.state = state
        self._actor = actor
        self._interval_s = interval_s
        self._unpaused = asyncio.Event()
        self._unpaused.set()
        self._wake = asyncio.Event()
        self._command: Command | None = None

    # -- manual control -------------------------------------------------------

    def pause(self) -> None:
        self._require_active()
        self.state.status = CanaryStatus.PAUSED
        self._unpaused.clear()

    def resume(self) -> None:
        self._require_active()
        self.state.status = CanaryStatus.RUNNING
        self._unpaused.set()

    def promote_now(self) -> None:
        self._require_active()
        self._command = Command.PROMOTE
        self._wake.set()
        self._unpaused.set()
        self.state.status = CanaryStatus.RUNNING

    def abort(self) -> None:
        self._require_active()
        self._command = Command.ABORT
        self._wake.set()
        self._unpaused.set()

    def _require_active(self) -> None:
        if self.state.status not in (CanaryStatus.RUNNING, CanaryStatus.PAUSED):
            raise ValueError(f"the canary is {self.state.status.value}; nothing to change")

    async def _wait(self, seconds: float) -> Command | None:
        """Sleep, waking early for a manual command; stay here while paused. Returns the command."""
        self._wake.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)
        await self._unpaused.wait()
        command, self._command = self._command, None
        return command

    async def run(self) -> None:
        try:
            await self._steps()
        except asyncio.CancelledError:  # a rollback from elsewhere, or the router stopping
            if self.state.status in (CanaryStatus.RUNNING, CanaryStatus.PAUSED):
                self.state.status = CanaryStatus.ABORTED
            raise

    async def _steps(self) -> None:
        s = self.state
        began = self._samples.now()
        for step in s.policy.steps:
            s.step = step
            await self._control.update_split(
                s.model_name, partial(rebalance, version=s.canary_version, percent=step),
                HistoryEntry(s.model_name, "canary_step", self._actor, {"version": s.canary_version, "percent": step}),
            )
            if step == 100:
                s.status = CanaryStatus.PROMOTED  # the split above is already in effect
                logger.info("canary %s:%s promoted to 100%%", s.model_name, s.canary_version)
                return
            step_began = self._samples.now()
            command = await self._wait(s.policy.bake_s)
            while True:
                if command is Command.ABORT:
                    await self._record_manual(Command.ABORT)
                    await self._control.rollback(s.model_name, s.stable_version, f"canary abort ({self._actor})")
                    s.status = CanaryStatus.ABORTED  # only once the rollback is in effect
                    return
                if command is Command.PROMOTE:
                    await self._record_manual(Command.PROMOTE)
                    break
                decision = await self._analyze(began, step_began)
                if decision is Decision.ROLLBACK:
                    await self._control.rollback(s.model_name, s.stable_version, f"canary ({self._actor})")
                    s.status = CanaryStatus.ROLLED_BACK  # only once the rollback is in effect
                    logger.warning("canary %s:%s rolled back at %d%%: %s", s.model_name, s.canary_version, step,
                                   (s.latest or {}).get("reason"))
                    return
                if decision is Decision.PROMOTE:
                    break
                command = await self._wait(self._interval_s)

    async def _record_manual(self, command: Command) -> None:
        s, action = self.state, command.value
        entry = {"step_percent": s.step, "decision": action, "reason": f"manual {action}", "manual": True}
        s.decisions.append(entry)
        await self._control.store.append_history(HistoryEntry(s.model_name, f"canary_{action}", self._actor, entry))

    async def _analyze(self, began: float, step_began: float) -> Decision:
        s = self.state
        stable_ttft, _, _ = self._samples.since(s.model_name, s.stable_version, step_began)
        canary_ttft, _, _ = self._samples.since(s.model_name, s.canary_version, step_began)
        _, stable_failed, stable_total = self._samples.since(s.model_name, s.stable_version, began)
        _, canary_failed, canary_total = self._samples.since(s.model_name, s.canary_version, began)
        evidence = analyze(stable_ttft, canary_ttft, stable_failed, canary_failed, s.policy,
                           stable_total, canary_total, step_elapsed_s=self._samples.now() - step_began)
        s.latest = {"step_percent": s.step, **evidence.to_dict()}
        if evidence.decision is not Decision.HOLD:
            s.decisions.append(s.latest)
            await self._control.store.append_history(
                HistoryEntry(s.model_name, f"canary_{evidence.decision.value}", "canary", s.latest))
        return evidence.decision
