"""The control plane: models, deployments, traffic splits and rollback.

The store holds the desired state; every router reconciles its own engine
replicas and its in-memory catalog to it (``_reconcile``), whether a change
came through its own API or, with a shared Redis store, through another
router's (``_watch``). The router that accepted a deploy drives the rollout:

1. record the deployment as ``deploying`` (a live duplicate version is a 409);
2. check the model folder; start the replicas; wait until every one is ready
   (any failure: ``failed`` with the reason, traffic untouched);
3. mark it ``active`` and give it its share of traffic, taken from the other
   versions in proportion, in one compare-and-set of the split.

Strategies change step 3: ``canary`` steps the share up while the analysis
allows (``router.control.strategies.canary``); ``blue_green`` gives 100% at once and keeps
the old version ready for a grace period; ``rolling`` replaces the stable
version's replicas one at a time (``_roll``), never below the desired ready count.

Rollback is one compare-and-set that gives the previous stable version 100%;
the catalog switches in the same call, and the version rolled back from
drains (in-flight streams finish) before its replicas stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from llmserve.errors import LLMServeError
from llmserve.models.repository import Manifest
from llmserve.replicas.endpoint import Replica
from router.control.canary_analysis import CanaryPolicy
from router.control.strategies.canary import CanaryRollout, CanaryState
from router.observe.samples import SampleWindows
from router.store import (
    Conflict,
    DeploymentRecord,
    DeploymentStatus,
    HistoryEntry,
    ModelRecord,
    NotFound,
    Store,
    TrafficRecord,
)
from router.traffic.catalog import Catalog, ServedVersion
from router.traffic.split import rebalance, validate_split

logger = logging.getLogger(__name__)

_CAS_ATTEMPTS = 20


class ReplicaLauncher(Protocol):
    """Starts and stops a version's replicas (``llmserve.replicas.local.LocalStack``)."""

    async def launch(
        self, model_name: str, version: str, model_dir: Path, replicas: int, engine: dict[str, Any] | None = None
    ) -> ServedVersion: ...

    async def wait_ready(self, served: ServedVersion) -> None: ...

    async def retire(self, served: ServedVersion, drain: bool = True) -> None: ...

    def add_replica(self, served: ServedVersion) -> Replica: ...

    async def wait_replica_ready(self, replica: Replica) -> None: ...

    async def remove_replica(self, served: ServedVersion, replica: Replica, drain: bool = True) -> None: ...


@dataclass(frozen=True)
class RollbackResult:
    model_name: str
    from_version: str
    to_version: str
    applied_in_ms: float
    revision: int


class ControlPlane:
    def __init__(
        self, store: Store, launcher: ReplicaLauncher, catalog: Catalog, models_dir: Path,
        samples: SampleWindows | None = None, predict_launcher: ReplicaLauncher | None = None,
    ) -> None:
        self.store = store
        self._predict_launcher = predict_launcher
        self.samples = samples or SampleWindows()
        self.canaries: dict[str, CanaryRollout] = {}
        self._launcher = launcher
        self._catalog = catalog
        self._models_dir = Path(models_dir)
        self._local: dict[tuple[str, str], ServedVersion] = {}
        self._owned_rollouts: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._locks: dict[str, asyncio.Lock] = {}
        self._watch_task: asyncio.Task[None] | None = None
        self._retiring: dict[tuple[str, str], asyncio.Task[None]] = {}

    # -- life cycle -----------------------------------------------------------

    async def start(self) -> None:
        """Rebuild this router's view from the store, then follow its changes."""
        for model in await self.store.list_models():
            await self._reconcile(model.name)
        self._watch_task = asyncio.create_task(self._watch(), name="control-plane watch")

    async def stop(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _launcher_for(self, model_name: str) -> ReplicaLauncher:
        """Engine replicas for generative models; in-process predictors for traditional ones."""
        model = await self.store.get_model(model_name)
        if model is not None and model.framework != "vllm":
            if self._predict_launcher is None:
                raise _RolloutFailed("this router does not host traditional models")
            return self._predict_launcher
        return self._launcher

    def _lock(self, model_name: str) -> asyncio.Lock:
        return self._locks.setdefault(model_name, asyncio.Lock())

    async def _watch(self) -> None:
        while True:
            try:
                async for model_name in self.store.changes():
                    await self._reconcile(model_name)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("control plane: following store changes failed; resubscribing")
                await asyncio.sleep(1.0)

    # -- models ---------------------------------------------------------------

    async def register_model(self, model: ModelRecord) -> ModelRecord:
        await self.store.create_model(model)
        await self.store.append_history(HistoryEntry(model.name, "register", model.owner or "api", {}))
        return model

    async def require_model(self, name: str) -> ModelRecord:
        model = await self.store.get_model(name)
        if model is None:
            raise NotFound(f"model {name!r} is not registered; POST /api/v1/models first")
        return model

    # -- deploy ---------------------------------------------------------------

    async def deploy(
        self, model_name: str, version: str, traffic_percent: int, replicas: int, gpu: int, actor: str,
        engine: dict[str, Any] | None = None, canary: CanaryPolicy | None = None,
        blue_green_grace_s: float | None = None, rolling: bool = False,
    ) -> DeploymentRecord:
        await self.require_model(model_name)
        record = DeploymentRecord(
            id=uuid.uuid4().hex[:12], model_name=model_name, version=version, status=DeploymentStatus.DEPLOYING,
            model_dir=str(self._models_dir / model_name / version), replicas=replicas, gpu=gpu,
            engine=dict(engine or {}),
        )
        self._owned_rollouts.add(record.id)
        try:
            await self.store.create_deployment(record)
        except BaseException:
            self._owned_rollouts.discard(record.id)
            raise
        await self.store.append_history(HistoryEntry(
            model_name, "deploy", actor, {"version": version, "traffic_percent": traffic_percent,
                                          "replicas": replicas, "deployment_id": record.id}))
        self._spawn(self._rollout(record, traffic_percent, actor, canary, blue_green_grace_s, rolling),
                    name=f"rollout {model_name}:{version}")
        return record

    async def _rollout(
        self, record: DeploymentRecord, traffic_percent: int, actor: str, canary: CanaryPolicy | None = None,
        blue_green_grace_s: float | None = None, rolling: bool = False,
    ) -> None:
        started = time.monotonic()
        served: ServedVersion | None = None
        launcher = self._launcher
        try:
            launcher = await self._launcher_for(record.model_name)
            if launcher is self._predict_launcher:
                try:  # loading checks the folder, the file and a first prediction
                    served = await launcher.launch(record.model_name, record.version, Path(record.model_dir),
                                                   record.replicas, record.engine)
                except LLMServeError as exc:
                    raise _RolloutFailed(str(exc)) from None
                self._local[(record.model_name, record.version)] = served
                self._catalog.add_version(served)
                await self._activate(record, served, traffic_percent, actor, canary, blue_green_grace_s, started)
                return
            try:
                Manifest.read(Path(record.model_dir))
            except LLMServeError as exc:
                raise _RolloutFailed(f"{exc}; prepare it with `llmserve prepare --name {record.model_name} "
                                     f"--version {record.version} --source ...`") from None
            if rolling:
                split = (await self.store.get_traffic(record.model_name)).split
                stable = max((v for v in split if split[v] > 0), key=split.get, default=None)
                old = self._local.get((record.model_name, stable)) if stable else None
                if old is not None:
                    served = await self._launch(record, 0)
                    self._local[(record.model_name, record.version)] = served
                    self._catalog.add_version(served)
                    await self._roll(record, served, old, actor)
                    return
            served = await self._launch(record, record.replicas)
            self._local[(record.model_name, record.version)] = served
            self._catalog.add_version(served)
            try:
                await self._launcher.wait_ready(served)
            except LLMServeError as exc:
                raise _RolloutFailed(str(exc)) from None
            await self._activate(record, served, traffic_percent, actor, canary, blue_green_grace_s, started)
        except _RolloutFailed as exc:
            logger.warning("deployment %s:%s failed: %s", record.model_name, record.version, exc)
            if served is not None:
                self._local.pop((record.model_name, record.version), None)
                self._catalog.remove_version(record.model_name, record.version)
                await launcher.retire(served, drain=False)
            await self.store.update_deployment(record.id, DeploymentStatus.FAILED, str(exc))
            await self.store.append_history(HistoryEntry(
                record.model_name, "deploy_failed", actor, {"version": record.version, "reason": str(exc)}))
        finally:
            self._owned_rollouts.discard(record.id)

    async def _launch(self, record: DeploymentRecord, replicas: int) -> ServedVersion:
        try:
            return await self._launcher.launch(record.model_name, record.version, Path(record.model_dir),
                                               replicas, record.engine)
        except LLMServeError as exc:  # settings that do not fit: the version fails with the reason
            raise _RolloutFailed(str(exc)) from None

    async def _activate(
        self, record: DeploymentRecord, served: ServedVersion, traffic_percent: int, actor: str,
        canary: CanaryPolicy | None, blue_green_grace_s: float | None, started: float,
    ) -> None:
        """Every replica is ready: mark the version active and give it traffic by its strategy."""
        await self.store.update_deployment(record.id, DeploymentStatus.ACTIVE)
        ready_s = time.monotonic() - started
        logger.info("deployment %s:%s ready in %.1fs", record.model_name, record.version, ready_s)
        split = (await self.store.get_traffic(record.model_name)).split
        stable = max((v for v in split if split[v] > 0 and v != record.version), key=split.get, default=None)
        if blue_green_grace_s is not None and stable is not None:
            # Blue/green: all traffic at once, now that every replica is ready and warm; the old
            # versions stay ready for an instant rollback through the grace period, then drain.
            await self.update_split(record.model_name, lambda _split: {record.version: 100},
                                    HistoryEntry(record.model_name, "blue_green_switch", actor,
                                                 {"version": record.version, "grace_s": blue_green_grace_s}))
            self._spawn(self._retire_after_grace(record, blue_green_grace_s),
                        name=f"blue/green grace {record.model_name}:{record.version}")
            return
        if canary is not None and stable is not None:
            state = CanaryState(record.model_name, record.version, stable, canary)
            rollout = CanaryRollout(self, self.samples, state, actor)
            self.canaries[record.model_name] = rollout
            self._spawn(rollout.run(), name=f"canary {record.model_name}:{record.version}")
            return
        await self.update_split(
            record.model_name,
            lambda split: rebalance(split, record.version, traffic_percent),
            HistoryEntry(record.model_name, "activate", actor,
                         {"version": record.version, "traffic_percent": traffic_percent,
                          "ready_after_s": round(ready_s, 2)}),
        )

    async def _roll(self, record: DeploymentRecord, new: ServedVersion, old: ServedVersion, actor: str) -> None:
        """Rolling update: for i in 1..N, start the i-th new replica and wait until it is ready,
        give the new version i/N of the traffic, then drain old replicas down to N - i.

        Ready replicas never fall below N (N + 1 while one warms up). A replica that fails
        to start, or a rollback made meanwhile, gives the old version its traffic and its
        replicas back.
        """
        model, wanted = record.model_name, record.replicas
        share = 0
        for step in range(1, wanted + 1):
            replica = self._launcher.add_replica(new)
            failure = None
            try:
                await self._launcher.wait_replica_ready(replica)
            except LLMServeError as exc:
                failure = str(exc)
            if step > 1 and (await self.store.get_traffic(model)).split.get(record.version, 0) < share:
                # Rolled back meanwhile (which also stops the new replicas): put the old ones back.
                logger.warning("rolling update of %s:%s stopped: its traffic was taken away", model, record.version)
                self._restore_replicas(old, wanted)
                return
            if failure is not None:
                if step == 1:
                    raise _RolloutFailed(failure)
                await self._abandon_roll(record, old, wanted, f"replica {step} of {wanted} failed: {failure}", actor)
                return
            if step == 1:
                await self.store.update_deployment(record.id, DeploymentStatus.ACTIVE)
            share = round(100 * step / wanted)
            await self.update_split(model, lambda split, share=share: rebalance(split, record.version, share),
                                    HistoryEntry(model, "rolling_step", actor, {
                                        "version": record.version, "percent": share,
                                        "ready_replicas": step, "of": wanted}))
            while old.replicas and len(old.replicas) + step > wanted:
                await self._launcher.remove_replica(old, old.replicas[0], drain=True)
        for previous in await self.store.list_deployments(model):
            if previous.version == old.version and previous.status is DeploymentStatus.ACTIVE:
                await self.store.update_deployment(previous.id, DeploymentStatus.RETIRED)
        await self.store.append_history(HistoryEntry(model, "rolling_done", actor,
                                                     {"version": record.version, "replaced": old.version}))
        await self._retire_local((model, old.version))

    async def _abandon_roll(
        self, record: DeploymentRecord, old: ServedVersion, wanted: int, reason: str, actor: str
    ) -> None:
        logger.warning("rolling update of %s:%s failed: %s", record.model_name, record.version, reason)
        await self.update_split(record.model_name, lambda _split: {old.version: 100},
                                HistoryEntry(record.model_name, "rolling_failed", actor,
                                             {"version": record.version, "reason": reason}))
        self._restore_replicas(old, wanted)
        await self.store.update_deployment(record.id, DeploymentStatus.FAILED, reason)
        await self._retire_local((record.model_name, record.version))

    def _restore_replicas(self, old: ServedVersion, wanted: int) -> None:
        for _ in range(wanted - len(old.replicas)):
            self._launcher.add_replica(old)

    # -- traffic --------------------------------------------------------------

    async def _retire_after_grace(self, record: DeploymentRecord, grace_s: float) -> None:
        await asyncio.sleep(grace_s)
        split = (await self.store.get_traffic(record.model_name)).split
        if split.get(record.version) != 100:
            return  # rolled back or re-split during the grace period: leave the others be
        for old in await self.store.list_deployments(record.model_name):
            if old.status is DeploymentStatus.ACTIVE and old.version != record.version:
                await self.store.update_deployment(old.id, DeploymentStatus.DRAINING)
                await self.store.append_history(HistoryEntry(
                    record.model_name, "blue_green_retire", "blue_green", {"version": old.version}))
                self._spawn(self._retire(old), name=f"retire {old.model_name}:{old.version}")

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

    async def update_split(self, model_name: str, change: Any, entry: HistoryEntry) -> TrafficRecord:
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
        record = await self.update_split(
            model_name, lambda _split: {target: 100},
            HistoryEntry(model_name, "rollback", actor, {"from_version": newest.version, "to_version": target}))
        applied_ms = (time.perf_counter() - started) * 1000
        if newest.version != target:
            await self.store.update_deployment(newest.id, DeploymentStatus.DRAINING)
            self._spawn(self._retire(newest), name=f"retire {model_name}:{newest.version}")
        return RollbackResult(model_name, newest.version, target, applied_ms, record.revision)

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
        await self.store.update_deployment(live[0].id, DeploymentStatus.DRAINING)
        await self.store.append_history(HistoryEntry(model_name, "delete", actor, {"version": version}))
        self._spawn(self._retire(live[0]), name=f"retire {model_name}:{version}")
        return live[0]

    async def _retire(self, record: DeploymentRecord) -> None:
        await self._retire_local((record.model_name, record.version))
        await self.store.update_deployment(record.id, DeploymentStatus.RETIRED)

    # -- reconciliation -------------------------------------------------------

    async def _reconcile(self, model_name: str) -> None:
        """Make this router's replicas and catalog match the store for one model."""
        async with self._lock(model_name):
            deployments = await self.store.list_deployments(model_name)
            traffic = await self.store.get_traffic(model_name)
            for record in deployments:
                key = (record.model_name, record.version)
                if record.status is DeploymentStatus.ACTIVE and key not in self._local:
                    # After a restart, or a deploy accepted by another router: run it here too.
                    launcher = await self._launcher_for(model_name)
                    served = await launcher.launch(record.model_name, record.version,
                                                   Path(record.model_dir), record.replicas, record.engine)
                    self._local[key] = served
                    self._catalog.add_version(served)
                elif record.status in (DeploymentStatus.RETIRED, DeploymentStatus.FAILED) and key in self._local:
                    if not any(d.version == record.version and d.status is not record.status for d in deployments
                               if d.created_at > record.created_at):
                        self._retire_local(key)
                elif record.status is DeploymentStatus.DRAINING and key in self._local \
                        and record.id not in self._owned_rollouts:
                    self._retire_local(key)
            self._catalog.set_split(model_name, traffic.split)

    def _retire_local(self, key: tuple[str, str]) -> asyncio.Task[None]:
        """Drain and stop this router's replicas of a version; one task per version however often asked."""
        task = self._retiring.get(key)
        if task is None:
            task = self._spawn(self._drain_and_stop(key), name=f"retire {key[0]}:{key[1]}")
            self._retiring[key] = task
            task.add_done_callback(lambda _done: self._retiring.pop(key, None))
        return task

    async def _drain_and_stop(self, key: tuple[str, str]) -> None:
        served = self._local.pop(key, None)
        if served is not None:
            launcher = self._predict_launcher if served.predictor is not None else self._launcher
            assert launcher is not None
            await launcher.retire(served, drain=True)
            self._catalog.remove_version(*key)

    # -- reading --------------------------------------------------------------

    async def describe(self, model_name: str) -> dict[str, Any]:
        await self.require_model(model_name)
        deployments = await self.store.list_deployments(model_name)
        traffic = await self.store.get_traffic(model_name)
        versions = []
        for record in deployments:
            served = self._local.get((record.model_name, record.version))
            versions.append({
                **record.to_dict(),
                "traffic_percent": traffic.split.get(record.version, 0),
                "replica_states": [r.describe() for r in served.replicas] if served else [],
                "ready_replicas": len(served.ready_replicas) if served else 0,
            })
        history = await self.store.history(model_name)
        rollout = self.canaries.get(model_name)
        return {
            "canary": rollout.state.to_dict() if rollout else None,
            "model_name": model_name,
            "split": traffic.split,
            "revision": traffic.revision,
            "versions": versions,
            "history": [h.__dict__ for h in history],
        }


class _RolloutFailed(Exception):
    pass
