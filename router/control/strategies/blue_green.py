"""Blue/green: all traffic at once when every replica is ready and warm; the old versions stay
ready through a grace period (an instant rollback needs no start-up), then drain and retire.

The first version of a model has nothing to switch from: it is activated like ``direct``.
"""

from __future__ import annotations

import asyncio

from router.control.strategies.base import Rollout, launch_and_wait, mark_active
from router.control.strategies.direct import give_share
from router.store import DeploymentStatus, HistoryEntry


class BlueGreen:
    async def run(self, rollout: Rollout) -> None:
        await launch_and_wait(rollout)
        ready_s, stable = await mark_active(rollout)
        if stable is None:
            await give_share(rollout, rollout.plan.traffic_percent, ready_s)
            return
        grace_s = rollout.plan.grace_s
        await rollout.control.update_split(
            rollout.model_name, lambda _split: {rollout.version: 100},
            HistoryEntry(rollout.model_name, "blue_green_switch", rollout.actor,
                         {"version": rollout.version, "grace_s": grace_s}))
        rollout.control.spawn(_retire_after_grace(rollout, grace_s),
                              name=f"blue/green grace {rollout.model_name}:{rollout.version}")


async def _retire_after_grace(rollout: Rollout, grace_s: float) -> None:
    await asyncio.sleep(grace_s)
    control, model = rollout.control, rollout.model_name
    split = (await control.store.get_traffic(model)).split
    if split.get(rollout.version) != 100:
        return  # rolled back or re-split during the grace period: leave the others be
    for old in await control.store.list_deployments(model):
        if old.status is DeploymentStatus.ACTIVE and old.version != rollout.version:
            await control.store.update_deployment(old.id, DeploymentStatus.DRAINING)
            await control.store.append_history(HistoryEntry(model, "blue_green_retire", "blue_green",
                                                            {"version": old.version}))
            control.spawn(control.retire(old), name=f"retire {old.model_name}:{old.version}")
