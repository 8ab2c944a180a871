"""The ``llmserve`` command: prepare models, bring the stack up, run load tests and benchmarks."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmserve.errors import PrepareError
from llmserve.logs import configure as configure_logging
from llmserve.settings import Settings

if TYPE_CHECKING:
    from router.state import RouterState


def _prepare(settings: Settings, source: str | None, force: bool = False) -> Path:
    from llmserve.models.repository import ModelRepository

    repo = ModelRepository(settings.model_repository)
    model = settings.model
    result = repo.prepare(
        model.name,
        model.version,
        source=Path(source) if source else (Path(model.source) if model.source else None),
        dtype=model.dtype,
        force=force,
    )
    verb = "prepared" if result.created else "verified (unchanged)"
    m = result.manifest
    print(
        f"{m.name}/{m.version} {verb}: {result.folder} "
        f"({m.parameter_count / 1e6:.1f} M parameters, {m.dtype}, source sha256 {m.source_sha256[:12]})",
        flush=True,
    )
    return result.folder


def cmd_prepare(args: argparse.Namespace, settings: Settings) -> int:
    folder = _prepare(settings, args.source, force=args.force)
    if args.warm:
        _warm(settings, folder)
    return 0


def _warm(settings: Settings, folder: Path) -> None:
    """Start the version's engine once as the router will, so its compile cache is warm for `llmserve up`."""
    from llmserve.replicas.spec import EngineSpec
    from llmserve.replicas.warmup import warm_sync

    model = settings.model
    spec = EngineSpec.from_settings(folder, model.name, model.version, settings.engine)
    if spec.enforce_eager:
        return
    print(f"compiling the engine for this machine ({spec.dtype}; once: vLLM caches it in ~/.cache/vllm) ...",
          flush=True)
    done = warm_sync(spec, settings.engine, settings.logs_dir / "warmup")
    print(f"engine compiled and started in {done.start_s:.0f} s; `llmserve up` reuses the cache", flush=True)


def cmd_tune(args: argparse.Namespace, settings: Settings) -> int:
    """Measure the candidate engine settings here and record the winner in the version's manifest."""
    from llmserve.models.repository import ModelRepository
    from llmserve.replicas.hardware import Hardware
    from llmserve.replicas.tuning import TUNING_KEY
    from loadtest import engine_bench

    repo = ModelRepository(settings.model_repository)
    name, version = settings.model.name, settings.model.version
    folder = repo.version_dir(name, version)
    repo.get(name, version)  # a PrepareError (exit 1) names a version that is not prepared
    hardware = Hardware.detect()
    levels = engine_bench.TINY if args.tiny else engine_bench.FULL
    result = asyncio.run(engine_bench.run(folder, engine_bench.candidates_for(hardware, args.tiny), levels,
                                          args.out / "logs", hardware))
    engine_bench.write_report(result, args.out)
    print(engine_bench.table(result))
    winner = next((r for r in result["candidates"] if r["candidate"] == result["winner"]), None)
    if winner is None:
        print("llmserve tune: every candidate failed a request; nothing recorded", file=sys.stderr)
        return 1
    figures = winner["levels"][result["deciding_level"]]
    repo.record_extra(name, version, TUNING_KEY, {
        "fingerprint": hardware.fingerprint(), "measured_at": result["measured_at"],
        "settings": {"dtype": winner["settings"]["dtype"], "enforce_eager": winner["settings"]["enforce_eager"]},
        "summary": f"{winner['candidate']}: {figures['output_tokens_per_s']:.1f} output tokens/s at "
                   f"{result['deciding_level']}, {figures['vs_baseline']}x the baseline",
        "report": str(args.out / "result.json"),
    })
    print(f"recorded in {folder / 'manifest.json'}: {winner['candidate']}", flush=True)
    return 0


def cmd_quantize(args: argparse.Namespace, settings: Settings) -> int:
    from llmserve.models.quantize import quantize_version
    from llmserve.models.repository import ModelRepository

    result = quantize_version(ModelRepository(settings.model_repository), settings.model.name, args.source_version,
                              args.target_version, args.scheme, force=args.force)
    q = result.manifest.extra["quantization"]
    assert isinstance(q, dict)
    print(f"{result.manifest.name}/{result.manifest.version} quantized ({q['scheme']}) from {args.source_version}: "
          f"{result.folder} ({q['quantized_tensors']} tensors int8)", flush=True)
    return 0


def _banner(host: str, port: int, model: str, auth: str | None) -> str:
    """What ``llmserve up`` prints once it serves. ``auth``: how the examples get their API key (a new key
    itself, said once, or the file that holds it); None with authentication off."""
    url = f"http://{host}:{port}"
    key_line = "" if auth is None else f"\n  {auth}\n"
    header = "" if auth is None else " -H \"Authorization: Bearer $LLMSERVE_API_KEY\""
    api_key = "os.environ['LLMSERVE_API_KEY']" if auth is not None else "'unused'"
    return f"""
llmserve is ready: {url}  (OpenAI-compatible API at {url}/v1, docs at {url}/docs)
{key_line}
  curl -N {url}/v1/chat/completions -H 'Content-Type: application/json'{header} \\
    -d '{{"model": "{model}", "stream": true,
         "messages": [{{"role": "user", "content": "What is the capital of France?"}}]}}'

  python -c "import os; from openai import OpenAI
c = OpenAI(base_url='{url}/v1', api_key={api_key})
for chunk in c.chat.completions.create(model='{model}', stream=True,
        messages=[{{'role': 'user', 'content': 'What is the capital of France?'}}]):
    print(chunk.choices[0].delta.content or '' if chunk.choices else '', end='', flush=True)"

Press Ctrl-C to stop.
"""


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from llmserve.replicas.spec import EngineSpec
    from llmserve.server import build, uvicorn_config

    _prepare(settings, args.source)
    examples = _build_examples(settings) if settings.examples else []
    model = settings.model

    def engine_program(name: str, version: str, model_dir: Path, overrides: dict[str, Any]) -> EngineSpec:
        engine = settings.engine.with_overrides(overrides) if overrides else settings.engine
        return EngineSpec.from_settings(model_dir, name, version, engine,
                                        speculation=speculation_for(name, engine.speculation, settings))

    print(f"control plane: {'Redis' if settings.redis_url else settings.sqlite_path}; "
          f"engine logs in {settings.logs_dir / 'replicas'}", flush=True)
    router_settings = settings.router

    async def bootstrap(state: RouterState) -> None:
        """First start: register the bundled model and deploy it; later starts: the store has it all."""
        from llmserve.models.predict_manifest import PredictManifest
        from router.store import ModelRecord
        from router.store.base import LIVE_STATUSES

        assert state.control is not None
        control = state.control
        if await control.store.get_model(model.name) is None:
            await control.register_model(ModelRecord(model.name, "SmolLM2-135M-Instruct", "vllm", "llmserve"))
        deployments = await control.store.list_deployments(model.name)
        if not any(d.status in LIVE_STATUSES for d in deployments):
            await control.deploy(model.name, model.version, model.replicas, "llmserve up")
        student = f"{model.name}-student"
        if settings.serve_student and (settings.model_repository / student / "v1" / "manifest.json").exists():
            if await control.store.get_model(student) is None:
                await control.register_model(ModelRecord(student, f"distilled from {model.name}", "vllm",
                                                         "llmserve distill"))
            if not any(d.status in LIVE_STATUSES for d in await control.store.list_deployments(student)):
                await control.deploy(student, "v1", 1, "llmserve up")
        for folder in examples:  # the traditional example models, served in the router
            manifest = PredictManifest.read(folder)
            if await control.store.get_model(manifest.name) is None:
                await control.register_model(ModelRecord(manifest.name, "example fraud classifier",
                                                         manifest.framework, "llmserve"))
            if not any(d.status in LIVE_STATUSES for d in await control.store.list_deployments(manifest.name)):
                await control.deploy(manifest.name, manifest.version, 1, "llmserve up")
        auth = None
        if router_settings.auth.enabled:
            from router.access.bootstrap import ADMIN_KEY_FILE, first_admin_key

            key_file = settings.data_dir / ADMIN_KEY_FILE
            created = None if router_settings.auth.admin_key else await first_admin_key(control.store,
                                                                                        settings.data_dir)
            if created is not None:  # shown this once; the file keeps it for the examples
                auth = (f"A new admin API key (shown once; also in {key_file}, readable only by you):\n"
                        f"    {created}\n  export LLMSERVE_API_KEY=$(cat {key_file})")
            elif router_settings.auth.admin_key:
                auth = "export LLMSERVE_API_KEY=<your LLMSERVE_ADMIN_KEY, or a key from `llmserve keys create`>"
            else:
                auth = f"export LLMSERVE_API_KEY=$(cat {key_file})   # the admin key made on first start"
        control.spawn(_announce_when_ready(state, router_settings.host, router_settings.port, model.name, auth),
                      name="announce ready")

    server = build(settings, specs=engine_program, on_started=bootstrap)
    config = uvicorn_config(server.app, router_settings, timeout_graceful_shutdown=int(settings.engine.drain_timeout_s))
    uvicorn.Server(config).run()
    return 0


def _build_examples(settings: Settings) -> list[Path]:
    from fallback.tabular import distill_tabular
    from llmserve.models.examples import build_examples

    folders = build_examples(settings.model_repository, distill_fallback=distill_tabular)
    print(f"example predict models: {', '.join(f.parent.name for f in folders)}", flush=True)
    return folders


def cmd_examples(args: argparse.Namespace, settings: Settings) -> int:
    for folder in _build_examples(settings):
        print(folder)
    return 0


def cmd_distill(args: argparse.Namespace, settings: Settings) -> int:
    from fallback.distill import DistillConfig, DistillError, run

    repository = settings.model_repository
    teacher = Path(args.teacher) if args.teacher else repository / settings.model.name / args.teacher_version
    name = args.student_name or f"{settings.model.name}-student"
    config = DistillConfig(
        teacher_dir=teacher, output_dir=repository / name / args.student_version,
        work_dir=settings.data_dir / "distill" / f"{name}-{args.student_version}", name=name,
        version=args.student_version, layers=args.layers, layer_choice=args.layer_choice, steps=args.steps,
        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, prompts=args.prompts,
        learning_rate=args.learning_rate, samples_per_prompt=args.samples_per_prompt,
    )
    if args.tiny:
        config = DistillConfig(**{**config.__dict__, "steps": 3, "batch_size": 2, "max_new_tokens": 12,
                                  "prompts": 10, "checkpoint_every": 2})
    try:
        report = run(config)
    except DistillError as exc:
        print(f"llmserve distill: {exc}", file=sys.stderr)
        return 2
    held = report["held_out"]
    print(json.dumps({"student": report["student"], "layers_kept": report["layers_kept"], "held_out": held,
                      "seconds": report["seconds"]}, indent=2))
    print(f"written to {config.output_dir} (report: distillation.json there)")
    return 0


def speculation_for(model_name: str, kind: str, settings: Settings) -> Any:
    """The speculative decoding a version runs with; a draft needs the model's student to exist."""
    from llmserve.replicas.spec import DraftModelSpeculation, NgramSpeculation

    if kind == "ngram":
        return NgramSpeculation()
    student = settings.model_repository / f"{model_name}-student" / "v1"
    if kind == "draft" and (student / "config.json").exists():
        return DraftModelSpeculation(student)
    return None


async def _announce_when_ready(state: RouterState, host: str, port: int, model_name: str, auth: str | None
                               ) -> None:
    while True:
        model = state.catalog.find(model_name)
        if model is not None and any(v.ready_replicas for v in model.versions.values()):
            print(_banner(host, port, model_name, auth), flush=True)
            return
        await asyncio.sleep(0.2)


def cmd_loadtest(args: argparse.Namespace, settings: Settings) -> int:
    from loadtest.cli import main as loadtest_main

    return loadtest_main(args.loadtest_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmserve", description=__doc__)
    parser.add_argument("--data-dir", help="store, logs and models (default ~/.local/share/llmserve)")
    parser.add_argument("--models-dir", help="model repository (default <data-dir>/models)")
    sub = parser.add_subparsers(dest="command", required=True)

    prepare = sub.add_parser("prepare", help="turn a GGUF file or HF folder into a served model version")
    prepare.add_argument("--source", help="GGUF file or Hugging Face folder (default: the bundled SmolLM2)")
    prepare.add_argument("--name", help="model name (default smollm2-135m-instruct)")
    prepare.add_argument("--version", dest="model_version", help="version label (default v1)")
    prepare.add_argument("--dtype", choices=["bfloat16", "float32"], help="dtype of the saved weights")
    prepare.add_argument("--force", action="store_true", help="rebuild even if the version exists")
    prepare.add_argument("--no-warm", dest="warm", action="store_false",
                         help="skip starting the engine once to warm its compile cache")
    prepare.set_defaults(func=cmd_prepare)

    tune = sub.add_parser("tune", help="measure engine settings on this machine; record the best in the manifest")
    tune.add_argument("--name", help="model name (default smollm2-135m-instruct)")
    tune.add_argument("--version", dest="model_version", help="version label (default v1)")
    tune.add_argument("--tiny", action="store_true", help="two eager candidates and a few tokens (CI)")
    tune.add_argument("--out", type=Path, default=Path("loadtest-results/tune"), help="report folder")
    tune.set_defaults(func=cmd_tune)

    quantize = sub.add_parser("quantize", help="an INT8 (W8A8) version of a prepared version, served by vLLM")
    quantize.add_argument("--version", dest="target_version", required=True, help="label of the new version")
    quantize.add_argument("--from", dest="source_version", default="v1", help="the version to quantize (v1)")
    quantize.add_argument("--name", help="model name (default smollm2-135m-instruct)")
    quantize.add_argument("--scheme", default="w8a8", choices=["w8a8"], help="int8 weights and activations")
    quantize.add_argument("--force", action="store_true", help="replace the version if it exists")
    quantize.set_defaults(func=cmd_quantize)

    up = sub.add_parser("up", help="prepare the model if needed, start engines and the router, serve")
    up.add_argument("--source", help="model source, as for prepare")
    up.add_argument("--name", help="model name")
    up.add_argument("--version", dest="model_version", help="version label")
    up.add_argument("--host", help="router interface (default 127.0.0.1)")
    up.add_argument("--port", type=int, help="router port (default 8000)")
    up.add_argument("--replicas", type=int, help="engine replicas (default 1)")
    up.set_defaults(func=cmd_up)

    from fallback.distill import DistillConfig  # light: torch is imported only when a run starts

    distill = sub.add_parser("distill", help="distil a smaller student of the served model (the fallback)")
    distill.add_argument("--teacher", help="teacher folder (default: <models>/<model name>/<teacher version>)")
    distill.add_argument("--teacher-version", default="v1")
    distill.add_argument("--name", dest="student_name", help="student model name (default <model>-student)")
    distill.add_argument("--student-version", default="v1")
    distill.add_argument("--layers", type=int, default=DistillConfig.layers, help="teacher layers kept")
    distill.add_argument("--layer-choice", choices=["ends", "even"], default=DistillConfig.layer_choice,
                         help="ends: the first and last layers (default); even: evenly spaced")
    distill.add_argument("--steps", type=int, default=DistillConfig.steps)
    distill.add_argument("--batch-size", type=int, default=DistillConfig.batch_size)
    distill.add_argument("--learning-rate", type=float, default=DistillConfig.learning_rate)
    distill.add_argument("--samples-per-prompt", type=int, default=DistillConfig.samples_per_prompt,
                         help="sampled teacher answers per training prompt besides the greedy one")
    distill.add_argument("--max-new-tokens", type=int, default=64, help="length of the teacher's answers")
    distill.add_argument("--prompts", type=int, default=0, help="use only this many prompts (0: all)")
    distill.add_argument("--tiny", action="store_true", help="a few steps on a few prompts (CI)")
    distill.set_defaults(func=cmd_distill)

    examples = sub.add_parser("examples", help="build the example traditional models (fraud classifiers)")
    examples.set_defaults(func=cmd_examples)
    from llmserve.models import onnx_quantize

    onnx_quantize.add_parser(sub)

    from llmserve import batch_cli, keys_cli

    keys_cli.add_parser(sub)
    batch_cli.add_parser(sub)

    from llmserve.k8s import cli as k8s_cli

    k8s_cli.add_parser(sub)
    from llmserve.planner import cli as planner_cli

    planner_cli.add_parser(sub)

    loadtest = sub.add_parser("loadtest", help="load tests: run, sweep, bench (same as python -m loadtest)")
    loadtest.add_argument("loadtest_args", nargs=argparse.REMAINDER)
    loadtest.set_defaults(func=cmd_loadtest)
    return parser


def _settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from the environment, with command-line flags on top; validated once."""
    data = Settings().model_dump()
    if args.data_dir:
        data["data_dir"] = args.data_dir
    if args.models_dir:
        data["models_dir"] = args.models_dir
    flags = {
        ("model", "name"): getattr(args, "name", None),
        ("model", "version"): getattr(args, "model_version", None),
        ("model", "dtype"): getattr(args, "dtype", None),
        ("model", "replicas"): getattr(args, "replicas", None),
        ("router", "host"): getattr(args, "host", None),
        ("router", "port"): getattr(args, "port", None),
    }
    for (group, field), value in flags.items():
        if value is not None:
            data[group][field] = value
    return Settings.model_validate(data)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = _settings_from_args(args)
    except ValueError as exc:
        print(f"llmserve: invalid setting: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    try:
        return int(args.func(args, settings) or 0)
    except PrepareError as exc:
        print(f"llmserve: cannot prepare model: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
