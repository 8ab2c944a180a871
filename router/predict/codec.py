"""Request and response encodings of the predict APIs, with what each costs.

- The design's JSON (``{"inputs": [{"features": [...]}, ...]}``): one Python
  object per value; the slowest, fine for tens of rows.
- A NumPy ``.npy`` body (``Content-Type: application/x-npy``): one memcpy,
  for single-input models; the fast path for high-throughput clients.
- Open Inference Protocol v2 JSON (typed tensors, flat row-major ``data``),
  and its binary tensor extension (``Inference-Header-Content-Length``: the
  JSON header, then each tensor's raw little-endian bytes), which is what
  ``tritonclient`` sends by default.

Every decoding error is an ``InvalidInput`` naming the field.
"""

from __future__ import annotations

import io
import json
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from llmserve.models.predict_manifest import DATATYPE_OF, DATATYPES, PredictManifest, TensorSpec
from router.predict.errors import InvalidInput

NPY_TYPES = ("application/x-npy", "application/npy", "application/vnd.numpy")


def _spec(manifest: PredictManifest, name: str) -> TensorSpec | None:
    return next((t for t in manifest.inputs if t.name == name), None)


# -- the design's JSON --------------------------------------------------------------


def _loads(raw: bytes | memoryview) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        try:  # the standard library also reads NaN and Infinity, which the schema check then judges
            return json.loads(bytes(raw))
        except ValueError:
            raise InvalidInput(f"the request body is not valid JSON: {exc}", "body") from None


def parse_object(raw: bytes | memoryview) -> dict[str, Any]:
    """A JSON object body (orjson: about 3x the standard library on large arrays of numbers)."""
    data = _loads(raw)
    if not isinstance(data, dict):
        raise InvalidInput("the request body must be a JSON object", "body")
    return data


def may_hold_booleans(raw: bytes | memoryview) -> bool:
    """Whether a JSON body has any true/false literal: if not, no feature can be a boolean and
    the per-value type check is skipped (the cost of JSON at high row counts is that check)."""
    data = bytes(raw)
    return b"true" in data or b"false" in data


def decode_rows(body: dict[str, Any], manifest: PredictManifest, check_types: bool = True
                ) -> dict[str, np.ndarray]:
    rows = body.get("inputs")
    if rows is None:
        raise InvalidInput('the body needs "inputs": a list of rows such as [{"features": [0.5, 1.2, 3.4]}]',
                           "inputs")
    if not isinstance(rows, list) or not rows:
        raise InvalidInput('"inputs" must be a non-empty list of rows', "inputs")
    result = {}
    for spec in manifest.inputs:
        values = []
        for index, row in enumerate(rows):
            if not isinstance(row, dict) or spec.name not in row:
                raise InvalidInput(f"inputs[{index}] must be an object with {spec.name!r}", f"inputs[{index}]")
            values.append(row[spec.name])
        result[spec.name] = _to_array(values, spec, "inputs[*]." + spec.name, check_types)
    for index, row in enumerate(rows):
        extra = set(row) - {t.name for t in manifest.inputs}
        if extra:
            raise InvalidInput(f"inputs[{index}] has unknown fields {sorted(extra)}; this model takes "
                               f"{[t.name for t in manifest.inputs]}", f"inputs[{index}]")
    return result


def _to_array(values: Any, spec: TensorSpec, param: str, check_types: bool = True) -> np.ndarray:
    if spec.datatype == "BYTES":
        return np.asarray(values, dtype=object)
    try:
        array = np.asarray(values)
    except ValueError:
        raise InvalidInput(f"{param} is ragged: every row needs the same shape "
                           f"({list(spec.shape)}, -1: any)", param) from None
    if array.dtype == object:
        if any(type(v) is list for v in (values if isinstance(values, list) else [])):
            raise InvalidInput(f"{param} is ragged: every row needs the same shape "
                               f"({list(spec.shape)}, -1: any)", param)
        raise InvalidInput(f"{param} must hold numbers only ({spec.datatype})", param)
    if array.dtype.kind not in "iuf" or (check_types and _has_non_numbers(values)):
        # strings, booleans (numpy would take True as 1), or a mix of them with numbers
        raise InvalidInput(f"{param} must hold numbers only ({spec.datatype})", param)
    if spec.dtype.kind in "iu" and array.dtype.kind == "f":
        raise InvalidInput(f"{param} must hold integers ({spec.datatype})", param)
    return array.astype(spec.dtype, copy=False)


_NUMBER_TYPES = (int, float)


def _has_non_numbers(values: Any) -> bool:
    """Anything but int and float (bool and str included) in nested lists; one type check a value."""
    stack = [values]
    while stack:
        value = stack.pop()
        if type(value) is list:
            if value and type(value[0]) is not list:
                if not all(type(v) in _NUMBER_TYPES for v in value):
                    return True
            else:
                stack.extend(value)
        elif type(value) not in _NUMBER_TYPES:
            return True
    return False


# -- NumPy .npy -----------------------------------------------------------------------


def decode_npy(raw: bytes, manifest: PredictManifest) -> dict[str, np.ndarray]:
    if len(manifest.inputs) != 1:
        raise InvalidInput("an .npy body carries one tensor; this model takes several inputs: use the v2 API",
                           "body")
    try:
        array = np.load(io.BytesIO(raw), allow_pickle=False)
    except ValueError as exc:
        raise InvalidInput(f"the body is not a readable .npy array without pickled objects: {exc}", "body") from None
    return {manifest.inputs[0].name: array}


# -- Open Inference Protocol v2 ---------------------------------------------------


@dataclass
class V2Request:
    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: list[str] | None  # None: all
    binary_outputs: set[str] = field(default_factory=set)
    parameters: dict[str, Any] = field(default_factory=dict)


def decode_v2(raw: bytes, header_length: int | None, manifest: PredictManifest, binary_default: bool
              ) -> V2Request:
    if header_length is not None:
        if header_length < 0 or header_length > len(raw):
            raise InvalidInput("Inference-Header-Content-Length is larger than the body",
                               "Inference-Header-Content-Length")
        header_bytes, tail = raw[:header_length], memoryview(raw)[header_length:]
    else:
        header_bytes, tail = raw, memoryview(b"")
    header = _loads(header_bytes)
    check_types = may_hold_booleans(header_bytes)
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list) or not header["inputs"]:
        raise InvalidInput('the request needs "inputs": a list of tensors with name, shape, datatype and data',
                           "inputs")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for index, tensor in enumerate(header["inputs"]):
        where = f"inputs[{index}]"
        if not isinstance(tensor, dict):
            raise InvalidInput(f"{where} must be an object", where)
        name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
        if not isinstance(name, str):
            raise InvalidInput(f"{where}.name is missing", where)
        spec = _spec(manifest, name)
        if spec is None:
            raise InvalidInput(f"unknown input {name!r}; this model takes {[t.name for t in manifest.inputs]}", name)
        if datatype not in DATATYPES:
            raise InvalidInput(f"{where}.datatype {datatype!r} is not one of {', '.join(DATATYPES)}", name)
        if datatype != spec.datatype:
            raise InvalidInput(f"input {name!r} must be {spec.datatype}, got {datatype}", name)
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise InvalidInput(f"{where}.shape must be a list of non-negative sizes", name)
        count = int(np.prod(shape)) if shape else 1
        size = ((tensor.get("parameters") or {}).get("binary_data_size"))
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(tail):
                raise InvalidInput(f"input {name!r}: binary_data_size runs past the body", name)
            chunk = tail[offset:offset + size]
            offset += size
            array = _from_binary(bytes(chunk), spec, count, name)
        else:
            if "data" not in tensor:
                raise InvalidInput(f"input {name!r} has no data", name)
            array = _to_array(tensor["data"], spec, name, check_types).reshape(-1) if datatype != "BYTES" else \
                np.asarray(tensor["data"], dtype=object).reshape(-1)
            if array.size != count:
                raise InvalidInput(f"input {name!r} has {array.size} values but shape {shape} needs {count}", name)
        inputs[name] = array.reshape(shape)
    params = header.get("parameters") or {}
    requested = header.get("outputs")
    names = None
    binary: set[str] = set()
    if isinstance(requested, list):
        names = []
        for output in requested:
            if not isinstance(output, dict) or not isinstance(output.get("name"), str):
                raise InvalidInput("each requested output needs a name", "outputs")
            names.append(output["name"])
            if (output.get("parameters") or {}).get("binary_data", params.get("binary_data_output", False)):
                binary.add(output["name"])
    elif params.get("binary_data_output", binary_default):
        binary = {t.name for t in manifest.outputs}
    return V2Request(header.get("id"), inputs, names, binary, params)


def _from_binary(raw: bytes, spec: TensorSpec, count: int, name: str) -> np.ndarray:
    if spec.datatype == "BYTES":
        values, at = [], 0
        while at < len(raw):
            if at + 4 > len(raw):
                raise InvalidInput(f"input {name!r}: truncated BYTES element", name)
            (length,) = struct.unpack_from("<I", raw, at)
            values.append(raw[at + 4: at + 4 + length])
            at += 4 + length
        if len(values) != count:
            raise InvalidInput(f"input {name!r} has {len(values)} elements, its shape needs {count}", name)
        return np.asarray(values, dtype=object)
    itemsize = spec.dtype.itemsize
    if len(raw) != count * itemsize:
        raise InvalidInput(f"input {name!r}: {len(raw)} bytes, but {count} {spec.datatype} values need "
                           f"{count * itemsize}", name)
    return np.frombuffer(raw, dtype=spec.dtype.newbyteorder("<")).astype(spec.dtype, copy=False)


def encode_v2(model_name: str, version: str, request_id: str | None, outputs: dict[str, np.ndarray],
              wanted: list[str] | None, binary: set[str]) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers (binary tensors after the JSON header when asked for)."""
    names = wanted if wanted is not None else list(outputs)
    tensors, blobs = [], []
    for name in names:
        value = outputs[name]
        datatype = "BYTES" if value.dtype.kind in "OSU" else DATATYPE_OF.get(value.dtype, "FP32")
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(value.shape)}
        if name in binary:
            blob = _to_binary(value, datatype)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif datatype == "BYTES":
            entry["data"] = [v.decode() if isinstance(v, bytes) else str(v) for v in value.reshape(-1).tolist()]
        else:
            entry["data"] = np.ascontiguousarray(value.reshape(-1))
        tensors.append(entry)
    body = {"model_name": model_name, "model_version": version, "outputs": tensors}
    if request_id is not None:
        body["id"] = request_id
    header = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, {"content-type": "application/json"}
    return header + b"".join(blobs), {"content-type": "application/octet-stream",
                                      "inference-header-content-length": str(len(header))}


def _to_binary(value: np.ndarray, datatype: str) -> bytes:
    if datatype != "BYTES":
        return np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<")).tobytes()
    parts = []
    for item in value.reshape(-1).tolist():
        data = item if isinstance(item, bytes) else str(item).encode()
        parts.append(struct.pack("<I", len(data)) + data)
    return b"".join(parts)


def unknown_outputs(wanted: list[str] | None, outputs: dict[str, np.ndarray]) -> list[str]:
    return [name for name in wanted or [] if name not in outputs]
