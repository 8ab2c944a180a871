"""A predict model version's manifest: framework, file, and the schema of its tensors.

A version is a folder ``<models>/<name>/<version>/`` holding the model file and
``manifest.json``::

    {"kind": "predict", "name": "fraud-xgboost", "version": "v1", "framework": "xgboost",
     "file": "model.ubj", "task": "classification", "classes": [0, 1],
     "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 30]}],
     "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]}],
     "allow_nan": false}

``-1`` in a shape is the batch dimension (the first axis). Datatypes are the
Open Inference Protocol's names.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from llmserve.errors import LLMServeError

FRAMEWORKS = ("onnx", "xgboost", "pytorch", "sklearn", "tensorflow")

# Open Inference Protocol datatype -> numpy dtype (BYTES: object arrays of bytes)
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_), "INT8": np.dtype(np.int8), "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64), "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16), "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
DATATYPE_OF: dict[np.dtype[Any], str] = {dtype: name for name, dtype in DATATYPES.items()}


class ManifestError(LLMServeError):
    """A predict model folder that cannot be served."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1: any size (the first axis is the batch)

    @property
    def dtype(self) -> np.dtype[Any]:
        return DATATYPES[self.datatype]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @classmethod
    def parse(cls, data: Any, where: str) -> TensorSpec:
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            raise ManifestError(f"{where}: each tensor needs a name, a datatype and a shape")
        datatype = data.get("datatype")
        if datatype not in DATATYPES:
            raise ManifestError(f"{where}: datatype {datatype!r} is not one of {', '.join(DATATYPES)}")
        shape = data.get("shape")
        if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and d >= -1 for d in shape):
            raise ManifestError(f"{where}: shape must be a list of sizes, -1 for any (the batch axis first)")
        return cls(data["name"], datatype, tuple(shape))


@dataclass(frozen=True)
class PredictManifest:
    name: str
    version: str
    framework: str
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    task: Literal["classification", "regression"] = "classification"
    classes: tuple[Any, ...] = ()
    allow_nan: bool = False
    feature_names: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)  # training details, sha256, teacher, ...

    @property
    def n_features(self) -> int | None:
        shape = self.inputs[0].shape
        return shape[1] if len(shape) == 2 and shape[1] > 0 else None

    def to_json(self) -> str:
        data = asdict(self)
        data["inputs"] = [t.to_dict() for t in self.inputs]
        data["outputs"] = [t.to_dict() for t in self.outputs]
        return json.dumps({"kind": "predict", **data}, indent=2) + "\n"

    def write(self, folder: Path) -> None:
        (folder / "manifest.json").write_text(self.to_json())

    @classmethod
    def read(cls, folder: Path) -> PredictManifest:
        path = Path(folder) / "manifest.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ManifestError(f"{path} does not exist; a predict model version is a folder with the model "
                                "file and a manifest.json") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise ManifestError(f"{path} is not readable JSON: {exc}") from None
        if not isinstance(data, dict) or data.get("kind") != "predict":
            raise ManifestError(f"{path} is not a predict model manifest (\"kind\": \"predict\")")
        framework = data.get("framework")
        if framework not in FRAMEWORKS:
            raise ManifestError(f"{path}: framework {framework!r} is not one of {', '.join(FRAMEWORKS)}")
        if data.get("task", "classification") not in ("classification", "regression"):
            raise ManifestError(f"{path}: task must be classification or regression")
        inputs = tuple(TensorSpec.parse(t, f"{path} inputs") for t in data.get("inputs") or [])
        outputs = tuple(TensorSpec.parse(t, f"{path} outputs") for t in data.get("outputs") or [])
        if not inputs or not outputs:
            raise ManifestError(f"{path}: inputs and outputs must each list at least one tensor")
        if not isinstance(data.get("file"), str) or "/" in data["file"]:
            raise ManifestError(f"{path}: file must name the model file inside the folder")
        return cls(
            name=str(data.get("name", "")), version=str(data.get("version", "")), framework=framework,
            file=data["file"], inputs=inputs, outputs=outputs, task=data.get("task", "classification"),
            classes=tuple(data.get("classes") or ()), allow_nan=bool(data.get("allow_nan", False)),
            feature_names=tuple(data.get("feature_names") or ()), extra=dict(data.get("extra") or {}),
        )
