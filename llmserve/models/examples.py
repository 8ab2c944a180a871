"""Example traditional models, built from generated data: a fraud-style classifier per framework.

    llmserve examples [--models-dir DIR] [--rows 20000]

The data is scikit-learn's ``make_classification``: 30 transaction-like
features, about 3% positives (the "fraud" class), a fixed seed. Each model is
written as version ``v1`` of its own model in the repository, with a predict
manifest (framework, file, input and output schema, training figures):

- ``fraud-xgboost``: gradient-boosted trees, XGBoost's native ``model.ubj``;
- ``fraud-sklearn``: a scikit-learn random forest converted with skl2onnx;
- ``fraud-onnx``: a small PyTorch network exported to ONNX;
- ``fraud-pytorch``: the same network as a TorchScript program;
- ``fraud-xgboost-lite``: a depth-8 decision tree distilled from
  ``fraud-xgboost`` (``fallback.tabular``), its fallback under overload.

Nothing is pickled. Building is idempotent: a version already there is kept.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmserve.models.predict_manifest import PredictManifest, TensorSpec

logger = logging.getLogger(__name__)

N_FEATURES = 30
EXAMPLES = ("fraud-xgboost", "fraud-sklearn", "fraud-onnx", "fraud-pytorch")
FALLBACK_EXAMPLE = "fraud-xgboost-lite"  # a shallow tree distilled from fraud-xgboost (fallback.tabular)
FEATURES = TensorSpec("features", "FP32", (-1, N_FEATURES))
CLASSIFIER_OUTPUTS = (TensorSpec("probabilities", "FP32", (-1, 2)), TensorSpec("label", "INT64", (-1,)))


@dataclass(frozen=True)
class Dataset:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def fraud_dataset(rows: int = 20_000, seed: int = 0) -> Dataset:
    from sklearn.datasets import make_classification
    from sklearn.model_selection import train_test_split

    x, y = make_classification(n_samples=rows, n_features=N_FEATURES, n_informative=12, n_redundant=6,
                               weights=[0.97], flip_y=0.005, class_sep=1.2, random_state=seed)
    x_train, x_test, y_train, y_test = train_test_split(x.astype(np.float32), y.astype(np.int64), test_size=0.25,
                                                        random_state=seed, stratify=y)
    return Dataset(x_train, y_train, x_test, y_test)


def _figures(probabilities: np.ndarray, y: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, roc_auc_score

    return {"test_accuracy": round(float(accuracy_score(y, probabilities.argmax(axis=1))), 4),
            "test_auc": round(float(roc_auc_score(y, probabilities[:, 1])), 4)}


def _xgboost(folder: Path, data: Dataset) -> tuple[str, dict[str, Any]]:
    import xgboost as xgb

    model = xgb.XGBClassifier(n_estimators=150, max_depth=6, learning_rate=0.1, n_jobs=2, random_state=0)
    model.fit(data.x_train, data.y_train)
    model.get_booster().save_model(str(folder / "model.ubj"))
    return "model.ubj", _figures(model.predict_proba(data.x_test), data.y_test)


def _sklearn(folder: Path, data: Dataset) -> tuple[str, dict[str, Any]]:
    from skl2onnx import to_onnx
    from sklearn.ensemble import RandomForestClassifier

    model = RandomForestClassifier(n_estimators=60, max_depth=10, n_jobs=2, random_state=0)
    model.fit(data.x_train, data.y_train)
    onnx_model = to_onnx(model, data.x_train[:1], options={id(model): {"zipmap": False}},
                         initial_types=None, final_types=None, target_opset=17)
    # skl2onnx names the input "X" and outputs "label"/"probabilities"; rename the input to the schema's
    onnx_model.graph.input[0].name = "features"
    for node in onnx_model.graph.node:
        node.input[:] = ["features" if name == "X" else name for name in node.input]
    (folder / "model.onnx").write_bytes(onnx_model.SerializeToString())
    return "model.onnx", _figures(model.predict_proba(data.x_test), data.y_test)


def _network(data: Dataset) -> Any:
    import torch

    torch.manual_seed(0)
    mean, std = data.x_train.mean(axis=0), data.x_train.std(axis=0) + 1e-6

    class FraudNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.from_numpy(mean))
            self.register_buffer("std", torch.from_numpy(std))
            self.layers = torch.nn.Sequential(torch.nn.Linear(N_FEATURES, 64), torch.nn.ReLU(),
                                              torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            # the buffers' type is unknown to mypy; TorchScript rejects the annotations that would say it
            return self.layers((features - self.mean) / self.std)  # type: ignore[operator]

    net = FraudNet()
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    weight = torch.tensor([1.0, 4.0])  # the rare class counts more
    for _epoch in range(12):
        for batch in torch.randperm(len(x)).split(256):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(x[batch]), y[batch], weight=weight)
            loss.backward()
            optimizer.step()
    net.eval()
    return net


def _network_figures(net: Any, data: Dataset) -> dict[str, Any]:
    import torch

    with torch.inference_mode():
        probabilities = torch.softmax(net(torch.from_numpy(data.x_test)), dim=1).numpy()
    return _figures(probabilities, data.y_test)


def _onnx(folder: Path, data: Dataset) -> tuple[str, dict[str, Any]]:
    import torch

    net = _network(data)
    torch.onnx.export(net, (torch.from_numpy(data.x_train[:4]),), str(folder / "model.onnx"), dynamo=False,
                      input_names=["features"], output_names=["logits"],
                      dynamic_axes={"features": {0: "batch"}, "logits": {0: "batch"}})
    return "model.onnx", _network_figures(net, data)


def _pytorch(folder: Path, data: Dataset) -> tuple[str, dict[str, Any]]:
    import torch

    net = _network(data)
    torch.jit.save(torch.jit.script(net), str(folder / "model.pt"))
    return "model.pt", _network_figures(net, data)


_BUILDERS: dict[str, tuple[str, Callable[[Path, Dataset], tuple[str, dict[str, Any]]]]] = {
    "fraud-xgboost": ("xgboost", _xgboost),
    "fraud-sklearn": ("sklearn", _sklearn),
    "fraud-onnx": ("onnx", _onnx),
    "fraud-pytorch": ("pytorch", _pytorch),
}


# (teacher folder, output folder, data) -> report; ``fallback.tabular.distill_tabular`` in the product.
# Passed in, because the model repository must not import the distillers that build on it.
Distiller = Callable[[Path, Path, Any], dict[str, Any]]


def build_examples(models_dir: Path, rows: int = 20_000, names: tuple[str, ...] = EXAMPLES,
                   version: str = "v1", distill_fallback: Distiller | None = None) -> list[Path]:
    """Train and write each example model not already in the repository; returns their folders."""
    data: Dataset | None = None
    folders = []
    for name in names:
        framework, build = _BUILDERS[name]
        folder = Path(models_dir) / name / version
        folders.append(folder)
        if (folder / "manifest.json").exists():
            continue
        data = data or fraud_dataset(rows)
        started = time.monotonic()
        folder.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
            work = Path(tmp)
            file, figures = build(work, data)
            PredictManifest(
                name=name, version=version, framework=framework, file=file, inputs=(FEATURES,),
                outputs=CLASSIFIER_OUTPUTS, task="classification", classes=(0, 1),
                feature_names=tuple(f"f{i}" for i in range(N_FEATURES)),
                extra={"data": f"sklearn make_classification, {rows} rows, 30 features, ~3% positives, seed 0",
                       **figures, "built_in_s": round(time.monotonic() - started, 1)},
            ).write(work)
            shutil.move(str(work), str(folder))  # whole folder or nothing
        logger.info("built example %s:%s (%s) %s", name, version, framework, figures)
    if "fraud-xgboost" in names and distill_fallback is not None:
        folder = Path(models_dir) / FALLBACK_EXAMPLE / version
        if not (folder / "manifest.json").exists():
            report = distill_fallback(Path(models_dir) / "fraud-xgboost" / version, folder, data or fraud_dataset(rows))
            logger.info("built fallback %s: agreement %.4f with fraud-xgboost", FALLBACK_EXAMPLE, report["agreement"])
        folders.append(folder)
    return folders
