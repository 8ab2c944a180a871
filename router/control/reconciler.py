"""Make this router's versions and catalog match the store, one model at a time.

The store holds the desired state. Each router reconciles on start (after a
restart), and on every change it sees, whether the change came through its
own API or, with a shared Redis store, through another router's: versions to
run, versions to drain, and how many replicas each runs (the autoscaler's
desired count).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from router.control.versions import LocalVersions
from router.store import DeploymentStatus, Store
from router.traffic.catalog import Catalog


class Reconciler:
    def __init__(self, store: Store, versions: LocalVersions, catalog: Catalog,
                 is_predict: Callable[[str], Awaitable[bool]], owned_rollouts: set[str]) -> None:
        self._store = store
        self._versions = versions
        self._catalog = catalog
        self._is_predict = is_predict
        self._owned = owned_rollouts  # deployment ids this router is rolling out: it drains them itself
        self._locks: dict[str, asyncio.Lock] = {}

    async def reconcile(self, model_name: str) -> None:
        async with self._locks.setdefault(model_name, asyncio.Lock()):
            deployments = await self._store.list_deployments(model_name)
            traffic = await self._store.get_traffic(model_name)
            for record in deployments:
                key = (record.model_name, record.version)
                if record.status is DeploymentStatus.ACTIVE and key not in self._versions:
                    # After a restart, or a deploy accepted by another router: run it here too.
                    await self._versions.launch(record, await self._is_predict(model_name))
                elif record.status in (DeploymentStatus.RETIRED, DeploymentStatus.FAILED) and key in self._versions:
                    if not any(d.version == record.version and d.status is not record.status for d in deployments
                               if d.created_at > record.created_at):
                        self._versions.retire(key)
                elif record.status is DeploymentStatus.DRAINING and key in self._versions \
                        and record.id not in self._owned:
                    self._versions.retire(key)
                elif record.status is DeploymentStatus.ACTIVE and not record.operation and record.id not in self._owned:
                    # The desired count changed (the autoscaler, on this router or another): follow it. Not while
                    # an operation (a rolling update, a drain) moves this version's replicas itself.
                    self._versions.scale_to(record)
            self._catalog.set_split(model_name, traffic.split)
