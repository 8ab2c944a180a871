"""A whole router over simulated engines, for the tests and benchmarks: ``llmserve.server.build``
with the local backend running ``loadtest.sim`` (or any program) instead of vLLM."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from llmserve.replicas.local import LocalBackend
from llmserve.replicas.process import ReplicaProgram
from llmserve.replicas.spec import EngineSpec
from llmserve.server import Server, build
from llmserve.settings import EngineSettings, RouterSettings, Settings
from loadtest.sim import SimEngineProgram
from router.store import Store


@dataclass(frozen=True)
class StaticVersion:
    """A version served from the start, without a store: what runs, how long its context, how many copies."""

    program: ReplicaProgram
    max_model_len: int = 2048
    replicas: int = 1


def fast_sim(spec: EngineSpec) -> ReplicaProgram:
    """What a version deployed through the control plane runs, unless a test says otherwise."""
    return SimEngineProgram(spec.model_name, spec.version, ttft_ms=5, itl_ms=5)


def sim_server(
    data_dir: Path,
    versions: Sequence[StaticVersion] = (),
    router: RouterSettings | None = None,
    engine: EngineSettings | None = None,
    store: Store | None = None,
    program: Callable[[EngineSpec], ReplicaProgram] = fast_sim,
) -> Server:
    """``build`` with ``versions`` as static versions and ``program`` for what the control plane deploys."""
    settings = Settings(data_dir=data_dir, router=router or RouterSettings(), engine=engine or EngineSettings())
    programs = {(v.program.model_name, v.program.version): v.program for v in versions}
    static = [(EngineSpec(model_dir=data_dir, model_name=v.program.model_name, version=v.program.version,
                          max_model_len=v.max_model_len), v.replicas) for v in versions]

    def run(spec: EngineSpec) -> ReplicaProgram:
        return programs.get((spec.model_name, spec.version)) or program(spec)

    backend = LocalBackend(settings.engine, data_dir / "logs", program=run)
    chosen: Store | Literal["settings"] | None = store
    return build(settings, backend=backend, store=chosen, static=static, models_dir=data_dir / "models")
