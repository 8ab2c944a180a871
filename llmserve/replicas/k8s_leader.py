"""Leader election among routers with a coordination.k8s.io Lease, as client-go's leaderelection does.

Every router serves traffic; one leads the control loops that act on the cluster (the autoscaler).
The leader renews the Lease every third of its duration; a follower takes it over once its renewTime
is older than the duration (a leader that died), or at once when the leader released it on a clean
stop. Each write carries the resourceVersion it read, so two routers racing for the Lease cannot
both win: the apiserver refuses the second with 409.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

logger = logging.getLogger(__name__)


def _micro(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(text: str | None) -> datetime | None:
    if not text:
        return None
    for layout in ("%Y-%m-%dT%H:%M:%S.%fZ", "%Y-%m-%dT%H:%M:%SZ"):
        with contextlib.suppress(ValueError):
            return datetime.strptime(text, layout).replace(tzinfo=timezone.utc)
    return None


class LeaseElector:
    def __init__(self, api: client.ApiClient, namespace: str, name: str, identity: str, lease_s: float,
                 now: Callable[[], datetime] = lambda: datetime.now(timezone.utc)) -> None:
        self._api = client.CoordinationV1Api(api)
        self._namespace = namespace
        self._name = name
        self.identity = identity
        self._lease_s = lease_s
        self._now = now
        self.leader = False
        self.holder: str | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="lease elector")

    async def close(self, release: bool = True) -> None:
        """Stop; with ``release``, a leader gives the Lease up so a follower takes over at once."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if release and self.leader:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self._try, True)
        self.leader = False

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self._try, False)
            except Exception as exc:  # the apiserver unreachable: a leader that cannot renew steps down
                if self.leader:
                    logger.warning("lost the %s Lease: %s", self._name, exc)
                self.leader = False
            await asyncio.sleep(self._lease_s / 3 if self.leader else min(1.0, self._lease_s / 3))

    def _try(self, release: bool) -> None:
        now = self._now()
        try:
            raw: Any = self._api.read_namespaced_lease(self._name, self._namespace, _preload_content=False,
                                                       _request_timeout=5)
            lease: dict[str, Any] = json.loads(raw.data)
        except ApiException as exc:
            if exc.status != 404 or release:
                raise
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self._name, "namespace": self._namespace},
                    "spec": self._spec(now, now, 0)}
            try:
                self._api.create_namespaced_lease(self._namespace, body, _preload_content=False,  # type: ignore[arg-type]
                                                  _request_timeout=5)
            except ApiException as created:
                if created.status == 409:  # another router created it first
                    return
                raise
            self._became(True, self.identity)
            return
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        renewed = _parse(spec.get("renewTime"))
        duration = float(spec.get("leaseDurationSeconds") or self._lease_s)
        expired = renewed is None or (now - renewed).total_seconds() > duration
        if release:
            if holder != self.identity:
                return
            lease["spec"] = {**spec, "holderIdentity": "", "renewTime": None}
        elif holder == self.identity:
            lease["spec"] = {**spec, "renewTime": _micro(now), "leaseDurationSeconds": int(self._lease_s)}
        elif holder and not expired:
            self._became(False, holder)
            return
        else:
            transitions = int(spec.get("leaseTransitions") or 0) + 1
            lease["spec"] = self._spec(now, now, transitions)
        try:
            self._api.replace_namespaced_lease(self._name, self._namespace, lease, _preload_content=False,  # type: ignore[arg-type]
                                               _request_timeout=5)
        except ApiException as exc:
            if exc.status == 409:  # it changed since we read it: someone else renewed or took it
                self._became(False, holder)
                return
            raise
        self._became(not release, "" if release else self.identity)

    def _spec(self, acquired: datetime, renewed: datetime, transitions: int) -> dict[str, Any]:
        return {"holderIdentity": self.identity, "leaseDurationSeconds": int(max(1, self._lease_s)),
                "acquireTime": _micro(acquired), "renewTime": _micro(renewed), "leaseTransitions": transitions}

    def _became(self, leader: bool, holder: str) -> None:
        if leader != self.leader:
            logger.info("%s the %s Lease (holder: %s)", "acquired" if leader else "following", self._name, holder)
        self.leader = leader
        self.holder = holder or None
