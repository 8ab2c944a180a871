"""The replica backend: the one seam between the control plane and where engines run.

The control plane says *what* to serve (an ``EngineSpec``) and *how many*;
a backend (``local``: processes on this machine; Kubernetes: a Deployment per
version) runs them and hands back ``Endpoint``s. The router routes to an
endpoint through its URL and keeps its ``outstanding`` count; the backend
owns its ``state``. Nothing here knows about HTTP routing, catalogs or stores,
so a backend can be tested alone (``tests/test_backend_contract.py`` runs the
same suite against every backend).

Contract, per method:

- ``start(spec, n)`` returns at once with ``n`` endpoints in state STARTING;
  they become READY in the background (``wait_ready`` waits).
- ``scale(set, n)`` adds endpoints (STARTING, returned) or drains and stops the
  oldest ones until ``n`` are live; the set's ``endpoints`` list changes in
  place, so a router holding it sees the change without a callback.
- ``wait_ready(endpoints)`` raises ``ReplicaStartError`` for the first one
  that fails to start or does not get ready in time.
- ``retire(set, drain)`` stops every endpoint of the set; with ``drain``,
  in-flight requests (``outstanding``) finish first, bounded by the backend's
  drain timeout. Retiring twice is harmless.
- ``report_failure(endpoint, reason)``: the router saw the endpoint refuse a
  connection; a READY endpoint is ejected until its health check passes.
- ``capacity(spec)`` how many replicas of the spec fit (the machine's cores and
  memory locally; a cluster's quota on Kubernetes), so that a policy asking
  for more is refused with what fits.
- ``leading()`` whether this router runs the control loops that act on the replicas (locally always;
  on Kubernetes, where several routers share the pods, the holder of a Lease).
- ``close()`` retires everything the backend started (a Kubernetes backend of a router in a cluster
  leaves its Deployments to the next router).
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from llmserve.replicas.capacity import Capacity
from llmserve.replicas.spec import EngineSpec


class EndpointState(str, enum.Enum):
    STARTING = "starting"  # launched, not yet answering health checks and warm-up
    READY = "ready"  # receives traffic
    UNHEALTHY = "unhealthy"  # ejected: failed health checks or refused connections
    RESTARTING = "restarting"  # crashed; waiting out the backoff before a new process
    DRAINING = "draining"  # no new traffic; in-flight requests finish
    STOPPED = "stopped"


LIVE_STATES = frozenset(EndpointState) - {EndpointState.STOPPED}


@dataclass(eq=False)
class Endpoint:
    """One replica as the router sees it: where it listens and whether it takes traffic.

    ``details`` holds what only its backend knows (a pid and a log file
    locally, a pod name on Kubernetes), for the operator's views.
    """

    id: str
    model_name: str
    version: str
    url: str = ""
    state: EndpointState = EndpointState.STARTING
    outstanding: int = 0  # requests the router has in flight here (least-outstanding balancing, draining)
    restarts: int = 0
    ever_ready: bool = False  # has been READY at least once (a crash since does not undo it)
    last_error: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    _idle: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def __post_init__(self) -> None:
        if self.outstanding <= 0:
            self._idle.set()

    def __setattr__(self, name: str, value: Any) -> None:
        # A plain attribute, so the balancer's reads on every request stay cheap; the (rarer)
        # writes of ``outstanding`` keep the idle event current, so a drain waits without polling.
        object.__setattr__(self, name, value)
        if name == "outstanding" and "_idle" in self.__dict__:
            if value <= 0:
                self._idle.set()
            else:
                self._idle.clear()

    async def idle(self) -> None:
        """Return once no request is in flight here."""
        await self._idle.wait()

    @property
    def routable(self) -> bool:
        return self.state is EndpointState.READY

    def describe(self) -> dict[str, object]:
        return {
            "id": self.id,
            "model": self.model_name,
            "version": self.version,
            "state": self.state.value,
            "url": self.url,
            "outstanding": self.outstanding,
            "restarts": self.restarts,
            "last_error": self.last_error,
            **self.details,
        }


@dataclass(eq=False)
class ReplicaSet:
    """The endpoints of one version, as started by one backend."""

    spec: EngineSpec
    endpoints: list[Endpoint] = field(default_factory=list)

    @property
    def model_name(self) -> str:
        return self.spec.model_name

    @property
    def version(self) -> str:
        return self.spec.version

    @property
    def live(self) -> list[Endpoint]:
        return [e for e in self.endpoints if e.state in LIVE_STATES]


class ReplicaBackend(Protocol):
    """Runs engine replicas of ``EngineSpec``s (``local.LocalBackend``; a Kubernetes one beside it)."""

    async def start(self, spec: EngineSpec, replicas: int) -> ReplicaSet: ...

    async def scale(self, replica_set: ReplicaSet, replicas: int) -> list[Endpoint]: ...

    async def wait_ready(self, endpoints: Iterable[Endpoint]) -> None: ...

    async def retire(self, replica_set: ReplicaSet, drain: bool = True) -> None: ...

    def report_failure(self, endpoint: Endpoint, reason: str) -> None: ...

    def endpoints(self) -> list[Endpoint]: ...

    def capacity(self, spec: EngineSpec) -> Capacity:
        """How many replicas of ``spec`` the backend can run at most, and what bounds it."""
        ...

    def leading(self) -> bool: ...

    async def close(self) -> None: ...
