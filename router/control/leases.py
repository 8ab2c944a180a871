"""Durable ownership of the operations a router drives, so that one which dies mid-way is noticed.

Every deploy (its whole rollout: replicas, activation, canary steps, a rolling
replacement) and every drain of a version (a rollback, a delete) writes on its
deployment record which operation is in progress, which router drives it and
until when: a lease. The driving router renews its leases every third of
``lease_s``; a terminal status (retired, failed) or an explicit release clears
them. A router that is SIGKILLed stops renewing; once the lease has expired,
any router (the restarted one too) claims the operation with a compare-and-set
on (driver, lease_until) and settles it (``recovery``). A router that finds on
renewal that another has claimed its operation stops driving it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass

from router.store import DeploymentRecord, DeploymentStatus, Store, StoreError

logger = logging.getLogger(__name__)

DEPLOY = "deploy"
RETIRE = "retire"


def driver_id(port: int | None = None) -> str:
    """Who drives an operation. With the port, the same across restarts of a router on this host (a pod
    keeps its name through a container restart): the restarted router knows its predecessor's leases as
    its own and settles them at once, before anything else starts, instead of waiting for them to expire.
    Without one, unique to this process."""
    if port is not None:
        return f"{socket.gethostname()}:{port}"
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def orphaned(record: DeploymentRecord, now: float, me: str, driving_here: Collection[str]) -> bool:
    """Whether an operation on ``record`` has nobody driving it.

    Its lease expired at ``now``; or it names this router (``me``) but no task
    here drives it any more (the task ended on an error, say a store outage,
    before it could finish): no need to wait out our own lease then. A drain
    recorded before deployments carried leases has no operation: orphaned.
    """
    if not record.operation:
        return record.status is DeploymentStatus.DRAINING
    if record.driver == me:
        return record.id not in driving_here
    return record.lease_until < now


@dataclass
class _Held:
    operation: str
    until: float
    finished: bool = False  # released, but the write that clears it has not succeeded yet


class Leases:
    def __init__(self, store: Store, router_id: str, lease_s: float,
                 on_lost: Callable[[str], None] = lambda _id: None, clock: Callable[[], float] = time.time) -> None:
        self.router_id = router_id
        self.lease_s = lease_s
        self._store = store
        self._on_lost = on_lost
        self._clock = clock
        self._held: dict[str, _Held] = {}
        # One lease write at a time: a renewal racing a release could otherwise leave a finished
        # operation's lease behind, and recovery would settle an operation that had completed.
        self._writing = asyncio.Lock()

    def driving(self) -> set[str]:
        return set(self._held)

    def operation(self, deployment_id: str) -> str | None:
        held = self._held.get(deployment_id)
        return held.operation if held else None

    def new_lease(self, operation: str) -> tuple[str, str, float]:
        """(operation, driver, lease_until) for a record created with its operation already in progress."""
        return operation, self.router_id, self._clock() + self.lease_s

    def hold(self, deployment_id: str, operation: str, until: float) -> None:
        """Count as ours a lease already written (with the record that created it)."""
        self._held[deployment_id] = _Held(operation, until)

    async def take(self, deployment_id: str, operation: str,
                   expected: tuple[str, float] | None = None) -> bool:
        """Write this router's lease on the deployment; with ``expected`` only if that is what is stored
        (claiming an orphan: two routers racing for it, one wins)."""
        async with self._writing:
            until = self._clock() + self.lease_s
            # held before the write: a sweep listing the record meanwhile must not take it for an orphan
            previous = self._held.get(deployment_id)
            held = self._held[deployment_id] = _Held(operation, until)
            try:
                taken = await self._store.set_driver(deployment_id, operation, self.router_id, until, expected)
            except BaseException:
                self._restore(deployment_id, held, previous)
                raise
            if not taken:
                self._restore(deployment_id, held, previous)
            return taken

    def _restore(self, deployment_id: str, held: _Held, previous: _Held | None) -> None:
        if self._held.get(deployment_id) is not held:
            return
        if previous is None:
            del self._held[deployment_id]
        else:
            self._held[deployment_id] = previous

    def forget(self, deployment_id: str) -> None:
        """The operation ended with a terminal status (which cleared the lease in the store)."""
        self._held.pop(deployment_id, None)

    async def release(self, deployment_id: str, operation: str) -> None:
        """The operation finished without a terminal status: clear the lease if it is still ours for it."""
        held = self._held.get(deployment_id)
        if held is None or held.operation != operation:
            return
        # Until the clearing write succeeds the lease stays held (renewal retries the clearing): dropped
        # now, recovery would take the finished operation for an orphan and settle it again.
        held.finished = True
        async with self._writing:
            if self._held.get(deployment_id) is held:
                try:
                    await self._clear(deployment_id, held)
                except StoreError as exc:  # still held, finished: the next renewal clears it
                    logger.warning("clearing the lease on deployment %s failed (%s); retried at renewal",
                                   deployment_id, exc)

    async def _clear(self, deployment_id: str, held: _Held) -> None:
        await self._store.set_driver(deployment_id, "", "", 0.0, expected=(self.router_id, held.until))
        del self._held[deployment_id]

    async def renew(self) -> None:
        """Push every lease this router holds forward (or clear the finished ones); one that another
        router claimed is dropped and ``on_lost`` told."""
        for deployment_id in list(self._held):
            async with self._writing:
                held = self._held.get(deployment_id)
                if held is None:
                    continue  # released meanwhile
                if held.finished:
                    await self._clear(deployment_id, held)
                    continue
                until = self._clock() + self.lease_s
                if await self._store.set_driver(deployment_id, held.operation, self.router_id, until,
                                                expected=(self.router_id, held.until)):
                    held.until = until
                    continue
                del self._held[deployment_id]
            logger.warning("the lease on deployment %s (%s) was claimed by another router; "
                           "this router stops driving it", deployment_id, held.operation)
            self._on_lost(deployment_id)
