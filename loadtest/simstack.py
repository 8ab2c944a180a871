"""A whole router over simulated engines, for the tests and benchmarks: ``llmserve.server.build``
with the local backend running ``loadtest.sim`` (or any program) instead of vLLM."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from llmserve.models.repository import Manifest
from llmserve.replicas.local import LocalBackend
from llmserve.replicas.process import ReplicaProgram
from llmserve.replicas.spec import EngineSpec
from llmserve.server import Server, StartedHook, build
from llmserve.settings import AuthSettings, EngineSettings, RouterSettings, Settings
from loadtest.sim import SimEngineProgram
from router.store import Store


@dataclass(frozen=True)
class StaticVersion:
    """A version served from the start, without a store: what runs, how long its context, how many copies."""

    program: ReplicaProgram
    max_model_len: int = 2048
    replicas: int = 1


def sim_model_folder(models_dir: Path, model: str, version: str, source: str = "simulated") -> Path:
    """The folder a deploy of ``model:version`` checks for: a manifest only (a simulated engine loads no
    weights). Returns it."""
    folder = models_dir / model / version
    folder.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(name=model, version=version, source=source, source_sha256="0" * 64, weights_sha256={},
                        dtype="bfloat16", parameter_count=1, created_at="2026-01-01T00:00:00+00:00")
    (folder / "manifest.json").write_text(manifest.to_json())
    return folder


def open_unless_asked(router: RouterSettings) -> RouterSettings:
    """``router`` with authentication off, unless it was set explicitly."""
    if "auth" in router.model_fields_set:
        return router
    return router.model_copy(update={"auth": AuthSettings(enabled=False)})


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
    models_dir: Path | None = None,
    on_started: StartedHook | None = None,
    shared_limits_url: str | None = None,
) -> Server:
    """``build`` with ``versions`` as static versions and ``program`` for what the control plane deploys.

    The router runs open (no API keys) unless ``router`` sets ``auth`` itself: a simulated stack on a
    loopback port is for tests and benchmarks, and those that are about keys say so."""
    settings = Settings(data_dir=data_dir, router=open_unless_asked(router or RouterSettings()),
                        engine=engine or EngineSettings())
    programs = {(v.program.model_name, v.program.version): v.program for v in versions}
    static = [(EngineSpec(model_dir=data_dir, model_name=v.program.model_name, version=v.program.version,
                          max_model_len=v.max_model_len), v.replicas) for v in versions]

    def run(spec: EngineSpec) -> ReplicaProgram:
        return programs.get((spec.model_name, spec.version)) or program(spec)

    backend = LocalBackend(settings.engine, data_dir / "logs", program=run)
    chosen: Store | Literal["settings"] | None = store
    return build(settings, backend=backend, store=chosen, static=static, models_dir=models_dir or data_dir / "models",
                 on_started=on_started, shared_limits_url=shared_limits_url)


def main(argv: list[str] | None = None) -> int:
    """Serve a router over one simulated chat model (``demo``), with a SQLite (or Redis) store and, optionally,
    the traditional models of a folder deployed: a fast stand-in for ``llmserve up`` (the API fuzzer's target,
    the chaos scenarios' router process). Versions deployed through its API run the simulated engine too."""
    import argparse
    import tempfile

    import uvicorn

    from llmserve.models.predict_manifest import ManifestError, PredictManifest
    from loadtest.overhead import free_port
    from router.store import ModelRecord
    from router.store.redis_store import RedisStore
    from router.store.sqlite import SQLiteStore

    parser = argparse.ArgumentParser(prog="python -m loadtest.simstack", description=main.__doc__)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--data-dir", type=Path, default=None, help="store and logs (default: a new temp folder)")
    parser.add_argument("--predict-models", type=Path, default=None,
                        help="a model repository whose traditional models are registered and deployed at start")
    parser.add_argument("--models-dir", type=Path, default=None,
                        help="the model repository deploys read (default: --predict-models)")
    parser.add_argument("--redis-url", default=None, help="keep the control plane in this Redis instead of SQLite")
    parser.add_argument("--lease-s", type=float, default=15.0, help="RouterSettings.rollout_lease_s")
    parser.add_argument("--deploy-slow-start-s", type=float, default=0.0,
                        help="a deployed version's simulated engine takes this long to become ready")
    # how the demo model's engines behave: the soak sets them so the engines, not this machine's CPUs, bound capacity
    parser.add_argument("--replicas", type=int, default=1, help="simulated engine replicas of demo")
    parser.add_argument("--ttft-ms", type=float, default=5.0)
    parser.add_argument("--itl-ms", type=float, default=1.0)
    parser.add_argument("--max-running", type=int, default=256, help="sequences each engine runs at once")
    args = parser.parse_args(argv)
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="simstack-"))
    predict_dir: Path | None = args.predict_models

    async def deploy_predict_models(state: Any) -> None:  # the router's state (RouterState)
        assert state.control is not None
        for manifest_path in sorted(predict_dir.glob("*/v1/manifest.json")) if predict_dir else []:
            try:
                manifest = PredictManifest.read(manifest_path.parent)
            except ManifestError:
                continue  # an LLM's folder in the same repository
            if await state.control.store.get_model(manifest.name) is None:
                await state.control.register_model(ModelRecord(manifest.name, "simstack", manifest.framework, "sim"))
                await state.control.deploy(manifest.name, manifest.version, 1, "simstack")

    slow_start = ("--slow-start-s", str(args.deploy_slow_start_s)) if args.deploy_slow_start_s else ()

    def deployed(spec: EngineSpec) -> ReplicaProgram:
        return SimEngineProgram(spec.model_name, spec.version, ttft_ms=20, itl_ms=5, extra_args=slow_start)

    engine = SimEngineProgram("demo", "v1", ttft_ms=args.ttft_ms, itl_ms=args.itl_ms,
                              extra_args=("--max-running", str(args.max_running)))
    store: Store = RedisStore(args.redis_url) if args.redis_url else SQLiteStore(data_dir / "llmserve.db")
    server = sim_server(data_dir, [StaticVersion(engine, replicas=args.replicas)],
                        RouterSettings(port=args.port, rollout_lease_s=args.lease_s),
                        EngineSettings(first_port=free_port()), store=store, program=deployed,
                        models_dir=args.models_dir or predict_dir, on_started=deploy_predict_models)
    uvicorn.run(server.app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
