"""Requests for a version scaled to zero are held while its first replica starts, not refused.

A version the autoscaler may start from zero (``allow``) that has no replica
able to answer holds each request in a bounded queue: ``max_held`` per
version (past it 429 with Retry-After at once) for at most ``max_wait_s``
(past it 503 with Retry-After). A held request is demand: the autoscaler is
woken at once (``Demand.on_cold_demand``) and starts the first replica in the
same moment, rather than at its next period. Streams are answered at once
and get an SSE comment every few seconds while they wait (``Hold.wait``
yields), so that neither the client nor a proxy between times out; no
anchor streams progress during a cold start (KServe answers 400, the vLLM
production-stack router 503 without Retry-After).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

from router.errors import NoReplicaReady, QueueFull
from router.traffic.catalog import ServedVersion
from router.traffic.demand import Counts, Demand

Released = Callable[[str, str, float], None]
_POLL_S = 0.05  # how often a held request looks for a ready replica (replica states notify nobody)


class Hold:
    """One request's place in a version's cold-start queue; ``wait`` releases it whatever happens."""

    def __init__(self, served: ServedVersion, counts: Counts, max_wait_s: float, retry_after_s: int,
                 on_released: Released) -> None:
        self.served = served
        self._counts = counts
        self._on_released = on_released
        self._max_wait_s = max_wait_s
        self._retry_after_s = retry_after_s
        self.started = time.monotonic()
        self.waited_s = 0.0
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._counts.held -= 1
            self.waited_s = time.monotonic() - self.started
            self._on_released(self.served.model_name, self.served.version, self.waited_s)

    async def wait(self, keepalive_s: float = 5.0) -> AsyncIterator[float]:
        """Return once a replica can answer; yields the seconds waited every ``keepalive_s`` meanwhile.
        Past ``max_wait_s``: ``NoReplicaReady`` (503, Retry-After)."""
        next_beat = self.started + keepalive_s
        try:
            while not self.served.can_answer:
                now = time.monotonic()
                if now - self.started >= self._max_wait_s:
                    raise NoReplicaReady(self.served.model_name, self.served.version, self._retry_after_s,
                                         detail=f"scaled to zero; no replica started within {self._max_wait_s:g}s "
                                                "(autoscale.hold_timeout_s)")
                if now >= next_beat:
                    next_beat = now + keepalive_s
                    yield now - self.started
                await asyncio.sleep(_POLL_S)
        finally:
            self.release()

    async def wait_quietly(self) -> None:
        async for _ in self.wait(keepalive_s=3600):
            pass


class ColdStarts:
    def __init__(self, demand: Demand, max_held: int = 256, max_wait_s: float = 300.0, retry_after_s: int = 5,
                 on_released: Released = lambda _model, _version, _waited_s: None) -> None:
        self._demand = demand
        self._on_released = on_released  # (model, version, seconds held): the wait's histogram
        self.max_held = max_held
        self.max_wait_s = max_wait_s
        self._retry_after_s = retry_after_s
        self._scalable: set[tuple[str, str]] = set()

    def allow(self, model: str, version: str, scalable: bool) -> None:
        """Whether requests for this version are held while it has no replica (the autoscaler says)."""
        if scalable:
            self._scalable.add((model, version))
        else:
            self._scalable.discard((model, version))

    def needs_hold(self, served: ServedVersion) -> bool:
        return (served.replica_set is not None and (served.model_name, served.version) in self._scalable
                and not served.can_answer)

    def reserve(self, served: ServedVersion) -> Hold:
        """A place in the version's queue, or 429 with Retry-After when it is full."""
        counts = self._demand.of(served.model_name, served.version)
        if counts.held >= self.max_held:
            raise QueueFull(f"{served.versioned_name} is starting from zero and already holds {counts.held} "
                            f"requests (autoscale.max_held); retry in {self._retry_after_s}s", self._retry_after_s)
        counts.held += 1
        self._demand.on_cold_demand(served.model_name, served.version)
        return Hold(served, counts, self.max_wait_s, self._retry_after_s, self._on_released)
