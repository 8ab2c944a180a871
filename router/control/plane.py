"""The control plane's commands: models, deployments, traffic splits, rollback and delete.

The store holds the desired state; every router reconciles its own versions
and its in-memory catalog to it (``reconciler``), whether a change came
through its own API or, with a shared Redis store, through another router's.
The router that accepted a deploy drives the rollout:

1. record the deployment as ``deploying`` (a live duplicate version is a 409);
2. the plan's strategy (``strategies/``: ``direct``, ``canary``,
   ``blue_green``, ``rolling``) starts the replicas, waits until they are
   ready and gives the version its traffic, in compare-and-set changes of the
   split;
3. any failure: ``failed`` with the reason, what was started stopped, traffic
   untouched.

Rollback is one compare-and-set that gives the previous stable version 100%;
the catalog switches in the same call, and the version rolled back from
drains (in-flight streams finish) before its replicas stop.

Each rollout and drain holds a lease on its deployment record (``leases``);
one whose router died is settled by whichever router finds the lease expired
(``recovery``: an interrupted rollout is rolled back, an interrupted drain
finished).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmserve.loops import PeriodicLoop, Tasks
from llmserve.replicas.backend import ReplicaBackend
from router.control.autoscale.checks import check_policy
from router.control.autoscale.policy import AutoscalingPolicy
from router.control.canary_analysis import CanaryPolicy
from router.control.leases import DEPLOY, RETIRE, Leases, driver_id
from router.control.reconciler import Reconciler
from router.control.recovery import Recovery
from router.control.strategies.base import (
    Rollout,
    RolloutFailed,
    RolloutPlan,
    RolloutStrategy,
    SplitChange,
    StrategyType,
)
from router.control.strategies.blue_green import BlueGreen
from router.control.strategies.canary import Canary, CanaryRollout
from router.control.strategies.direct import Direct
from router.control.strategies.rolling import Rolling
from router.control.strategies.shadow import Shadow, check_deploy, promote, restore
from router.control.versions import LocalVersions, NoPredictorHost, SpecBuilder
from router.observe.samples import SampleWindows
from router.predict.host import PredictorHost
from router.store import (
    KEYS_CHANGED,
    RESYNC,
    Conflict,
    DeploymentRecord,
    DeploymentStatus,
    HistoryEntry,
    ModelRecord,
    NotFound,
    Store,
    TrafficRecord,
)
from router.traffic.catalog import Catalog
from router.traffic.shadow import Shadows
from router.traffic.split import validate_split

logger = logging.getLogger(__name__)

_CAS_ATTEMPTS = 20
_RESUBSCRIBE_S = 0.25  # after the store's change feed broke: back within a second of the store


async def _nothing() -> None:
    return None


@dataclass(frozen=True)
class RollbackResult:
    model_name: str
    from_version: str
    to_version: str
    applied_in_ms: float
    revision: int


class ControlPlane:
    def __init__(
        self, store: Store, backend: ReplicaBackend, catalog: Catalog, models_dir: Path, specs: SpecBuilder,
        samples: SampleWindows | None = None, predictors: PredictorHost | None = None,
        canary_interval_s: float = 0.5, lease_s: float = 15.0, router_id: str | None = None,
        shadows: Shadows | None = None,
    ) -> None:
        self.store = store
        self.samples = samples or SampleWindows()
        self.canaries: dict[str, CanaryRollout] = {}
        self.shadows = shadows or Shadows()
        self._canary_interval_s = canary_interval_s
        self._catalog = catalog
        self._models_dir = Path(models_dir)
        self._tasks = Tasks()
        self.versions = LocalVersions(backend, predictors or NoPredictorHost(), catalog, specs, self._tasks)
        self._owned_rollouts: set[str] = set()
        self._rolling_out: dict[str, str] = {}  # deployment id -> model, for the rollouts this router drives
        self._reconciler = Reconciler(store, self.versions, catalog, self._is_predict, self._owned_rollouts)
        self._strategies: dict[StrategyType, RolloutStrategy] = {
            StrategyType.DIRECT: Direct(),
            StrategyType.CANARY: Canary(self.samples, self.canaries, canary_interval_s),
            StrategyType.BLUE_GREEN: BlueGreen(),
            StrategyType.ROLLING: Rolling(),
            StrategyType.SHADOW: Shadow(self.shadows),
        }
        self._watch = PeriodicLoop("control-plane watch", _RESUBSCRIBE_S, self._follow_changes)
        self._rollout_tasks: dict[str, asyncio.Task[None]] = {}
        self.leases = Leases(store, router_id or driver_id(), lease_s, on_lost=self._lost_lease)
        self._recovery = Recovery(self, self.leases)
        self._lease_loop = PeriodicLoop("control-plane leases", lease_s / 3, self._renew_and_recover)
        # what to do when the store's API keys changed (the app reloads its key ring)
        self.on_keys_changed: Callable[[], Awaitable[None]] = _nothing

    # -- life cycle -----------------------------------------------------------

    async def start(self) -> None:
        """Rebuild this router's view from the store, then follow its changes."""
        for model in await self.store.list_models():
            await self._reconcile(model.name)
        # What a previous run of this router left half done is settled before anything new starts
        # (``llmserve up`` deploys its model when it finds no live deployment of it).
        try:
            await self._recovery.sweep(time.time())
        except Exception:  # the lease loop's sweeps try again; a start must not fail on it
            logger.exception("settling interrupted operations at start failed; retried every %.0fs",
                             self.leases.lease_s / 3)
        self._watch.start()
        self._lease_loop.start()

    async def stop(self) -> None:
        await self._watch.close()
        await self._lease_loop.close()
        await self._tasks.cancel_all()

    def models_rolling_out(self) -> set[str]:
        """Models with a deploy in progress on this router (readiness waits for them at startup)."""
        return set(self._rolling_out.values())

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> Any:
        return self._tasks.spawn(coro, name)

    async def _follow_changes(self) -> None:
        async for model_name in self.store.changes():
            if model_name == RESYNC:  # the feed (re)started: what changed while it was down is unknown
                await self.on_keys_changed()
                for model in await self.store.list_models():
                    await self._reconcile(model.name)
            elif model_name == KEYS_CHANGED:
                await self.on_keys_changed()
            else:
                await self._reconcile(model_name)

    async def _reconcile(self, model_name: str) -> None:
        await self._reconciler.reconcile(model_name)
        await restore(self.store, self.shadows, model_name, await self._is_predict(model_name))

    async def _renew_and_recover(self) -> None:
        await self.leases.renew()
        await self._recovery.sweep(time.time())

    async def recover_now(self) -> None:
        """Settle orphaned operations now rather than at the next lease period (tests, tools)."""
        await self._recovery.sweep(time.time())

    def _lost_lease(self, deployment_id: str) -> None:
        task = self._rollout_tasks.get(deployment_id)
        if task is not None:
            task.cancel()

    async def _is_predict(self, model_name: str) -> bool:
        """Traditional models load in the router; generative ones run as engine replicas."""
        model = await self.store.get_model(model_name)
        return model is not None and model.framework != "vllm"

    # -- models ---------------------------------------------------------------

    async def register_model(self, model: ModelRecord, actor: str | None = None) -> ModelRecord:
        await self.store.create_model(model)
        await self.store.append_history(HistoryEntry(model.name, "register", actor or model.owner or "api", {}))
        return model

    async def require_model(self, name: str) -> ModelRecord:
        model = await self.store.get_model(name)
        if model is None:
            raise NotFound(f"model {name!r} is not registered; POST /api/v1/models first")
        return model

    # -- deploy ---------------------------------------------------------------

    async def deploy(
        self, model_name: str, version: str, replicas: int, actor: str, plan: RolloutPlan | None = None,
        engine: dict[str, Any] | None = None, gpu: int = 0, autoscaling: AutoscalingPolicy | None = None,
    ) -> DeploymentRecord:
        plan = plan or RolloutPlan(traffic_percent=100)
        model = await self.require_model(model_name)
        if plan.type is StrategyType.SHADOW:
            await check_deploy(self, self.shadows, self.canaries, model_name, version)
        operation, driver, lease_until = self.leases.new_lease(DEPLOY)
        record = DeploymentRecord(
            id=uuid.uuid4().hex[:12], model_name=model_name, version=version, status=DeploymentStatus.DEPLOYING,
            model_dir=str(self._models_dir / model_name / version), replicas=replicas, gpu=gpu,
            engine=dict(engine or {}), operation=operation, driver=driver, lease_until=lease_until,
            autoscaling=autoscaling.to_dict() if autoscaling else {},
        )
        if autoscaling is not None:
            check_policy(autoscaling, record, model.framework != "vllm", self.versions, replicas)
        self._owned_rollouts.add(record.id)
        self._rolling_out[record.id] = model_name
        self.leases.hold(record.id, DEPLOY, lease_until)  # before the record exists: no sweep takes it for an orphan
        try:
            await self.store.create_deployment(record)
        except BaseException:
            self._owned_rollouts.discard(record.id)
            self._rolling_out.pop(record.id, None)
            self.leases.forget(record.id)
            raise
        await self.store.append_history(HistoryEntry(
            model_name, "deploy", actor, {"version": version, "traffic_percent": plan.traffic_percent,
                                          "replicas": replicas, "deployment_id": record.id}))
        self._rollout_tasks[record.id] = self.spawn(self._rollout(record, plan, actor),
                                                    name=f"rollout {model_name}:{version}")
        return record

    async def _rollout(self, record: DeploymentRecord, plan: RolloutPlan, actor: str) -> None:
        key = (record.model_name, record.version)
        try:
            rollout = Rollout(record, plan, actor, await self._is_predict(record.model_name), self)
            await self._strategies[plan.type].run(rollout)
            await self.leases.release(record.id, DEPLOY)  # unless a rollback took the deployment over
        except RolloutFailed as exc:
            logger.warning("deployment %s:%s failed: %s", record.model_name, record.version, exc.reason)
            await self.versions.stop_now(key)
            await self.store.update_deployment(record.id, DeploymentStatus.FAILED, exc.reason)
            self.leases.forget(record.id)
            await self.store.append_history(HistoryEntry(
                record.model_name, "deploy_failed", actor, {"version": record.version, "reason": exc.reason}))
        except Exception:
            # A store outage mid-rollout, say: the lease stays in the store, no task here drives it,
            # and the next recovery sweep (here or on another router) settles it.
            logger.exception("the rollout of %s:%s stopped; recovery will settle it", *key)
            if self.leases.operation(record.id) == DEPLOY:  # not a drain a rollback took over meanwhile
                self.leases.forget(record.id)
        finally:
            self._owned_rollouts.discard(record.id)
            self._rolling_out.pop(record.id, None)
            self._rollout_tasks.pop(record.id, None)

    # -- traffic --------------------------------------------------------------

    async def set_traffic(
        self, model_name: str, split: dict[str, Any], actor: str, expected_revision: int | None = None
    ) -> TrafficRecord:
        """Replace the split. With ``expected_revision`` (HTTP ``If-Match``) a concurrent change
        made after the caller read the split is a Conflict instead of being overwritten."""
        await self.require_model(model_name)
        active = {d.version for d in await self.store.list_deployments(model_name)
                  if d.status is DeploymentStatus.ACTIVE}
        wanted = validate_split(split, active)
        current = await self.store.get_traffic(model_name)
        if expected_revision is not None and expected_revision != current.revision:
            raise Conflict(f"the traffic of {model_name!r} is at revision {current.revision}, not "
                           f"{expected_revision} (If-Match); read it again and retry")
        record = await self.store.set_traffic(
            model_name, wanted, current.revision,
            HistoryEntry(model_name, "traffic", actor, {"from": current.split, "to": wanted}),
        )
        self._catalog.set_split(model_name, record.split)
        return record

    async def update_split(self, model_name: str, change: SplitChange, entry: HistoryEntry) -> TrafficRecord:
        """Apply ``change(split) -> split`` with compare-and-set, retrying when another writer won."""
        for _ in range(_CAS_ATTEMPTS):
            current = await self.store.get_traffic(model_name)
            wanted = change(dict(current.split))
            detail = {**entry.detail, "from": current.split, "to": wanted}
            try:
                record = await self.store.set_traffic(
                    model_name, wanted, current.revision,
                    HistoryEntry(entry.model_name, entry.action, entry.actor, detail))
            except Conflict:
                continue
            self._catalog.set_split(model_name, record.split)
            return record
        raise Conflict(f"the traffic of {model_name!r} kept changing; gave up after {_CAS_ATTEMPTS} attempts")

    async def rollback(self, model_name: str, to_version: str | None, actor: str) -> RollbackResult:
        started = time.perf_counter()
        await self.require_model(model_name)
        deployments = await self.store.list_deployments(model_name)
        active = [d for d in deployments if d.status is DeploymentStatus.ACTIVE]
        split = (await self.store.get_traffic(model_name)).split
        with_traffic = [d for d in active if split.get(d.version, 0) > 0]
        if not with_traffic:
            raise Conflict(f"model {model_name!r} has no active version with traffic to roll back from")
        newest = max(with_traffic, key=lambda d: d.created_at)
        if to_version is not None:
            if to_version not in {d.version for d in active}:
                known = ", ".join(sorted(d.version for d in active)) or "none"
                raise NotFound(f"cannot roll back to {to_version!r}: not an active version (active: {known})",
                               "version")
            target = to_version
        else:
            older = [d for d in active if d.created_at < newest.created_at]
            if not older:
                raise Conflict(f"{model_name}:{newest.version} is the only active version; nothing to roll back to")
            target = max(older, key=lambda d: d.created_at).version
        if newest.version != target:  # first say who drains it: dying after the switch, it is not forgotten
            rollout = self._rollout_tasks.get(newest.id)
            canary = self.canaries.get(model_name)
            if rollout is not None and rollout is not asyncio.current_task() and canary is not None \
                    and canary.state.canary_version == newest.version:
                rollout.cancel()  # its canary would go on stepping the version up (a rolling update sees the
                # rollback itself and gives the old version its replicas back)
            await self.leases.take(newest.id, RETIRE)
        record = await self.update_split(
            model_name, lambda _split: {target: 100},
            HistoryEntry(model_name, "rollback", actor, {"from_version": newest.version, "to_version": target}))
        applied_ms = (time.perf_counter() - started) * 1000
        if newest.version != target:
            await self.store.update_deployment(newest.id, DeploymentStatus.DRAINING)
            self.spawn(self.retire(newest), name=f"retire {model_name}:{newest.version}")
        return RollbackResult(model_name, newest.version, target, applied_ms, record.revision)

    async def promote_shadow(self, model_name: str, policy: CanaryPolicy, actor: str) -> CanaryRollout:
        """The model's shadow becomes a canary against its stable version (``strategies/shadow``)."""
        await self.require_model(model_name)
        return await promote(self, self.shadows, self.canaries, self.samples, model_name, policy, actor,
                             self._canary_interval_s)

    async def set_autoscaling(self, model_name: str, version: str | None, policy: AutoscalingPolicy,
                              actor: str) -> list[DeploymentRecord]:
        """Give the model's active versions (or one) this policy; the autoscaler acts on it next period."""
        model = await self.require_model(model_name)
        deployments = await self.store.list_deployments(model_name)
        live = [d for d in deployments if d.status in (DeploymentStatus.ACTIVE, DeploymentStatus.DEPLOYING,
                                                        DeploymentStatus.DRAINING)
                and (version is None or d.version == version)]
        if not live:
            known = ", ".join(sorted(d.version for d in deployments if d.status is DeploymentStatus.ACTIVE))
            raise NotFound(f"{model_name} has no active version{' ' + repr(version) if version else ''} "
                           f"(active: {known or 'none'})", "version")
        for record in live:
            check_policy(policy, record, model.framework != "vllm", self.versions)
        for record in live:
            await self.store.set_scaling(record.id, autoscaling=policy.to_dict())
            await self.store.append_history(HistoryEntry(model_name, "autoscaling", actor,
                                                         {"version": record.version, "policy": policy.to_dict()}))
        return live

    async def delete_version(self, model_name: str, version: str, actor: str) -> DeploymentRecord:
        await self.require_model(model_name)
        live = [d for d in await self.store.list_deployments(model_name)
                if d.version == version and d.status in (DeploymentStatus.ACTIVE, DeploymentStatus.DEPLOYING)]
        if not live:
            raise NotFound(f"{model_name} has no live version {version!r}", "version")
        share = (await self.store.get_traffic(model_name)).split.get(version, 0)
        if share > 0:
            raise Conflict(f"{model_name}:{version} still has {share}% of the traffic; move its traffic first "
                           f"(PUT /api/v1/deployments/{model_name}/traffic)")
        if self.shadows.is_shadow(model_name, version):
            self.shadows.remove(model_name)  # its replays stop before its replicas do
        await self.leases.take(live[0].id, RETIRE)
        await self.store.update_deployment(live[0].id, DeploymentStatus.DRAINING)
        await self.store.append_history(HistoryEntry(model_name, "delete", actor, {"version": version}))
        self.spawn(self.retire(live[0]), name=f"retire {model_name}:{version}")
        return live[0]

    async def retire(self, record: DeploymentRecord) -> None:
        """Drain and stop a version here, then record it retired (which clears its lease)."""
        try:
            await self.versions.retire((record.model_name, record.version))
            await self.store.update_deployment(record.id, DeploymentStatus.RETIRED)
        finally:
            self.leases.forget(record.id)  # failed to record it: recovery finishes the drain
