"""Rolling: replace the stable version's replicas one at a time, traffic following the ready count.

For i in 1..N: start the i-th new replica and wait until it is ready, give the
new version i/N of the traffic, then drain old replicas down to N - i. Ready
replicas never fall below N (N + 1 while one warms up). A replica that fails
to start, or a rollback made meanwhile, gives the old version its traffic and
its replicas back. With no stable version running here it is ``direct``.
"""

from __future__ import annotations

import logging
from functools import partial

from llmserve.errors import LLMServeError
from router.control.leases import RETIRE
from router.control.strategies.base import Rollout, RolloutFailed, launch
from router.control.strategies.direct import Direct
from router.store import DeploymentStatus, HistoryEntry
from router.traffic.catalog import ServedVersion
from router.traffic.split import rebalance

logger = logging.getLogger(__name__)


class Rolling:
    async def run(self, rollout: Rollout) -> None:
        control, model = rollout.control, rollout.model_name
        split = (await control.store.get_traffic(model)).split
        stable = max((v for v in split if split[v] > 0), key=split.__getitem__, default=None)
        old = control.versions.get((model, stable)) if stable else None
        if old is None or old.replica_set is None:
            await Direct().run(rollout)
            return
        # The old version is drained by this rollout: say so on its record, so that dying half way
        # through, the version is either given its traffic back or retired by recovery, not forgotten.
        old_id = next(d.id for d in await control.store.list_deployments(model)
                      if d.version == stable and d.status is DeploymentStatus.ACTIVE)
        await control.leases.take(old_id, RETIRE)
        try:
            new = await launch(rollout, replicas=0)
            await _roll(rollout, new, old, old_id)
        finally:
            await control.leases.release(old_id, RETIRE)  # a no-op once it is retired


async def _roll(rollout: Rollout, new: ServedVersion, old: ServedVersion, old_id: str) -> None:
    control, record, actor = rollout.control, rollout.record, rollout.actor
    backend = control.versions.backend
    assert new.replica_set is not None and old.replica_set is not None
    model, wanted = record.model_name, record.replicas
    share = 0
    for step in range(1, wanted + 1):
        added = await backend.scale(new.replica_set, step)
        failure = None
        try:
            await backend.wait_ready(added)
        except LLMServeError as exc:
            failure = str(exc)
        if step > 1 and (await control.store.get_traffic(model)).split.get(record.version, 0) < share:
            # Rolled back meanwhile (which also stops the new replicas): put the old ones back.
            logger.warning("rolling update of %s:%s stopped: its traffic was taken away", model, record.version)
            await backend.scale(old.replica_set, wanted)
            return
        if failure is not None:
            if step == 1:
                raise RolloutFailed(failure)
            await _abandon(rollout, old, f"replica {step} of {wanted} failed: {failure}")
            return
        if step == 1:
            await control.store.update_deployment(record.id, DeploymentStatus.ACTIVE)
        share = round(100 * step / wanted)
        await control.update_split(model, partial(rebalance, version=record.version, percent=share),
                                   HistoryEntry(model, "rolling_step", actor, {
                                       "version": record.version, "percent": share,
                                       "ready_replicas": step, "of": wanted}))
        await backend.scale(old.replica_set, max(0, wanted - step))
    await control.store.update_deployment(old_id, DeploymentStatus.RETIRED)
    control.leases.forget(old_id)
    await control.store.append_history(HistoryEntry(model, "rolling_done", actor,
                                                    {"version": record.version, "replaced": old.version}))
    await control.versions.retire((model, old.version))


async def _abandon(rollout: Rollout, old: ServedVersion, reason: str) -> None:
    control, record = rollout.control, rollout.record
    assert old.replica_set is not None
    logger.warning("rolling update of %s:%s failed: %s", record.model_name, record.version, reason)
    await control.update_split(record.model_name, lambda _split: {old.version: 100},
                               HistoryEntry(record.model_name, "rolling_failed", rollout.actor,
                                            {"version": record.version, "reason": reason}))
    await control.versions.backend.scale(old.replica_set, record.replicas)
    await control.store.update_deployment(record.id, DeploymentStatus.FAILED, reason)
    await control.versions.retire((record.model_name, record.version))
