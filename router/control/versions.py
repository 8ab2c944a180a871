"""This router's running versions: engine replica sets from the backend, predictors from the host.

The control plane decides which versions should run; this is where they are
started, found and stopped on this router, and where the catalog learns of
them. A version retires at most once however often it is asked (a rollback
and a store change can both ask).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmserve.errors import EngineSettingsError, LaunchFailed, LLMServeError
from llmserve.loops import Tasks
from llmserve.models.repository import Manifest
from llmserve.replicas.backend import ReplicaBackend
from llmserve.replicas.spec import EngineSpec
from llmserve.settings import EngineSettings
from router.predict.host import Predictor, PredictorHost
from router.store import DeploymentRecord
from router.traffic.catalog import Catalog, ServedVersion

logger = logging.getLogger(__name__)

VersionKey = tuple[str, str]  # (model name, version)

# (model name, version, model folder, engine overrides) -> the engine to run; raises ValueError when they do not fit
SpecBuilder = Callable[[str, str, Path, dict[str, Any]], EngineSpec]


def spec_builder(engine: EngineSettings) -> SpecBuilder:
    """Specs from the router's engine settings with each version's overrides (no speculation)."""

    def build(model_name: str, version: str, model_dir: Path, overrides: dict[str, Any]) -> EngineSpec:
        settings = engine.with_overrides(overrides) if overrides else engine
        return EngineSpec.from_settings(model_dir, model_name, version, settings)

    return build


class NoPredictorHost:
    """The null host of a router that serves no traditional models."""

    async def load(self, model_name: str, version: str, model_dir: Path,
                   overrides: dict[str, Any] | None = None) -> Predictor:
        raise LaunchFailed("this router does not host traditional models")

    async def retire(self, predictor: Predictor, drain: bool = True) -> None:
        return None


class LocalVersions:
    def __init__(self, backend: ReplicaBackend, predictors: PredictorHost | NoPredictorHost, catalog: Catalog,
                 specs: SpecBuilder, tasks: Tasks) -> None:
        self.backend = backend
        self._predictors = predictors
        self._catalog = catalog
        self._specs = specs
        self._tasks = tasks
        self._served: dict[VersionKey, ServedVersion] = {}
        self._retiring: dict[VersionKey, asyncio.Task[None]] = {}
        self._scale_targets: dict[VersionKey, int] = {}
        self._scaling: dict[VersionKey, asyncio.Task[None]] = {}

    def items(self) -> list[tuple[VersionKey, ServedVersion]]:
        return list(self._served.items())

    def get(self, key: VersionKey) -> ServedVersion | None:
        return self._served.get(key)

    def __contains__(self, key: VersionKey) -> bool:
        return key in self._served

    def spec_for(self, record: DeploymentRecord) -> EngineSpec:
        """What a replica of the record runs (the running set's own spec once launched); ValueError when its
        engine overrides do not fit the settings."""
        served = self._served.get((record.model_name, record.version))
        if served is not None and served.replica_set is not None:
            return served.replica_set.spec
        return self._specs(record.model_name, record.version, Path(record.model_dir), record.engine)

    async def launch(self, record: DeploymentRecord, predict: bool, replicas: int | None = None) -> ServedVersion:
        """Start a version (engine replicas STARTING; a predictor loaded) and add it to the catalog.

        Raises ``LLMServeError`` (``LaunchFailed``, ``ManifestError``...) with the reason.
        """
        folder = Path(record.model_dir)
        if predict:  # loading checks the folder, the file and a first prediction
            predictor = await self._predictors.load(record.model_name, record.version, folder, record.engine)
            if record.autoscaling:  # the autoscaler's desired count is its batcher's threads
                predictor.batcher.resize(record.replicas)
            served = ServedVersion(record.model_name, record.version, max_model_len=0, predictor=predictor)
        else:
            try:
                Manifest.read(folder)
            except LLMServeError as exc:
                raise LaunchFailed(f"{exc}; prepare it with `llmserve prepare --name {record.model_name} "
                                   f"--version {record.version} --source ...`") from None
            try:
                spec = self._specs(record.model_name, record.version, folder, record.engine)
                if record.gpu:  # the deployment's resources.gpu: what a Kubernetes pod requests
                    spec = dataclasses.replace(spec, gpus=record.gpu)
            except ValueError as exc:  # pydantic's ValidationError is one: the overrides do not fit the settings
                raise EngineSettingsError(f"the engine settings of {record.model_name}:{record.version} do not fit: "
                                   f"{exc}") from None
            replica_set = await self.backend.start(spec, record.replicas if replicas is None else replicas)
            served = ServedVersion.of(replica_set)
        self._served[(record.model_name, record.version)] = served
        self._catalog.add_version(served)
        return served

    async def wait_ready(self, served: ServedVersion) -> None:
        if served.replica_set is not None:
            await self.backend.wait_ready(served.replicas)

    def scale_to(self, record: DeploymentRecord) -> None:
        """Bring the version's live replicas here to the record's (the store's desired count), in the
        background: a scale-down drains (in-flight streams finish, bounded by the drain timeout) before a
        replica stops. One scaling task per version; a newer target replaces the one it works towards."""
        key, replicas = (record.model_name, record.version), record.replicas
        served = self._served.get(key)
        if served is not None and served.predictor is not None:
            if record.autoscaling:  # its batcher's threads; without a policy, its batching.instances stand
                served.predictor.batcher.resize(replicas)
            return
        if served is None or served.replica_set is None:
            return
        self._scale_targets[key] = replicas
        if key not in self._scaling and len(served.replica_set.live) != replicas:
            task = self._tasks.spawn(self._scale(key), name=f"scale {key[0]}:{key[1]}")
            self._scaling[key] = task
            task.add_done_callback(lambda _done: self._scaling.pop(key, None))

    async def _scale(self, key: VersionKey) -> None:
        while True:
            served, target = self._served.get(key), self._scale_targets.get(key)
            if served is None or served.replica_set is None or target is None:
                return
            before = len(served.replica_set.live)
            if before == target:
                return
            logger.info("scaling %s:%s from %d to %d replicas", key[0], key[1], before, target)
            await self.backend.scale(served.replica_set, target)
            if len(served.replica_set.live) == before:  # the backend could not change it: not a busy loop
                logger.warning("scaling %s:%s to %d left it at %d", key[0], key[1], target, before)
                return

    async def stop_now(self, key: VersionKey) -> None:
        """A version that failed to roll out: no drain, it never had traffic."""
        served = self._served.pop(key, None)
        if served is not None:
            self._catalog.remove_version(*key)
            await self._stop(served, drain=False)

    def retire(self, key: VersionKey) -> asyncio.Task[None]:
        """Drain and stop a version here; one task per version however often asked."""
        task = self._retiring.get(key)
        if task is None:
            task = self._tasks.spawn(self._drain_and_stop(key), name=f"retire {key[0]}:{key[1]}")
            self._retiring[key] = task
            task.add_done_callback(lambda _done: self._retiring.pop(key, None))
        return task

    async def _drain_and_stop(self, key: VersionKey) -> None:
        served = self._served.pop(key, None)
        if served is not None:
            await self._stop(served, drain=True)
            self._catalog.remove_version(*key)

    async def _stop(self, served: ServedVersion, drain: bool) -> None:
        if served.replica_set is not None:
            await self.backend.retire(served.replica_set, drain=drain)
        if served.predictor is not None:
            await self._predictors.retire(served.predictor, drain=drain)
