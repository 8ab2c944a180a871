"""Predict benchmark: rows/s and latency of the traditional models, in one run, as ratios.

    python -m loadtest.predict_bench                       # full run (about 3 minutes)
    python -m loadtest.predict_bench --quick               # the tiny configuration CI runs
    python -m loadtest.predict_bench --mlserver http://127.0.0.1:8081   # also a running MLServer

The router runs in its own process (the load generator takes the other core)
with the example fraud classifiers. Scenarios, each a closed loop for
``--duration`` seconds:

1. encodings: 1,000-row requests to XGBoost and ONNX as the design's JSON,
   OIP v2 JSON, an .npy body and v2 binary tensors: rows/s, p50, p99;
2. dynamic batching: single-row requests at the same concurrency against a
   router with batching on and one with batching off: requests/s and p99;
3. (``--mlserver``) the same single-row and 1,000-row v2 JSON load against
   MLServer serving the same XGBoost file.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from llmserve.stats import percentile
from loadtest.overhead import free_port
from loadtest.report import emit

MODELS = ("fraud-xgboost", "fraud-onnx")


@dataclass(frozen=True)
class Payload:
    path: str
    body: bytes
    headers: dict[str, str]
    rows: int


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


async def closed_loop(base_url: str, payload: Payload, concurrency: int, duration_s: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + duration_s
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(base_url, connector=connector) as session:
        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                async with session.post(payload.path, data=payload.body, headers=payload.headers) as response:
                    await response.read()
                    if response.status != 200:
                        errors += 1
                        continue
                latencies.append(time.perf_counter() - started)

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    ms = [v * 1000 for v in latencies]
    return {"requests_per_s": round(len(latencies) / elapsed, 1),
            "rows_per_s": round(len(latencies) * payload.rows / elapsed),
            "p50_ms": round(percentile(ms, 50), 2) if ms else None,
            "p99_ms": round(percentile(ms, 99), 2) if ms else None,
            "requests": len(latencies), "errors": errors}


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


@contextlib.contextmanager
def router_process(models_dir: Path, batching: bool) -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "loadtest.predict_bench", "--serve", str(models_dir),
                                "--port", str(port), *([] if batching else ["--no-batching"])])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        import httpx

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
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from fallback.tabular import distill_tabular
    from llmserve.models.examples import build_examples, fraud_dataset

    models_dir = Path(args.models_dir or tempfile.mkdtemp(prefix="predict-bench-"))
    build_examples(models_dir, names=MODELS, distill_fallback=distill_tabular)
    x_all = fraud_dataset().x_test
    batch = x_all[: args.batch_rows].astype(np.float32)
    single = x_all[:1].astype(np.float32)
    report: dict[str, Any] = {"duration_s": args.duration, "batch_rows": args.batch_rows,
                              "concurrency_batched": args.batched_concurrency,
                              "concurrency_single": args.single_concurrency, "cores": os.cpu_count()}
    with router_process(models_dir, batching=True) as url:
        encodings: dict[str, Any] = {}
        for model in MODELS:
            for name, payload in payloads(batch, model).items():
                await closed_loop(url, payload, 2, 0.5)  # warm-up
                encodings[f"{model} {name}"] = await closed_loop(url, payload, args.batched_concurrency,
                                                                 args.duration)
                print(f"{model} {name}: {encodings[f'{model} {name}']}", file=sys.stderr)
        report["batched_1000_rows"] = encodings
        single_on = {m: await closed_loop(url, payloads(single, m)["design_json"], args.single_concurrency,
                                          args.duration) for m in MODELS}
        single_v2_on = await closed_loop(url, payloads(single, "fraud-xgboost")["v2_json"],
                                         args.single_concurrency, args.duration)
    with router_process(models_dir, batching=False) as url:
        single_off = {m: await closed_loop(url, payloads(single, m)["design_json"], args.single_concurrency,
                                           args.duration) for m in MODELS}
    report["single_row"] = {
        m: {"batching_on": single_on[m], "batching_off": single_off[m],
            "throughput_ratio": round(single_on[m]["requests_per_s"] / max(single_off[m]["requests_per_s"], 1e-9),
                                      2)}
        for m in MODELS}
    if args.mlserver:
        ml_single = await closed_loop(args.mlserver, mlserver_payload(single), args.single_concurrency,
                                      args.duration)
        ml_batch = await closed_loop(args.mlserver, mlserver_payload(batch), args.batched_concurrency,
                                     args.duration)
        ours_batch = report["batched_1000_rows"]["fraud-xgboost v2_json"]
        report["mlserver_xgboost"] = {
            "single_row_v2_json": {"llmserve": single_v2_on, "mlserver": ml_single,
                                   "throughput_ratio": round(single_v2_on["requests_per_s"]
                                                             / max(ml_single["requests_per_s"], 1e-9), 2)},
            "batched_v2_json": {"llmserve": ours_batch, "mlserver": ml_batch,
                                "throughput_ratio": round(ours_batch["rows_per_s"]
                                                          / max(ml_batch["rows_per_s"], 1e-9), 2)},
        }
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.predict_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per scenario")
    parser.add_argument("--batch-rows", type=int, default=1000)
    parser.add_argument("--batched-concurrency", type=int, default=4)
    parser.add_argument("--single-concurrency", type=int, default=64)
    parser.add_argument("--models-dir", help="where the example models are built (default: a temporary folder)")
    parser.add_argument("--mlserver", help="base URL of a running MLServer serving fraud-xgboost")
    parser.add_argument("--quick", action="store_true", help="tiny configuration (CI)")
    parser.add_argument("--output", help="also write the JSON report here")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--no-batching", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(Path(args.serve), args.port, batching=not args.no_batching)
        return 0
    if args.quick:
        args.duration, args.batch_rows, args.single_concurrency = 0.5, 100, 8
    report = asyncio.run(run(args))
    emit(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
