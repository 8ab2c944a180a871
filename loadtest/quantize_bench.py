"""INT8 ONNX benchmark: fp32 against dynamic and static INT8, interleaved in one run.

    python -m loadtest.quantize_bench                 # about 4 minutes
    python -m loadtest.quantize_bench --quick         # the tiny configuration CI runs
    python -m loadtest.quantize_bench --no-router     # the runtime only

Variants, built from the example fraud models (``llmserve.models.examples``):

- the MLP (``fraud-onnx``): v1 in fp32 and its ``llmserve quantize-onnx`` versions
  ``v1-int8-dynamic`` and ``v1-int8-static`` (calibrated on training rows);
- the tree ensembles: ``fraud-sklearn`` (a random forest as ONNX ``TreeEnsembleClassifier``) and
  ``fraud-xgboost`` converted to ONNX with onnxmltools (when it is installed; the native XGBoost
  runtime is measured beside it), each in fp32 and as whatever onnxruntime's quantizer writes for it
  (``quantize_file`` directly: the command refuses a model with nothing to quantize).

1. the runtime (``router.predict.runtimes``, one thread, as the router runs a version): for
   ``--rounds`` rounds, each variant in turn runs single-row calls then 1,000-row calls for
   ``--slice`` seconds each, so drift in the machine's load falls on every variant alike;
   rows/s, p50 and p99 of the pooled calls, and the ratio to fp32 measured in the same rounds;
2. the router (unless ``--no-router``): the three MLP versions deployed side by side in one
   router process, requests pinned by version (``/v2/models/fraud-onnx/versions/{v}/infer``),
   OIP v2 binary 1,000-row requests (4 concurrent) and JSON single-row requests (8 concurrent),
   interleaved by round the same way;
3. agreement with fp32 on the 5,000 held-out (test) rows: share of identical class predictions,
   max and mean absolute probability difference, and test accuracy and AUC.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from llmserve.models.onnx_quantize import QuantizeConfig, agreement, example_splits, quantize_file, quantize_version
from llmserve.models.predict_manifest import PredictManifest
from llmserve.stats import percentile
from loadtest.report import emit
from router.predict.runtimes import Runtime, load_runtime

BENCH_MODELS = ("fraud-onnx", "fraud-sklearn", "fraud-xgboost")
MLP_VERSIONS = ("v1", "v1-int8-dynamic", "v1-int8-static")


@dataclasses.dataclass
class Variant:
    label: str
    group: str  # which fp32 variant it is compared with
    runtime: Runtime
    baseline: bool = False  # the fp32 variant of its group, which the others are compared with
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)
    single: list[float] = dataclasses.field(default_factory=list)
    batch: list[float] = dataclasses.field(default_factory=list)
    spent: dict[str, float] = dataclasses.field(default_factory=lambda: {"single": 0.0, "batch": 0.0})


def _xgboost_as_onnx(models_dir: Path) -> Path | None:
    """fraud-xgboost converted to ONNX (a TreeEnsembleClassifier), or None when onnxmltools is missing."""
    try:
        from onnxmltools.convert import convert_xgboost
        from onnxmltools.convert.common.data_types import FloatTensorType
    except ImportError:
        return None
    import xgboost as xgb

    booster = xgb.Booster()
    booster.load_model(str(models_dir / "fraud-xgboost" / "v1" / "model.ubj"))
    # opset 15: the highest onnxmltools 1.16's XGBoost converter writes
    model = convert_xgboost(booster, initial_types=[("features", FloatTensorType([None, 30]))], target_opset=15)
    out = models_dir / "fraud-xgboost-onnx" / "v1"
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.onnx").write_bytes(model.SerializeToString())
    manifest = PredictManifest.read(models_dir / "fraud-xgboost" / "v1")
    dataclasses.replace(manifest, name="fraud-xgboost-onnx", framework="onnx", file="model.onnx").write(out)
    return out


def _tree_variants(folder: Path, group: str, calibration: np.ndarray) -> list[Variant]:
    manifest = PredictManifest.read(folder)
    variants = [Variant(f"{group} fp32", group, load_runtime(folder, manifest), baseline=True)]
    for mode in ("dynamic", "static"):
        out = folder.parent / f"quantizer-{mode}" / "model.onnx"
        out.parent.mkdir(parents=True, exist_ok=True)
        report = quantize_file(folder / manifest.file, out, QuantizeConfig(mode=mode), "features",
                               calibration if mode == "static" else None)
        notes = {k: report[k] for k in ("int8_ops", "ops_before", "ops_after", "size_bytes_before",
                                        "size_bytes_after")}
        variants.append(Variant(f"{group} quantizer {mode}", group, load_runtime(out.parent, manifest),
                                notes=notes))
    return variants


@dataclasses.dataclass(frozen=True)
class Rows:
    """The examples' own data (the rows they were built from): training rows calibrate, test rows measure."""

    train: np.ndarray
    test: np.ndarray
    labels: np.ndarray


def example_rows(models_dir: Path) -> Rows:
    from fallback.tabular import distill_tabular
    from llmserve.models.examples import build_examples

    build_examples(models_dir, names=BENCH_MODELS, distill_fallback=distill_tabular)
    splits = example_splits(PredictManifest.read(models_dir / "fraud-onnx" / "v1"))
    assert splits is not None, "the example manifests name their data"
    return Rows(*splits)


def build_variants(models_dir: Path, calibration_rows: int, train: np.ndarray) -> tuple[list[Variant], dict[str, str]]:
    skipped: dict[str, str] = {}
    mlp = models_dir / "fraud-onnx"
    variants = []
    for version in MLP_VERSIONS:
        if version != "v1" and not (mlp / version).exists():
            quantize_version(models_dir, "fraud-onnx", "v1", version,
                             QuantizeConfig(mode=version.rsplit("-", 1)[1], calibration_rows=calibration_rows))
        manifest = PredictManifest.read(mlp / version)
        notes = {k: v for k, v in manifest.extra.get("quantization", {}).items()
                 if k in ("int8_ops", "size_bytes_before", "size_bytes_after", "reduce_range", "calibration")}
        label = "MLP fp32" if version == "v1" else f"MLP {version.rsplit('-', 1)[1]} INT8"
        variants.append(Variant(label, "MLP", load_runtime(mlp / version, manifest), version == "v1", notes))
    sample = train[np.random.default_rng(0).permutation(len(train))[:calibration_rows]]
    variants += _tree_variants(models_dir / "fraud-sklearn" / "v1", "random forest (ONNX)", sample)
    xgb_native = models_dir / "fraud-xgboost" / "v1"
    variants.append(Variant("XGBoost native fp32 (as served)", "XGBoost native",
                            load_runtime(xgb_native, PredictManifest.read(xgb_native)), baseline=True))
    converted = _xgboost_as_onnx(models_dir)
    if converted is None:
        skipped["XGBoost as ONNX"] = "onnxmltools is not installed (pip install onnxmltools)"
    else:
        variants += _tree_variants(converted, "XGBoost (ONNX)", sample)
    return variants, skipped


def _loop(call: Callable[[], Any], seconds: float, latencies: list[float]) -> float:
    began = time.perf_counter()
    while True:
        started = time.perf_counter()
        call()
        done = time.perf_counter()
        latencies.append(done - started)
        if done - began >= seconds:
            return done - began


def measure_runtimes(variants: list[Variant], x: np.ndarray, rounds: int, slice_s: float, batch_rows: int) -> None:
    single, batch = {"features": x[:1]}, {"features": x[:batch_rows]}
    for v in variants:  # warm-up: first calls allocate
        _loop(functools.partial(v.runtime.predict, batch), 0.2, [])
    for _ in range(rounds):
        for v in variants:
            v.spent["single"] += _loop(functools.partial(v.runtime.predict, single), slice_s, v.single)
            v.spent["batch"] += _loop(functools.partial(v.runtime.predict, batch), slice_s, v.batch)


def _figures(latencies: list[float], spent: float, rows: int) -> dict[str, Any]:
    ms = [t * 1000 for t in latencies]
    return {"rows_per_s": round(len(latencies) * rows / spent), "p50_ms": round(percentile(ms, 50), 4),
            "p99_ms": round(percentile(ms, 99), 4), "calls": len(latencies)}


def runtime_table(variants: list[Variant], batch_rows: int) -> dict[str, Any]:
    fp32 = {v.group: v for v in variants if v.baseline}
    table: dict[str, Any] = {}
    for v in variants:
        base = fp32[v.group]
        row: dict[str, Any] = {"single_row": _figures(v.single, v.spent["single"], 1),
                               f"batch_{batch_rows}": _figures(v.batch, v.spent["batch"], batch_rows)}
        for key in ("single_row", f"batch_{batch_rows}"):
            theirs = _figures(base.single if key == "single_row" else base.batch, base.spent[
                "single" if key == "single_row" else "batch"], 1 if key == "single_row" else batch_rows)
            row[key]["rows_per_s_vs_fp32"] = round(row[key]["rows_per_s"] / max(theirs["rows_per_s"], 1), 3)
            row[key]["p99_vs_fp32"] = round(row[key]["p99_ms"] / max(theirs["p99_ms"], 1e-9), 3)
        table[v.label] = {**row, **v.notes}
    return table


def agreement_table(variants: list[Variant], data: Rows) -> dict[str, Any]:
    from sklearn.metrics import accuracy_score, roc_auc_score

    outputs = {v.label: v.runtime.predict({"features": data.test})["probabilities"] for v in variants}
    fp32 = {v.group: outputs[v.label] for v in variants if v.baseline}
    return {v.label: {**agreement(fp32[v.group], outputs[v.label]),
                      "test_accuracy": round(float(accuracy_score(data.labels, outputs[v.label].argmax(1))), 4),
                      "test_auc": round(float(roc_auc_score(data.labels, outputs[v.label][:, 1])), 4)}
            for v in variants}


async def measure_router(models_dir: Path, x: np.ndarray, rounds: int, slice_s: float, batch_rows: int
                         ) -> dict[str, Any]:
    import httpx

    from loadtest.predict_bench import Payload, closed_loop, payloads, router_process

    loads = {"single_row_v2_json": (payloads(x[:1], "fraud-onnx")["v2_json"], 8),
             f"batch_{batch_rows}_v2_binary": (payloads(x[:batch_rows], "fraud-onnx")["v2_binary"], 4)}
    results: dict[str, dict[str, list[dict[str, Any]]]] = {v: {k: [] for k in loads} for v in MLP_VERSIONS}
    with router_process(models_dir, batching=True) as url:  # a predict_load.Target (its URL, its pid)
        async with httpx.AsyncClient(base_url=url.url, timeout=60) as client:
            for version in MLP_VERSIONS[1:]:
                created = await client.post("/api/v1/deployments", json={
                    "model_name": "fraud-onnx", "version": version, "traffic_percent": 0})
                created.raise_for_status()
            deadline = time.monotonic() + 120
            while not all([(await client.get(f"/v2/models/fraud-onnx/versions/{v}/ready")).status_code == 200
                           for v in MLP_VERSIONS]):
                if time.monotonic() > deadline:
                    raise RuntimeError("the INT8 versions did not become ready in the benchmark router")
                await asyncio.sleep(0.2)

        def pinned(payload: Payload, version: str) -> Payload:
            return dataclasses.replace(payload, path=payload.path.replace("/infer", f"/versions/{version}/infer"))

        for version in MLP_VERSIONS:  # warm-up
            for payload, _ in loads.values():
                await closed_loop(url, pinned(payload, version), 2, 0.3)
        for _ in range(rounds):
            for version in MLP_VERSIONS:
                for name, (payload, concurrency) in loads.items():
                    results[version][name].append(await closed_loop(url, pinned(payload, version), concurrency,
                                                                    slice_s))
    return {v: {name: _pool(runs) for name, runs in by_load.items()} for v, by_load in results.items()}


def _pool(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Rounds of one load (equal lengths): the mean of their rows/s, the median of their p50 and p99."""
    return {"rows_per_s": round(sum(r["rows_per_s"] for r in runs) / len(runs)),
            "p50_ms_median_of_rounds": round(float(np.median([r["p50_ms"] for r in runs])), 2),
            "p99_ms_median_of_rounds": round(float(np.median([r["p99_ms"] for r in runs])), 2),
            "errors": sum(r["errors"] for r in runs)}


def print_tables(report: dict[str, Any], batch_rows: int) -> None:
    out = sys.stderr
    print(f"\nruntime, one thread ({report['cpu']}):", file=out)
    print(f"| variant | 1-row calls/s | 1-row p99 | {batch_rows}-row rows/s | {batch_rows}-row p99 | "
          "vs fp32 (1 row, batch) | INT8 ops | label agreement | max abs diff |", file=out)
    print("|---|---|---|---|---|---|---|---|---|", file=out)
    for label, row in report["runtime"].items():
        s, b, a = row["single_row"], row[f"batch_{batch_rows}"], report["agreement"][label]
        print(f"| {label} | {s['rows_per_s']:,} | {s['p99_ms'] * 1000:.0f} us | {b['rows_per_s']:,} | "
              f"{b['p99_ms']:.3f} ms | {s['rows_per_s_vs_fp32']:.2f}x, {b['rows_per_s_vs_fp32']:.2f}x | "
              f"{row.get('int8_ops', '-')} | {a['label_agreement']:.4f} | {a['max_abs_probability_diff']:.4f} |",
              file=out)
    for version, loads in report.get("router", {}).items():
        print(f"router {version}: {loads}", file=out)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    models_dir = Path(args.models_dir or tempfile.mkdtemp(prefix="quantize-bench-"))
    data = example_rows(models_dir)
    variants, skipped = build_variants(models_dir, args.calibration_rows, data.train)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    report: dict[str, Any] = {"cpu": f"{cpu}, {os.cpu_count()} cores", "rounds": args.rounds, "slice_s": args.slice,
                              "batch_rows": args.batch_rows, "held_out_rows": len(data.test),
                              "skipped": skipped}
    measure_runtimes(variants, data.test, args.rounds, args.slice, args.batch_rows)
    report["runtime"] = runtime_table(variants, args.batch_rows)
    report["agreement"] = agreement_table(variants, data)
    if args.router:
        report["router"] = await measure_router(models_dir, data.test, args.router_rounds, args.router_slice,
                                                args.batch_rows)
        base = report["router"]["v1"]
        for loads in report["router"].values():
            for name, figures in loads.items():
                figures["rows_per_s_vs_fp32"] = round(figures["rows_per_s"] / max(base[name]["rows_per_s"], 1), 3)
    print_tables(report, args.batch_rows)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.quantize_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds through the runtime")
    parser.add_argument("--slice", type=float, default=1.0, help="seconds per variant and batch size a round")
    parser.add_argument("--batch-rows", type=int, default=1000)
    parser.add_argument("--calibration-rows", type=int, default=2000, help="training rows for static calibration")
    parser.add_argument("--router", action=argparse.BooleanOptionalAction, default=True,
                        help="also through the router (default on)")
    parser.add_argument("--router-rounds", type=int, default=3)
    parser.add_argument("--router-slice", type=float, default=3.0, help="seconds per version and load a round")
    parser.add_argument("--models-dir", help="where the example models are built (default: a temporary folder)")
    parser.add_argument("--quick", action="store_true", help="tiny configuration (CI)")
    parser.add_argument("--output", help="also write the JSON report here")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.slice, args.router_rounds, args.router_slice = 1, 0.1, 1, 0.3
        args.batch_rows, args.calibration_rows = 100, 200
    emit(asyncio.run(run(args)), args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
