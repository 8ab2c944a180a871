"""Runtimes: one interface over ONNX Runtime, XGBoost and PyTorch.

``Runtime.predict(inputs)`` takes a batch (input name -> array, batch axis
first) and returns the model's outputs in the manifest's terms: classifiers
give ``probabilities`` [n, classes] and ``label`` [n]; regressors ``score``
[n]. scikit-learn and TensorFlow models are served through ONNX (converted
with skl2onnx and tf2onnx). Every runtime releases the GIL while it computes,
so a few threads give real parallelism.

Files are never unpickled: a pickle or joblib file runs code when it is
loaded, so it is refused with a note on how to convert it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

from llmserve.models.predict_manifest import ManifestError, PredictManifest

_PICKLE_SUFFIXES = (".pkl", ".pickle", ".joblib", ".sav", ".dill", ".cloudpickle")
_CONVERT = {
    "sklearn": "convert it to ONNX with skl2onnx (skl2onnx.to_onnx(model, X[:1].astype('float32'), "
               "options={'zipmap': False})) and set framework 'sklearn', file 'model.onnx'",
    "xgboost": "save it with booster.save_model('model.ubj') (or .json)",
    "pytorch": "save it with torch.jit.save(torch.jit.script(model), 'model.pt') or torch.export.save(...)",
    "onnx": "export the model to ONNX",
    "tensorflow": "convert it to ONNX with tf2onnx and set file 'model.onnx'",
}


class Runtime(Protocol):
    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def _refuse_pickles(path: Path, framework: str) -> None:
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise ManifestError(f"{path.name} is a pickle-style file; llmserve never unpickles (loading a pickle "
                            f"runs arbitrary code): {_CONVERT[framework]}")
    with path.open("rb") as fh:
        head = fh.read(2)
    if len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        raise ManifestError(f"{path.name} holds pickle data; llmserve never unpickles: {_CONVERT[framework]}")


def _classifier_outputs(probabilities: np.ndarray, classes: tuple[Any, ...]) -> dict[str, np.ndarray]:
    probabilities = np.asarray(probabilities, dtype=np.float32)
    index = probabilities.argmax(axis=1)
    labels = np.asarray(classes)[index] if classes else index.astype(np.int64)
    return {"probabilities": probabilities, "label": labels}


class OnnxRuntime:
    """ONNX Runtime on the CPU, one intra-op thread (parallelism comes from batcher instances)."""

    def __init__(self, path: Path, manifest: PredictManifest, threads: int = 1) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        try:
            self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for corrupt files
            raise ManifestError(f"{path.name} is not a loadable ONNX model: {str(exc).splitlines()[0][:300]}") \
                from None
        self._manifest = manifest
        self._input_names = [i.name for i in self._session.get_inputs()]
        self._output_names = [o.name for o in self._session.get_outputs()]
        wanted = [t.name for t in manifest.inputs]
        if len(self._input_names) != len(wanted):
            raise ManifestError(f"{path.name} takes inputs {self._input_names}; the manifest lists {wanted}")

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {name: inputs[spec.name] for name, spec in zip(self._input_names, self._manifest.inputs, strict=True)}
        results = dict(zip(self._output_names, self._session.run(None, feed), strict=True))
        if self._manifest.task == "regression":
            first = np.asarray(next(iter(results.values())), dtype=np.float32)
            return {"score": first.reshape(len(first), -1)[:, 0]}
        if "probabilities" in results:
            return _classifier_outputs(results["probabilities"], self._manifest.classes)
        # a network that ends in logits
        logits = np.asarray(results[self._output_names[0]], dtype=np.float32)
        return _classifier_outputs(_softmax(logits), self._manifest.classes)


class XGBoostRuntime:
    def __init__(self, path: Path, manifest: PredictManifest, threads: int = 1) -> None:
        import xgboost as xgb

        if path.suffix.lower() not in (".json", ".ubj"):
            raise ManifestError(f"{path.name}: XGBoost models load from their native .json or .ubj files only")
        self._booster = xgb.Booster()
        try:
            self._booster.load_model(str(path))
        except xgb.core.XGBoostError as exc:
            raise ManifestError(f"{path.name} is not a loadable XGBoost model: {str(exc).splitlines()[0][:300]}") \
                from None
        self._booster.set_param({"nthread": threads})
        self._manifest = manifest
        objective = self._booster.save_config()
        self._binary = '"binary:' in objective
        expected = manifest.n_features
        if expected is not None and self._booster.num_features() != expected:
            raise ManifestError(f"{path.name} takes {self._booster.num_features()} features; "
                                f"the manifest says {expected}")

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs[self._manifest.inputs[0].name]
        raw = np.asarray(self._booster.inplace_predict(x, validate_features=False), dtype=np.float32)
        if self._manifest.task == "regression":
            return {"score": raw.reshape(len(x), -1)[:, 0]}
        if self._binary or raw.ndim == 1:
            raw = np.stack([1 - raw, raw], axis=1)
        return _classifier_outputs(raw, self._manifest.classes)


class TorchRuntime:
    """TorchScript (``.pt``) or ``torch.export`` programs (``.pt2``); never ``torch.load`` of a pickle."""

    def __init__(self, path: Path, manifest: PredictManifest, threads: int = 1) -> None:
        import torch

        torch.set_num_threads(threads)
        self._torch = torch
        try:
            if path.suffix == ".pt2":
                self._module = torch.export.load(str(path)).module()
            else:
                self._module = torch.jit.load(str(path), map_location="cpu")
                self._module.eval()
        except Exception as exc:  # torch raises RuntimeError and friends for a bad archive
            raise ManifestError(f"{path.name} is not a TorchScript or torch.export program: "
                                f"{str(exc).splitlines()[0][:300]}") from None
        self._manifest = manifest

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tensors = [self._torch.from_numpy(np.ascontiguousarray(inputs[t.name])) for t in self._manifest.inputs]
        with self._torch.inference_mode():
            out = self._module(*tensors)
        values = out.float().numpy()
        if self._manifest.task == "regression":
            return {"score": values.reshape(len(values), -1)[:, 0]}
        return _classifier_outputs(_softmax(values), self._manifest.classes)


def _softmax(logits: np.ndarray) -> np.ndarray:
    if logits.ndim == 1 or logits.shape[1] == 1:  # one logit: the positive class
        p = 1 / (1 + np.exp(-logits.reshape(-1)))
        return np.stack([1 - p, p], axis=1)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def load_runtime(folder: Path, manifest: PredictManifest, threads: int = 1) -> Runtime:
    path = Path(folder) / manifest.file
    if not path.is_file():
        raise ManifestError(f"{path} does not exist (the manifest's file)")
    _refuse_pickles(path, manifest.framework)
    if manifest.framework == "xgboost":
        return XGBoostRuntime(path, manifest, threads)
    if manifest.framework == "pytorch":
        return TorchRuntime(path, manifest, threads)
    if path.suffix.lower() != ".onnx":
        raise ManifestError(f"{path.name}: {manifest.framework} models are served as ONNX: "
                            f"{_CONVERT[manifest.framework]}")
    return OnnxRuntime(path, manifest, threads)
