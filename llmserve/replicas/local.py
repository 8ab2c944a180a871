"""The local replica backend: each replica a process on this machine, under one supervisor.

``LocalBackend`` implements ``ReplicaBackend``. It turns an ``EngineSpec``
into a program to run with ``program`` (by default the spec itself: vLLM's
OpenAI server; the tests map specs to the simulated engine) and hands the
supervisor the process life cycle: ports, health checks, restarts with
backoff, drain and stop.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path

from llmserve.replicas.backend import Endpoint, ReplicaSet
from llmserve.replicas.capacity import Capacity, capacity
from llmserve.replicas.process import LocalReplica, ReplicaProgram
from llmserve.replicas.spec import EngineSpec
from llmserve.replicas.supervisor import Supervisor
from llmserve.settings import EngineSettings

# What a replica of a spec runs. The identity for vLLM: EngineSpec is a ReplicaProgram.
ProgramFactory = Callable[[EngineSpec], ReplicaProgram]


def vllm_program(spec: EngineSpec) -> ReplicaProgram:
    return spec


class LocalBackend:
    def __init__(self, settings: EngineSettings, logs_dir: Path, program: ProgramFactory = vllm_program) -> None:
        self._program = program
        self.supervisor = Supervisor(settings, logs_dir)
        self._replicas: dict[Endpoint, LocalReplica] = {}
        self._next_index: dict[str, int] = {}  # versioned name -> next replica index, so ids stay unique

    async def start(self, spec: EngineSpec, replicas: int) -> ReplicaSet:
        # The set's spec says what actually runs: a substitute program (the simulated engine)
        # brings its own generation defaults, and the router must apply the same ones.
        generation = getattr(self._program(spec), "generation", spec.generation)
        replica_set = ReplicaSet(dataclasses.replace(spec, generation=generation))
        await self.scale(replica_set, replicas)
        return replica_set

    async def scale(self, replica_set: ReplicaSet, replicas: int) -> list[Endpoint]:
        live = replica_set.live
        added = [self._add(replica_set) for _ in range(replicas - len(live))]
        surplus = live[:max(0, len(live) - replicas)]  # the oldest go first
        await asyncio.gather(*(self._remove(replica_set, e, drain=True) for e in surplus))
        return added

    async def wait_ready(self, endpoints: Iterable[Endpoint]) -> None:
        await asyncio.gather(*(self.supervisor.wait_ready(self._replicas[e]) for e in endpoints))

    async def retire(self, replica_set: ReplicaSet, drain: bool = True) -> None:
        await asyncio.gather(*(self._remove(replica_set, e, drain, keep=True) for e in list(replica_set.endpoints)))

    def report_failure(self, endpoint: Endpoint, reason: str) -> None:
        replica = self._replicas.get(endpoint)
        if replica is not None:
            self.supervisor.report_failure(replica, reason)

    def endpoints(self) -> list[Endpoint]:
        return list(self._replicas)

    def capacity(self, spec: EngineSpec) -> Capacity:
        """How many replicas of ``spec`` this machine can run (``capacity``)."""
        return capacity(spec, self._program(spec))

    def leading(self) -> bool:
        """A local router leads its own replicas (several routers on one Redis each run their own)."""
        return True

    def process(self, endpoint: Endpoint) -> LocalReplica:
        """The process behind an endpoint (pid, port, log file): for operators and tests."""
        return self._replicas[endpoint]

    async def close(self) -> None:
        await self.supervisor.shutdown()

    def _add(self, replica_set: ReplicaSet) -> Endpoint:
        program = self._program(replica_set.spec)
        index = self._next_index.get(program.versioned_name, 0)
        self._next_index[program.versioned_name] = index + 1
        replica = self.supervisor.start(program, index)
        self._replicas[replica.endpoint] = replica
        replica_set.endpoints.append(replica.endpoint)
        return replica.endpoint

    async def _remove(self, replica_set: ReplicaSet, endpoint: Endpoint, drain: bool, keep: bool = False) -> None:
        """Drain and stop one endpoint; it leaves the set unless ``keep`` (a retired set keeps its record)."""
        replica = self._replicas.get(endpoint)
        if replica is not None:
            await self.supervisor.stop(replica, drain=drain)
            if replica in self.supervisor.replicas:
                self.supervisor.replicas.remove(replica)
            self._replicas.pop(endpoint, None)
        if not keep and endpoint in replica_set.endpoints:
            replica_set.endpoints.remove(endpoint)
