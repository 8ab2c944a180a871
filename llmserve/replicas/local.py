"""The local engine backend: replicas as processes under one supervisor.

Static deployments given at construction start with the router; the control
plane adds and retires versions at run time through ``launch`` and
``retire``. A version's replicas join the catalog at once in state STARTING,
so the router answers (503 with Retry-After, /readyz false) while engines load.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmserve.errors import EngineSettingsError
from llmserve.replicas.endpoint import Replica, ReplicaProgram
from llmserve.replicas.supervisor import Supervisor
from llmserve.settings import EngineSettings
from router.traffic.catalog import Catalog, ServedVersion

logger = logging.getLogger(__name__)

# (model name, version, model folder, engine setting overrides) -> what to run
ProgramFactory = Callable[[str, str, Path, dict[str, Any]], ReplicaProgram]


@dataclass(frozen=True)
class Deployment:
    """One model version to run: what to launch and how many copies."""

    program: ReplicaProgram
    max_model_len: int
    replicas: int = 1


class LocalStack:
    def __init__(
        self,
        engine_settings: EngineSettings,
        logs_dir: Path,
        deployments: list[Deployment] | None = None,
        on_ready: Callable[[], None] | None = None,
        program_factory: ProgramFactory | None = None,
    ) -> None:
        self._deployments = deployments or []
        self._on_ready = on_ready
        self._program_factory = program_factory
        self._max_model_len = engine_settings.max_model_len
        self.supervisor = Supervisor(engine_settings, logs_dir)
        self._ready_task: asyncio.Task[None] | None = None
        # What each version runs, so a rolling update can add replicas one at a time.
        self._programs: dict[tuple[str, str], ReplicaProgram] = {}

    async def start(self, catalog: Catalog) -> None:
        for deployment in self._deployments:
            program = deployment.program
            served = ServedVersion(program.model_name, program.version, deployment.max_model_len,
                                   generation=program.generation)
            self._programs[(program.model_name, program.version)] = program
            for index in range(deployment.replicas):
                served.replicas.append(self.supervisor.start(program, index))
            catalog.add_version(served)
        if self._deployments:
            self._ready_task = asyncio.create_task(self._announce_ready(), name="announce ready")

    async def launch(
        self, model_name: str, version: str, model_dir: Path, replicas: int, engine: dict[str, Any] | None = None
    ) -> ServedVersion:
        """Start a version's replicas (state STARTING); the caller adds it to the catalog."""
        if self._program_factory is None:
            raise RuntimeError("this stack was built without a program factory; it cannot launch versions")
        engine = engine or {}
        try:
            program = self._program_factory(model_name, version, model_dir, engine)
        except ValueError as exc:  # pydantic's ValidationError is one: the overrides do not fit the settings
            raise EngineSettingsError(f"the engine settings of {model_name}:{version} do not fit: {exc}") from None
        self._programs[(model_name, version)] = program
        served = ServedVersion(model_name, version, int(engine.get("max_model_len", self._max_model_len)),
                               generation=program.generation)
        served.replicas = [self.supervisor.start(program, index) for index in range(replicas)]
        return served

    async def wait_ready(self, served: ServedVersion) -> None:
        await asyncio.gather(*(self.supervisor.wait_ready(r) for r in served.replicas))

    def add_replica(self, served: ServedVersion) -> Replica:
        """Start one more replica of a launched version (state STARTING); it joins ``served`` at once."""
        program = self._programs.get((served.model_name, served.version))
        if program is None:
            raise RuntimeError(f"{served.versioned_name} was not launched by this stack")
        index = max((r.index for r in served.replicas), default=-1) + 1
        replica = self.supervisor.start(program, index)
        served.replicas.append(replica)
        return replica

    async def wait_replica_ready(self, replica: Replica) -> None:
        await self.supervisor.wait_ready(replica)

    async def remove_replica(self, served: ServedVersion, replica: Replica, drain: bool = True) -> None:
        """Drain (in-flight requests finish) and stop one replica, then forget it."""
        await self.supervisor.stop(replica, drain=drain)
        if replica in served.replicas:
            served.replicas.remove(replica)
        if replica in self.supervisor.replicas:
            self.supervisor.replicas.remove(replica)

    async def retire(self, served: ServedVersion, drain: bool = True) -> None:
        await asyncio.gather(*(self.supervisor.stop(r, drain=drain) for r in served.replicas))
        for replica in served.replicas:
            if replica in self.supervisor.replicas:
                self.supervisor.replicas.remove(replica)

    async def _announce_ready(self) -> None:
        results = await asyncio.gather(
            *(self.supervisor.wait_ready(r) for r in self.supervisor.replicas), return_exceptions=True
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        for failure in failures:
            logger.error("%s", failure)
        if not failures and self._on_ready is not None:
            self._on_ready()

    async def stop(self) -> None:
        if self._ready_task is not None:
            self._ready_task.cancel()
        await self.supervisor.shutdown()

    def report_failure(self, replica: Replica, reason: str) -> None:
        self.supervisor.report_failure(replica, reason)
