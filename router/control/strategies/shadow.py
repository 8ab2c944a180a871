"""A shadow: the version runs beside the one that answers, gets no traffic, and is judged on replays.

1. start every replica and wait until all are ready; record the version active (its share stays 0%);
2. register it as the model's shadow (``router.traffic.shadow.Shadows``): from then on a sample of the
   model's requests is replayed to it after the client is answered, and the comparison fills its
   report (``GET /api/v1/deployments/{model}/shadow``);
3. ``promote`` (``POST .../shadow/promote``) ends the shadow and starts a canary of the version
   against the stable one: the canary machinery (``strategies/canary``) then runs as for a deploy.

One experiment per model at a time: a shadow is refused while the model has a running canary or
another shadow, and a promote while a canary runs (409).
"""

from __future__ import annotations

import logging

from router.control.canary_analysis import CanaryPolicy
from router.control.strategies.base import Rollout, Traffic, launch_and_wait, mark_active
from router.control.strategies.canary import CanaryRollout, CanaryState, CanaryStatus
from router.observe.samples import SampleWindows
from router.store import Conflict, DeploymentStatus, HistoryEntry, NotFound, Store
from router.traffic.shadow import Shadows, ShadowTarget

logger = logging.getLogger(__name__)

_HISTORY = 1000  # how far back ``restore`` reads a model's history for its shadow


class Shadow:
    def __init__(self, shadows: Shadows) -> None:
        self._shadows = shadows

    async def run(self, rollout: Rollout) -> None:
        await launch_and_wait(rollout)
        ready_s, stable = await mark_active(rollout)
        # the history first: it is what every router (this one after a restart too) follows (``restore``)
        await rollout.control.store.append_history(HistoryEntry(
            rollout.model_name, "shadow", rollout.actor,
            {"version": rollout.version, "sample_percent": rollout.plan.sample_percent, "primary": stable,
             "ready_after_s": round(ready_s, 2)}))
        if not self._shadows.is_shadow(rollout.model_name, rollout.version):  # a change feed may have been first
            self._shadows.add(rollout.model_name, rollout.version, rollout.plan.sample_percent,
                              predict=rollout.predict)
        logger.info("shadow %s:%s ready: %d%% of the requests replayed to it", rollout.model_name,
                    rollout.version, rollout.plan.sample_percent)


def _running_canary(canaries: dict[str, CanaryRollout], model_name: str) -> CanaryRollout | None:
    canary = canaries.get(model_name)
    if canary is not None and canary.state.status in (CanaryStatus.RUNNING, CanaryStatus.PAUSED):
        return canary
    return None


async def check_deploy(control: Traffic, shadows: Shadows, canaries: dict[str, CanaryRollout],
                       model_name: str, version: str) -> None:
    """A shadow needs a version answering the model's traffic, and no other experiment on the model (409)."""
    canary = _running_canary(canaries, model_name)
    if canary is not None:
        raise Conflict(f"{model_name}:{canary.state.canary_version} is a running canary; a shadow and a canary "
                       "at once on one model are refused: finish or abort the canary first")
    current = shadows.get(model_name)
    if current is not None:
        raise Conflict(f"{model_name}:{current.version} is already the shadow of {model_name!r}; promote it or "
                       "delete its version first")
    split = (await control.store.get_traffic(model_name)).split
    if not any(share > 0 for share in split.values()):
        raise Conflict(f"model {model_name!r} has no version with traffic: a shadow has nothing to be compared "
                       "with; deploy a version first")
    if split.get(version, 0) > 0:
        raise Conflict(f"{model_name}:{version} already answers traffic; a shadow must be a new version")


def require_shadow(shadows: Shadows, model_name: str) -> ShadowTarget:
    target = shadows.get(model_name)
    if target is None:
        raise NotFound(f"model {model_name!r} has no shadow version; deploy one with "
                       '"strategy": {"type": "shadow", "sample_percent": 10}', "model_name")
    return target


async def promote(control: Traffic, shadows: Shadows, canaries: dict[str, CanaryRollout], samples: SampleWindows,
                  model_name: str, policy: CanaryPolicy, actor: str, interval_s: float) -> CanaryRollout:
    """End the model's shadow and start a canary of its version against the version with most traffic."""
    target = require_shadow(shadows, model_name)
    canary = _running_canary(canaries, model_name)
    if canary is not None:
        raise Conflict(f"{model_name}:{canary.state.canary_version} is already a running canary")
    deployments = await control.store.list_deployments(model_name)
    if not any(d.version == target.version and d.status is DeploymentStatus.ACTIVE for d in deployments):
        shadows.remove(model_name)
        raise NotFound(f"{model_name}:{target.version} is no longer an active version; its shadow ended", "version")
    split = (await control.store.get_traffic(model_name)).split
    stable = max((v for v in split if split[v] > 0 and v != target.version), key=split.__getitem__, default=None)
    if stable is None:
        raise Conflict(f"model {model_name!r} has no other version with traffic to compare a canary with")
    state = CanaryState(model_name, target.version, stable, policy)
    rollout = CanaryRollout(control, samples, state, actor, interval_s)
    canaries[model_name] = rollout
    await control.store.append_history(HistoryEntry(  # ends the shadow on every router (``restore``)
        model_name, "shadow_promote", actor,
        {"version": target.version, "stable": stable, "report": {
            k: v for k, v in target.report.to_dict().items() if k != "examples"}}))
    shadows.remove(model_name)
    control.spawn(rollout.run(), name=f"canary {model_name}:{target.version}")
    return rollout


async def restore(store: Store, shadows: Shadows, model_name: str, predict: bool) -> None:
    """Make this router's shadow of the model what the store says, at start and after each change.

    The shadow is the version of the latest ``shadow`` entry of the model's history (its last 1,000
    entries), unless a later ``shadow_promote`` or ``delete`` of that version ended it, while that
    version is active with no share of the split. So a shadow outlives its router's restart and reaches
    every router on the store; each keeps its own report, of the requests it answers.
    """
    version: str | None = None
    sample = 0
    for entry in await store.history(model_name, limit=_HISTORY):
        if entry.action == "shadow":
            version, sample = entry.detail.get("version"), int(entry.detail.get("sample_percent", 0))
        elif entry.action in ("shadow_promote", "delete") and entry.detail.get("version") == version:
            version = None
    if version is not None:
        active = {d.version for d in await store.list_deployments(model_name) if d.status is DeploymentStatus.ACTIVE}
        if version not in active or (await store.get_traffic(model_name)).split.get(version, 0) > 0 \
                or not 1 <= sample <= 100:
            version = None
    current = shadows.get(model_name)
    if version is None:
        if current is not None:
            shadows.remove(model_name)
    elif current is None or current.version != version:
        shadows.add(model_name, version, sample, predict=predict)
