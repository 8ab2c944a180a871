"""INT8 versions of ONNX predict models: onnxruntime's dynamic and static quantization.

    llmserve quantize-onnx --model fraud-onnx --from v1 --version v1-int8 --mode dynamic|static

The result is a normal predict version (``<models>/<model>/<version>/`` with ``model.onnx`` and a
``manifest.json`` copied from the source version), deployed, split, canaried and rolled back like
any other. The settings follow onnxruntime's guidance for CPUs:

- ``dynamic``: weights stored as INT8; each batch's activations are quantized on the fly
  (``DynamicQuantizeLinear`` + ``MatMulInteger``). Needs no data.
- ``static``: QDQ format, unsigned 8-bit activations with ranges fixed by calibration (MinMax over
  ``calibration_rows`` rows), signed 8-bit weights. An example model calibrates on rows drawn from its
  own training split (never the test rows, which measure agreement); another model takes a ``.npy`` file.

``reduce_range`` (7-bit weights) defaults to on for a CPU without VNNI, where the U8S8 kernels can
saturate 16-bit intermediate sums; the manifest records the choice, since the file may be served elsewhere.

Only operators onnxruntime has INT8 kernels for change (MatMul, Gemm, Conv, ...). A tree ensemble
(``TreeEnsembleClassifier``: the scikit-learn and converted XGBoost models) has none, so quantizing it
would write the same fp32 model under a new name: that is refused, with what the model consists of.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from llmserve.errors import LLMServeError
from llmserve.models.predict_manifest import ManifestError, PredictManifest

MODES = ("dynamic", "static")
ONNX_FRAMEWORKS = ("onnx", "sklearn", "tensorflow")  # the frameworks served from a .onnx file
# Operators that exist only in a quantized graph: their count says whether anything was quantized.
INT8_OPS = frozenset({"DynamicQuantizeLinear", "QuantizeLinear", "MatMulInteger", "ConvInteger", "QGemm",
                      "QLinearMatMul", "QLinearConv", "DynamicQuantizeMatMul", "QAttention"})
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # the router's version label (router.api.control)


class QuantizeError(LLMServeError):
    """A quantization request that cannot be carried out: ``field`` names the flag, ``fix`` what to do."""

    def __init__(self, field: str, problem: str, fix: str) -> None:
        self.field = field
        self.problem = problem
        self.fix = fix
        super().__init__(f"{field}: {problem}; {fix}")


@dataclass(frozen=True)
class QuantizeConfig:
    mode: str
    calibration_rows: int = 2000
    reduce_range: bool | None = None  # None: on unless this CPU has VNNI
    per_channel: bool = False  # onnxruntime: per-tensor is the faster CPU choice
    seed: int = 0


@dataclass(frozen=True)
class QuantizeResult:
    folder: Path
    manifest: PredictManifest
    report: dict[str, Any]


def cpu_has_vnni(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def source_version(models_dir: Path, model: str, version: str) -> tuple[Path, PredictManifest]:
    """The folder and manifest of an ONNX predict version; QuantizeError naming the fix otherwise."""
    root = Path(models_dir) / model
    if not root.is_dir():
        known = sorted({p.parent.parent.name for p in Path(models_dir).glob("*/*/manifest.json")})
        raise QuantizeError("--model", f"no model {model!r} in {models_dir}",
                            f"pick one of {', '.join(known)}" if known else
                            "build the examples with `llmserve examples` or pass --models-dir")
    folder = root / version
    if not (folder / "manifest.json").is_file():
        versions = sorted(p.parent.name for p in root.glob("*/manifest.json"))
        raise QuantizeError("--from", f"{model} has no version {version!r}",
                            f"pick one of {', '.join(versions)}" if versions else "prepare a version first")
    try:
        manifest = PredictManifest.read(folder)
    except ManifestError as exc:
        raise QuantizeError("--from", str(exc), "only predict versions can be quantized this way") from None
    if manifest.framework not in ONNX_FRAMEWORKS or not manifest.file.lower().endswith(".onnx"):
        raise QuantizeError("--from", f"{model}:{version} is not ONNX (framework {manifest.framework}, "
                            f"file {manifest.file})", "convert it to ONNX first (skl2onnx, tf2onnx, onnxmltools for "
                            "XGBoost, torch.onnx.export) and quantize that version")
    return folder, manifest


def example_splits(manifest: PredictManifest) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(training rows, held-out rows, held-out labels) of an example model's data; None for other models.

    The examples record their data as "sklearn make_classification, N rows, ..., seed S" (llmserve.models.examples)."""
    found = re.match(r"sklearn make_classification, (\d+) rows.*seed (\d+)", str(manifest.extra.get("data", "")))
    if not found:
        return None
    from llmserve.models.examples import fraud_dataset

    data = fraud_dataset(int(found.group(1)), int(found.group(2)))
    return data.x_train, data.x_test, data.y_test


def _normalised_opsets(model: Any) -> Any:
    """One default-domain opset, as the quantizer requires: skl2onnx can list it twice, onnxmltools not at all."""
    import onnx

    default = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    others = [onnx.helper.make_opsetid(o.domain, o.version) for o in model.opset_import
              if o.domain not in ("", "ai.onnx")]
    del model.opset_import[:]
    model.opset_import.extend([onnx.helper.make_opsetid("", max(default, default=17)), *others])
    return model


class _Rows:
    """onnxruntime's CalibrationDataReader protocol over an array, in batches of 256 rows."""

    def __init__(self, name: str, rows: np.ndarray) -> None:
        self._batches: Iterator[np.ndarray] = iter(np.array_split(rows, max(1, len(rows) // 256)))
        self._name = name

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {self._name: np.ascontiguousarray(batch, dtype=np.float32)}

    def rewind(self) -> None:  # part of the protocol; the calibrator reads the rows once
        pass


def op_counts(path: Path) -> dict[str, int]:
    import onnx

    return dict(collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node))


def quantize_file(source: Path, output: Path, config: QuantizeConfig, input_name: str,
                  calibration: np.ndarray | None = None) -> dict[str, Any]:
    """Write the INT8 model of ``source`` to ``output``; returns what was done (settings, operator counts)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    reduce_range = (not cpu_has_vnni()) if config.reduce_range is None else config.reduce_range
    model = _normalised_opsets(onnx.load(str(source)))
    settings: dict[str, Any] = {"mode": config.mode, "weights": "int8", "reduce_range": reduce_range,
                                "per_channel": config.per_channel, "onnxruntime_quantization": _ort_version()}
    if config.mode == "dynamic":
        quantize_dynamic(model, output, weight_type=QuantType.QInt8, reduce_range=reduce_range,
                         per_channel=config.per_channel)
        settings["activations"] = "uint8, quantized per batch at run time"
    else:
        assert calibration is not None
        quantize_static(model, output, _Rows(input_name, calibration), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=reduce_range,
                        per_channel=config.per_channel, calibrate_method=CalibrationMethod.MinMax)
        settings.update(activations="uint8, ranges from calibration (MinMax)", format="QDQ")
    settings.update(ops_before=op_counts(source), ops_after=op_counts(output),
                    size_bytes_before=source.stat().st_size, size_bytes_after=output.stat().st_size)
    settings["int8_ops"] = sum(n for op, n in settings["ops_after"].items() if op in INT8_OPS)
    return settings


def _ort_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)


def probabilities(path: Path, x: np.ndarray) -> np.ndarray:
    """Class probabilities of an ONNX classifier: its ``probabilities`` output, or a softmax of its logits
    (the same reading as ``router.predict.runtimes.OnnxRuntime``)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, {session.get_inputs()[0].name: x}), strict=True))
    if "probabilities" in outputs:
        return np.asarray(outputs["probabilities"], dtype=np.float32)
    logits = np.asarray(outputs[names[0]], dtype=np.float64)
    if logits.ndim == 1 or logits.shape[1] == 1:
        p = 1 / (1 + np.exp(-logits.reshape(-1)))
        return np.stack([1 - p, p], axis=1).astype(np.float32)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (shifted / shifted.sum(axis=1, keepdims=True)).astype(np.float32)


def agreement(reference: np.ndarray, candidate: np.ndarray) -> dict[str, Any]:
    """How closely a candidate's class probabilities follow a reference's, row by row."""
    diff = np.abs(np.asarray(reference, dtype=np.float64) - np.asarray(candidate, dtype=np.float64))
    return {"rows": int(len(reference)),
            "label_agreement": round(float((reference.argmax(axis=1) == candidate.argmax(axis=1)).mean()), 6),
            "max_abs_probability_diff": round(float(diff.max()), 6),
            "mean_abs_probability_diff": round(float(diff.mean()), 6)}


def _test_figures(probabilities: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """The example manifests' figures (``llmserve.models.examples``), for the INT8 model."""
    from sklearn.metrics import accuracy_score, roc_auc_score

    return {"test_accuracy": round(float(accuracy_score(y, probabilities.argmax(axis=1))), 4),
            "test_auc": round(float(roc_auc_score(y, probabilities[:, 1])), 4)}


def calibration_sample(manifest: PredictManifest, config: QuantizeConfig, calibration: np.ndarray | None,
                      splits: tuple[np.ndarray, np.ndarray, np.ndarray] | None) -> tuple[np.ndarray, str]:
    if calibration is None and splits is None:
        raise QuantizeError("--calibration", f"static quantization of {manifest.name} needs rows to calibrate on",
                            "pass --calibration ROWS.npy (float32 [n, features] from its training data)")
    rows, source = (calibration, "the --calibration file") if calibration is not None else \
        (splits[0], "the example's training split")  # type: ignore[index]
    if rows.ndim != 2 or (manifest.n_features is not None and rows.shape[1] != manifest.n_features):
        raise QuantizeError("--calibration", f"calibration rows have shape {list(rows.shape)}",
                            f"they must be [n, {manifest.n_features}] like the model's input")
    pick = np.random.default_rng(config.seed).permutation(len(rows))[: config.calibration_rows]
    return rows[np.sort(pick)].astype(np.float32), f"{len(pick)} rows of {source} (seed {config.seed})"


def quantize_version(models_dir: Path, model: str, from_version: str, to_version: str, config: QuantizeConfig,
                     calibration: np.ndarray | None = None, holdout: np.ndarray | None = None) -> QuantizeResult:
    """Quantize ``model:from_version`` into the new version ``model:to_version`` (whole folder or nothing)."""
    if config.mode not in MODES:
        raise QuantizeError("--mode", f"unknown mode {config.mode!r}", "use dynamic (no data needed) or static "
                            "(calibrated on training rows)")
    if not _VERSION.match(to_version):
        raise QuantizeError("--version", f"{to_version!r} is not a version label",
                            "use letters, digits, '.', '_' and '-', e.g. v1-int8")
    if config.calibration_rows < 1:
        raise QuantizeError("--calibration-rows", "must be at least 1", "e.g. 2000")
    folder, manifest = source_version(models_dir, model, from_version)
    target = folder.parent / to_version
    if target.exists():
        raise QuantizeError("--version", f"{model}:{to_version} already exists ({target})",
                            "pick another --version, or remove that folder if it is not deployed")
    splits = example_splits(manifest)
    rows, calibrated_on = (None, None)
    if config.mode == "static":
        rows, calibrated_on = calibration_sample(manifest, config, calibration, splits)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{to_version}-") as tmp:
        work = Path(tmp)
        report = quantize_file(folder / manifest.file, work / "model.onnx", config, manifest.inputs[0].name, rows)
        if report["int8_ops"] == 0:
            ops = ", ".join(f"{op} x{n}" for op, n in report["ops_before"].items())
            raise QuantizeError("--model", f"{model}:{from_version} has no operator onnxruntime quantizes ({ops}); "
                                "the INT8 file would be the same fp32 model", "serve it as it is: tree ensembles "
                                "are not quantizer targets (INT8 applies to MatMul, Gemm and Conv)")
        if calibrated_on:
            report["calibration"] = calibrated_on
        held = holdout if holdout is not None else (splits[1] if splits else None)
        extra = {k: v for k, v in manifest.extra.items() if k not in ("test_accuracy", "test_auc", "built_in_s")}
        if held is not None:
            reference = probabilities(folder / manifest.file, held.astype(np.float32))
            quantized = probabilities(work / "model.onnx", held.astype(np.float32))
            report["agreement_with_" + from_version] = agreement(reference, quantized)
            if splits is not None and holdout is None:
                extra.update(_test_figures(quantized, splits[2]))
        new = replace(manifest, version=to_version, file="model.onnx",
                      extra={**extra, "quantized_from": from_version, "quantization": report})
        new.write(work)
        shutil.move(str(work), str(target))  # whole folder or nothing, as the example builder does
    return QuantizeResult(target, new, report)


def add_parser(sub: Any) -> None:
    """Register ``quantize-onnx`` on the main command's subparsers."""
    cmd = sub.add_parser("quantize-onnx", help="write an INT8 version of an ONNX predict model (dynamic or static)",
                         description=__doc__.split("\n\n")[0])
    cmd.add_argument("--model", required=True, help="predict model name, e.g. fraud-onnx")
    cmd.add_argument("--from", dest="from_version", default="v1", help="the fp32 version (default v1)")
    cmd.add_argument("--version", dest="to_version", required=True, help="the new version, e.g. v1-int8")
    cmd.add_argument("--mode", required=True, metavar="dynamic|static",
                     help="dynamic: activations quantized per batch; static: calibrated activation ranges")
    cmd.add_argument("--calibration", metavar="ROWS.npy", help="static: float32 [n, features] training rows "
                     "(default for the example models: their own training split)")
    cmd.add_argument("--calibration-rows", type=int, default=QuantizeConfig.calibration_rows)
    cmd.add_argument("--holdout", metavar="ROWS.npy", help="rows to measure agreement on (examples: their test rows)")
    cmd.add_argument("--reduce-range", action=argparse.BooleanOptionalAction, default=None,
                     help="7-bit weights (default: on for a CPU without VNNI)")
    cmd.set_defaults(func=lambda args, settings: run(args, settings.model_repository))


def _load_rows(path: str | None, flag: str) -> np.ndarray | None:
    if path is None:
        return None
    try:
        return np.asarray(np.load(path, allow_pickle=False), dtype=np.float32)  # rows, never pickles
    except (OSError, ValueError) as exc:
        raise QuantizeError(flag, f"cannot read {path!r} as an .npy array: {exc}", "np.save(path, rows)") from None


def run(args: argparse.Namespace, models_dir: Path) -> int:
    try:
        config = QuantizeConfig(mode=args.mode, calibration_rows=args.calibration_rows,
                                reduce_range=args.reduce_range)
        result = quantize_version(models_dir, args.model, args.from_version, args.to_version, config,
                                  _load_rows(args.calibration, "--calibration"), _load_rows(args.holdout, "--holdout"))
    except QuantizeError as exc:
        print(f"llmserve quantize-onnx: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"folder": str(result.folder), **result.report}, indent=2))
    print(f"deploy it like any version: POST /api/v1/deployments {{\"model_name\": \"{args.model}\", "
          f"\"version\": \"{args.to_version}\", \"traffic_percent\": 10}}")
    return 0
