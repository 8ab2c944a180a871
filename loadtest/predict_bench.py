"""Predict benchmark: rows/s and latency of the traditional models, in one run, as ratios.

    python -m loadtest.predict_bench                       # full run (about 3 minutes)
    python -m loadtest.predict_bench --quick               # the tiny configuration CI runs
    python -m loadtest.predict_bench --mlserver http://127.0.0.1:8081   # also a running MLServer
    python -m loadtest.predict_bench --scenarios single --baseline-root ../before --rounds 2

The router runs in its own process (the load generator takes the other core)
with the example fraud classifiers. Scenarios, each a closed loop for
``--duration`` seconds:

0. ``ceiling``: the same single-row load against a server that only answers
   a constant (uvicorn and a bare ASGI app): the load generator's own limit;
1. ``encodings``: 1,000-row requests to XGBoost and ONNX as the design's JSON,
   OIP v2 JSON, an .npy body and v2 binary tensors: rows/s, p50, p99;
2. ``single``: dynamic batching: single-row requests at the same concurrency
   against a router with batching on and one with batching off: requests/s
   and p99; with ``--baseline-root`` (a checkout of the code before a change)
   also against routers started from that checkout, with this one's load
   generator, the two alternating for ``--rounds`` rounds;
3. ``mlserver`` (with ``--mlserver``): the same single-row and 1,000-row v2
   JSON load against MLServer serving the same XGBoost file.

Every router figure carries the router process's CPU per request
(``router_cpu_ms``, from ``/proc``) and, of it, the model's time per request
(``model_ms``, from ``llmserve_predict_compute_seconds``): what is left is the
router's own Python per request (``python_ms``). ``--mlserver-pid`` gives
MLServer's CPU per request the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from loadtest.overhead import free_port
from loadtest.predict_load import Payload, Target, closed_loop
from loadtest.report import emit

MODELS = ("fraud-xgboost", "fraud-onnx")
SCENARIOS = ("ceiling", "encodings", "single", "mlserver")


def payloads(x: np.ndarray, model: str) -> dict[str, Payload]:
    n = len(x)
    design = json.dumps({"inputs": [{"features": r} for r in x.tolist()]}).encode()
    v2 = json.dumps({"inputs": [{"name": "features", "shape": list(x.shape), "datatype": "FP32",
                                 "data": x.reshape(-1).tolist()}]}).encode()
    buffer = io.BytesIO()
    np.save(buffer, x)
    header = json.dumps({"inputs": [{"name": "features", "shape": list(x.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]}).encode()
    json_type = {"content-type": "application/json"}
    return {
        "design_json": Payload(f"/api/v1/models/{model}/predict", design, json_type, n),
        "v2_json": Payload(f"/v2/models/{model}/infer", v2, json_type, n),
        "npy": Payload(f"/api/v1/models/{model}/predict", buffer.getvalue(), {"content-type": "application/x-npy"}, n),
        "v2_binary": Payload(f"/v2/models/{model}/infer", header + x.tobytes(),
                             {"content-type": "application/octet-stream",
                              "inference-header-content-length": str(len(header))}, n),
    }


def mlserver_payload(x: np.ndarray) -> Payload:
    """The same v2 JSON request for MLServer's XGBoost runtime, asking for the probabilities
    (without ``outputs`` it answers only labels; its output is named ``predict_proba``)."""
    body = json.dumps({"inputs": [{"name": "features", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.reshape(-1).tolist()}],
                       "outputs": [{"name": "predict_proba"}]}).encode()
    return Payload("/v2/models/fraud-xgboost/infer", body, {"content-type": "application/json"}, len(x))


# -- the router under test, in its own process ---------------------------------------------


def serve(models_dir: Path, port: int, batching: bool) -> None:
    """Server mode: a router with the example models, no engines."""
    import uvicorn

    from llmserve.server import build
    from llmserve.settings import EngineSettings, PredictSettings, RouterSettings, Settings
    from loadtest.simstack import open_unless_asked
    from router.store import ModelRecord
    from router.store.sqlite import SQLiteStore

    async def register(state: Any) -> None:
        for name in MODELS:
            framework = json.loads((models_dir / name / "v1" / "manifest.json").read_text())["framework"]
            await state.control.register_model(ModelRecord(name, "bench", framework, "bench"))
            await state.control.deploy(name, "v1", 1, "bench")

    router = open_unless_asked(RouterSettings(port=port, predict=PredictSettings(batching=batching)))
    settings = Settings(data_dir=models_dir, router=router, engine=EngineSettings(first_port=free_port()))
    server = build(settings, store=SQLiteStore(models_dir / f"bench-{port}.db"), models_dir=models_dir,
                   on_started=register)
    uvicorn.run(server.app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


_CONSTANT = (b'{"model_name":"fraud-xgboost","version":"v1","id":"0123456789abcdef0123456789abcdef",'
             b'"predictions":[{"probabilities":[0.99,0.01],"label":0,"score":0.01}]}')


async def constant_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The ceiling: an ASGI app that reads the body and answers a single-row prediction's bytes, nothing else."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": _CONSTANT})


@contextlib.contextmanager
def constant_process() -> Iterator[Target]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "loadtest.predict_bench", "--serve-constant", "--port",
                                str(port)])
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.post(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except httpx.HTTPError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the constant server did not start") from None
                time.sleep(0.2)
        yield Target(f"http://127.0.0.1:{port}", process.pid)
    finally:
        process.terminate()
        process.wait(timeout=30)


@contextlib.contextmanager
def router_process(models_dir: Path, batching: bool, root: str | None = None) -> Iterator[Target]:
    """A benchmark router in its own process: this checkout's code, or the checkout at ``root``."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "loadtest.predict_bench", "--serve", str(models_dir),
                                "--port", str(port), *([] if batching else ["--no-batching"])],
                               cwd=root, env={**os.environ, "PYTHONPATH": root} if root else None)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                ready = all(httpx.get(f"{url}/v2/models/{m}/ready", timeout=2).status_code == 200 for m in MODELS)
                if ready:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the benchmark router did not start")
            time.sleep(0.2)
        yield Target(url, process.pid, metrics=True)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


async def encodings(target: Target, batch: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for model in MODELS:
        for name, payload in payloads(batch, model).items():
            await closed_loop(target, payload, 2, 0.5, client=args.client)  # warm-up
            figures[f"{model} {name}"] = await closed_loop(target, payload, args.batched_concurrency, args.duration,
                                                           client=args.client)
            print(f"{model} {name}: {figures[f'{model} {name}']}", file=sys.stderr)
    return figures


async def single_rows(models_dir: Path, single: np.ndarray, args: argparse.Namespace, root: str | None
                      ) -> dict[str, Any]:
    """Single-row design JSON per model, batching on then off (one router each): the ratio of the two."""
    figures: dict[str, dict[str, Any]] = {m: {} for m in MODELS}
    for batching in (True, False):
        with router_process(models_dir, batching, root) as target:
            for model in MODELS:
                payload = payloads(single, model)["design_json"]
                await closed_loop(target, payload, args.single_concurrency, 0.5, client=args.client)  # warm-up
                result = await closed_loop(target, payload, args.single_concurrency, args.duration, client=args.client)
                figures[model]["batching_on" if batching else "batching_off"] = result
                print(f"{root or 'this checkout'} {model} batching={batching}: {result}", file=sys.stderr)
    for figure in figures.values():
        figure["throughput_ratio"] = round(figure["batching_on"]["requests_per_s"]
                                           / max(figure["batching_off"]["requests_per_s"], 1e-9), 2)
    return figures


async def against_mlserver(models_dir: Path, single: np.ndarray, batch: np.ndarray, args: argparse.Namespace
                           ) -> dict[str, Any]:
    """OIP v2 JSON, single rows and 1,000-row requests: the router (batching on), then MLServer."""
    mlserver = Target(args.mlserver, args.mlserver_pid)
    figures: dict[str, Any] = {}
    with router_process(models_dir, batching=True) as target:
        for load, x, concurrency in (("single_row_v2_json", single, args.single_concurrency),
                                     ("batched_v2_json", batch, args.batched_concurrency)):
            ours_payload = payloads(x, "fraud-xgboost")["v2_json"]
            theirs_payload = mlserver_payload(x)
            await closed_loop(target, ours_payload, 2, 0.5, client=args.client)
            await closed_loop(mlserver, theirs_payload, 2, 0.5, client=args.client)
            ours = await closed_loop(target, ours_payload, concurrency, args.duration, client=args.client)
            theirs = await closed_loop(mlserver, theirs_payload, concurrency, args.duration, client=args.client)
            unit = "requests_per_s" if x is single else "rows_per_s"
            figures[load] = {"llmserve": ours, "mlserver": theirs,
                             "throughput_ratio": round(ours[unit] / max(theirs[unit], 1e-9), 2)}
            print(f"{load}: {figures[load]}", file=sys.stderr)
    return figures


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from fallback.tabular import distill_tabular
    from llmserve.models.examples import build_examples, fraud_dataset

    models_dir = Path(args.models_dir or tempfile.mkdtemp(prefix="predict-bench-"))
    build_examples(models_dir, names=MODELS, distill_fallback=distill_tabular)
    x_all = fraud_dataset().x_test
    batch = x_all[: args.batch_rows].astype(np.float32)
    single = x_all[:1].astype(np.float32)
    scenarios = set(args.scenarios.split(","))
    report: dict[str, Any] = {"duration_s": args.duration, "batch_rows": args.batch_rows,
                              "concurrency_batched": args.batched_concurrency,
                              "concurrency_single": args.single_concurrency, "cores": os.cpu_count(),
                              "scenarios": sorted(scenarios)}
    if "ceiling" in scenarios:  # what the load generator reaches against a server that does nothing
        with constant_process() as target:
            payload = payloads(single, "fraud-xgboost")["design_json"]
            await closed_loop(target, payload, args.single_concurrency, 0.5, client=args.client)
            report["client_ceiling"] = await closed_loop(target, payload, args.single_concurrency, args.duration,
                                                         client=args.client)
    if "encodings" in scenarios:
        with router_process(models_dir, batching=True) as target:
            report["batched_1000_rows"] = await encodings(target, batch, args)
    if "single" in scenarios:
        roots: list[str | None] = [None, args.baseline_root] if args.baseline_root else [None]
        rounds: list[dict[str, Any]] = []
        for index in range(args.rounds):  # this checkout and the baseline alternate, first one then the other
            order = roots if index % 2 == 0 else roots[::-1]
            figures = {root: await single_rows(models_dir, single, args, root) for root in order}
            rounds.append({"this": figures[None], **({"baseline": figures[args.baseline_root]}
                                                     if args.baseline_root else {})})
        report["single_row"] = rounds[0]["this"]
        if args.baseline_root:
            report["single_row_baseline"] = {"root": args.baseline_root, **rounds[0]["baseline"]}
        if args.rounds > 1:
            report["single_row_rounds"] = rounds
    if "mlserver" in scenarios and args.mlserver:
        report["mlserver_xgboost"] = await against_mlserver(models_dir, single, batch, args)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.predict_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per scenario")
    parser.add_argument("--batch-rows", type=int, default=1000)
    parser.add_argument("--batched-concurrency", type=int, default=4)
    parser.add_argument("--single-concurrency", type=int, default=64)
    parser.add_argument("--models-dir", help="where the example models are built (default: a temporary folder)")
    parser.add_argument("--mlserver", help="base URL of a running MLServer serving fraud-xgboost")
    parser.add_argument("--mlserver-pid", type=int, help="MLServer's process id, for its CPU per request")
    parser.add_argument("--client", choices=("raw", "aiohttp"), default="raw",
                        help="the load generator's HTTP client (aiohttp: the one the README's older figures used)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, of {SCENARIOS}")
    parser.add_argument("--baseline-root", help="a checkout of the code before a change: single-row figures "
                                                "of its router too, alternating with this checkout's")
    parser.add_argument("--rounds", type=int, default=1, help="single-row rounds (with --baseline-root: each "
                                                              "round runs both, in alternating order)")
    parser.add_argument("--quick", action="store_true", help="tiny configuration (CI)")
    parser.add_argument("--output", help="also write the JSON report here")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--no-batching", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-constant", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set(args.scenarios.split(",")) - set(SCENARIOS)
    if unknown or args.rounds < 1:
        parser.error(f"unknown scenarios {sorted(unknown)}" if unknown else "--rounds must be at least 1")
    if args.serve:
        serve(Path(args.serve), args.port, batching=not args.no_batching)
        return 0
    if args.serve_constant:
        import uvicorn

        uvicorn.run(constant_app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False,
                    lifespan="off")
        return 0
    if args.quick:
        args.duration, args.batch_rows, args.single_concurrency = 0.5, 100, 8
    report = asyncio.run(run(args))
    emit(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
