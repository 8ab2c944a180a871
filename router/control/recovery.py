"""Settle the operations whose router died mid-way: deterministically, the same on every router.

An interrupted rollout is **rolled back**, not resumed: the evidence a canary
was judged on (its samples, its step's bake time) died with the router that
held it, and promoting a version without that evidence is what a canary
exists to prevent. Deploy again to retry it. The one exception is a rollout
that already holds all of its model's traffic: it is complete in effect, and
rolling it back would leave nothing serving. An interrupted drain is
**finished** when the traffic had already moved away, and **dropped** when it
had not (the rollback never took effect; the version keeps its traffic).

Every settlement is one history entry (``rollout_interrupted`` or
``retire_interrupted``) naming the router that was driving it, so no version
is left active at 0% with nobody knowing.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping
from functools import partial

from router.control.leases import RETIRE, Leases, orphaned
from router.control.strategies.base import Traffic
from router.store import DeploymentRecord, DeploymentStatus, HistoryEntry
from router.traffic.split import rebalance

logger = logging.getLogger(__name__)


class Settlement(str, enum.Enum):
    FAIL = "failed"  # a deploy that never became active: failed, its replicas stopped
    ROLL_BACK = "rolled_back"  # an active version mid-rollout: its share back to the others, then failed
    COMPLETE = "completed"  # a rollout that already holds all the traffic: left as it stands
    FINISH_RETIRE = "retired"  # a drain whose traffic already moved: retired
    UNDO_RETIRE = "kept"  # a rollback whose traffic never moved: the version keeps it


def settlement(record: DeploymentRecord, split: Mapping[str, int]) -> Settlement:
    """What to do with the interrupted operation on ``record``, given its model's split now."""
    share = split.get(record.version, 0)
    if record.operation == RETIRE or record.status is DeploymentStatus.DRAINING:
        return Settlement.FINISH_RETIRE if share == 0 else Settlement.UNDO_RETIRE
    if record.status is DeploymentStatus.DEPLOYING:
        return Settlement.FAIL
    others = any(weight > 0 for version, weight in split.items() if version != record.version)
    return Settlement.COMPLETE if share > 0 and not others else Settlement.ROLL_BACK


class Recovery:
    def __init__(self, control: Traffic, leases: Leases) -> None:
        self._control = control
        self._leases = leases

    async def sweep(self, now: float) -> list[tuple[DeploymentRecord, Settlement]]:
        """Claim and settle every orphaned operation; returns what was settled here."""
        settled = []
        for record in await self._control.store.list_deployments():
            if not orphaned(record, now, self._leases.router_id, self._leases.driving()):
                continue
            operation = record.operation or RETIRE  # a drain recorded before leases existed
            if not await self._leases.take(record.id, operation, expected=(record.driver, record.lease_until)):
                continue  # another router claimed it first
            try:
                outcome = await self._settle(record)
            except Exception:  # the store failing, say: let go, so that a later sweep (here or elsewhere) retries
                logger.exception("settling the interrupted %s of %s:%s failed", operation, record.model_name,
                                 record.version)
                self._leases.forget(record.id)
                continue
            settled.append((record, outcome))
        return settled

    async def _settle(self, record: DeploymentRecord) -> Settlement:
        control, model = self._control, record.model_name
        split = (await control.store.get_traffic(model)).split
        outcome = settlement(record, split)
        reason = (f"interrupted: router {record.driver or 'unknown'} stopped while driving its "
                  f"{record.operation or 'drain'}; {outcome.value} by router {self._leases.router_id}")
        logger.warning("%s:%s %s", model, record.version, reason)
        action = "retire_interrupted" if outcome in (Settlement.FINISH_RETIRE, Settlement.UNDO_RETIRE) \
            else "rollout_interrupted"
        detail = {"version": record.version, "settled": outcome.value, "driver": record.driver,
                  "status_was": record.status.value}
        if outcome is Settlement.ROLL_BACK and split.get(record.version, 0) > 0:
            await control.update_split(model, partial(rebalance, version=record.version, percent=0),
                                       HistoryEntry(model, action, "recovery", detail))
        else:
            await control.store.append_history(HistoryEntry(model, action, "recovery", detail))
        key = (model, record.version)
        # Drains run as tasks (a drain may take drain_timeout_s): the sweep runs in the loop that renews
        # this router's leases, and waiting here could let them lapse.
        if outcome in (Settlement.FAIL, Settlement.ROLL_BACK):
            await control.store.update_deployment(record.id, DeploymentStatus.FAILED, reason)
            self._leases.forget(record.id)
            control.versions.retire(key)
        elif outcome is Settlement.FINISH_RETIRE:
            if record.status is not DeploymentStatus.DRAINING:
                await control.store.update_deployment(record.id, DeploymentStatus.DRAINING)
            control.spawn(control.retire(record), name=f"retire {model}:{record.version}")  # keeps the lease
        else:
            await self._leases.release(record.id, record.operation or RETIRE)
        return outcome

