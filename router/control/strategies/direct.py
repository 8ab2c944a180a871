"""Direct: once every replica is ready, the version gets its ``traffic_percent`` (the others shrink in proportion)."""

from __future__ import annotations

from router.control.strategies.base import Rollout, launch_and_wait, mark_active
from router.store import HistoryEntry
from router.traffic.split import rebalance


class Direct:
    async def run(self, rollout: Rollout) -> None:
        await launch_and_wait(rollout)
        ready_s, _stable = await mark_active(rollout)
        await give_share(rollout, rollout.plan.traffic_percent, ready_s)


async def give_share(rollout: Rollout, percent: int, ready_s: float) -> None:
    version = rollout.version
    await rollout.control.update_split(
        rollout.model_name, lambda split: rebalance(split, version, percent),
        HistoryEntry(rollout.model_name, "activate", rollout.actor,
                     {"version": version, "traffic_percent": percent, "ready_after_s": round(ready_s, 2)}),
    )
