"""Predict bulk scoring: the rows of an input file, their chunks, and the output and error files.

A batch whose ``endpoint`` is ``/api/v1/models/{m}/predict`` reads its input file as rows, in one of three
formats told apart by their bytes:

- ``.npy`` (NumPy's format, no pickled objects): the first axis is the rows; for a model with one input;
- JSONL: one row a line, as a row of the predict API's ``inputs`` (``{"features": [0.1, ...]}``);
- CSV: one row a line, every column a number (a first line that is not all numbers is a header); for a
  model with one input, whose tensor is the row's columns.

Rows are numbered from 1 in file order (blank lines are not rows). A row that cannot be read (bad JSON, a
CSV cell that is not a number, a column count unlike the first row's) is named by its number in the error
file; the other rows still run. Rows run a chunk at a time (``chunk_rows``, fixed when the batch is made
so a resumed batch cuts the same chunks): a chunk is the runner's unit, one predict call recorded once.

A chunk's record (what the line executor answered) is ``{"predictions": [[row, version, prediction], ...],
"errors": [{"row", "code", "message", "status_code"}, ...]}``. The output file has a line a row scored, in
row order: ``{"row": 7, "version": "v1", "prediction": {...}}``; the error file a line a row that was not:
``{"row": 8, "error": {"code", "message", "status_code"}}`` (for an expired or cancelled batch also each
row never run: ``batch_expired`` / ``batch_cancelled``).
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from router.batches.models import Line, count_lines
from router.batches.output import NOT_RUN
from router.store.base import BatchLineRecord

DEFAULT_CHUNK_ROWS = 256
_PREDICT = re.compile(r"^/api/v1/models/([^/]+)/predict$")
NPY_MAGIC = b"\x93NUMPY"


def predict_model(endpoint: str) -> str | None:
    """The model of a predict endpoint (``/api/v1/models/{m}/predict``); None for any other endpoint."""
    match = _PREDICT.match(endpoint)
    return match.group(1) if match else None


class InputFileError(ValueError):
    """A file that cannot be read as rows at all (the batch fails with ``code``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Rows:
    """A file's rows: ``objects`` (JSONL: a row object each, None for a bad row) or ``array`` (npy, CSV:
    indexed by row, a bad CSV row holds zeros); ``bad``: row index (from 0) -> why it cannot run."""

    count: int
    objects: list[dict[str, Any] | None] | None = None
    array: np.ndarray | None = None
    bad: dict[int, dict[str, Any]] = field(default_factory=dict)


def _bad(index: int, code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"code": code, "message": f"row {index + 1}: {message}", "status_code": None, **extra}


def read_rows(content: bytes) -> Rows:
    if content.startswith(NPY_MAGIC):
        return _npy(content)
    start = content.lstrip()[:1]
    return _jsonl(content) if start in (b"{", b"[", b'"') else _csv(content)


def count_rows(content: bytes) -> int:
    """Rows in a file without reading them all (an ``.npy`` header says; otherwise its non-blank lines)."""
    if content.startswith(NPY_MAGIC):
        try:
            return int(_npy_shape(content)[0])
        except (ValueError, IndexError, SyntaxError):
            return 0  # unreadable: the batch fails when it reads the file
    return count_lines(content)


def _npy_shape(content: bytes) -> tuple[int, ...]:
    handle = io.BytesIO(content)
    version = np.lib.format.read_magic(handle)
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, _ = reader(handle)
    return tuple(shape)


def _npy(content: bytes) -> Rows:
    try:
        array = np.load(io.BytesIO(content), allow_pickle=False)
    except ValueError as exc:
        raise InputFileError("invalid_npy", f"the file is not a readable .npy array without pickled objects: "
                                            f"{exc}") from None
    if array.ndim == 0 or array.dtype.kind not in "biuf":
        raise InputFileError("invalid_npy", f"an .npy input needs rows of numbers (at least one axis), got shape "
                                            f"{list(array.shape)} of {array.dtype}")
    return Rows(len(array), array=array)


def _jsonl(content: bytes) -> Rows:
    objects: list[dict[str, Any] | None] = []
    bad: dict[int, dict[str, Any]] = {}
    for number, raw in enumerate(content.split(b"\n"), start=1):
        if not raw.strip():
            continue
        index = len(objects)
        try:
            row = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            bad[index] = _bad(index, "invalid_json_line", f"line {number} is not valid JSON ({exc})", line=number)
            objects.append(None)
            continue
        if not isinstance(row, dict):
            bad[index] = _bad(index, "invalid_row", f"line {number} is not a JSON object such as "
                                                    '{"features": [0.5, 1.2]}', line=number)
            objects.append(None)
            continue
        objects.append(row)
    return Rows(len(objects), objects=objects, bad=bad)


def _number_row(cells: list[str]) -> list[float] | None:
    try:
        return [float(cell) for cell in cells]
    except ValueError:
        return None


def _csv(content: bytes) -> Rows:
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InputFileError("invalid_file", "the file is neither .npy, JSONL nor UTF-8 CSV") from None
    records = [r for r in csv.reader(io.StringIO(text)) if r and any(cell.strip() for cell in r)]
    if records and _number_row(records[0]) is None:
        records = records[1:]  # a header
    if not records:
        return Rows(0, array=np.zeros((0, 0)))
    width = len(records[0])
    array = np.zeros((len(records), width), dtype=np.float64)
    bad: dict[int, dict[str, Any]] = {}
    for index, cells in enumerate(records):
        values = _number_row(cells)
        if len(cells) != width:
            bad[index] = _bad(index, "invalid_row", f"has {len(cells)} columns; the first row has {width}")
        elif values is None:
            bad[index] = _bad(index, "invalid_row", "every column must be a number")
        else:
            array[index] = values
    return Rows(len(records), array=array, bad=bad)


def chunks(rows: Rows, chunk_rows: int) -> list[Line]:
    """The file's rows cut into chunks of ``chunk_rows``, numbered from 1. A chunk's ``body``: ``rows`` (the
    numbers of its readable rows), ``inputs`` (those rows: objects or an array), ``bad`` (its unreadable
    rows' errors)."""
    lines = []
    for number, first in enumerate(range(0, rows.count, chunk_rows), start=1):
        indices = [i for i in range(first, min(first + chunk_rows, rows.count)) if i not in rows.bad]
        inputs: Any = [rows.objects[i] for i in indices] if rows.objects is not None else \
            (rows.array[indices] if rows.array is not None else [])
        last = min(first + chunk_rows, rows.count)
        lines.append(Line(number, f"rows {first + 1}-{last}", body={
            "rows": [i + 1 for i in indices], "inputs": inputs,
            "bad": [rows.bad[i] | {"row": i + 1} for i in range(first, last) if i in rows.bad]}))
    return lines


def rows_in(line: Line) -> int:
    assert line.body is not None
    return len(line.body["rows"]) + len(line.body["bad"])


def _answer(record: BatchLineRecord) -> dict[str, Any]:
    body = record.body.get("body")
    return body if isinstance(body, dict) else {}


def counts(record: BatchLineRecord) -> tuple[int, int]:
    answer = _answer(record)
    if "predictions" in answer:
        return len(answer["predictions"]), len(answer.get("errors", []))
    first, last = (int(n) for n in record.custom_id.removeprefix("rows ").split("-"))
    return 0, last - first + 1  # an answer without rows (an unexpected failure): every row failed


def render(records: list[BatchLineRecord], lines: list[Line], final: str) -> tuple[bytes, bytes]:
    """(output file, error file) in row order."""
    out: list[tuple[int, bytes]] = []
    errors: list[tuple[int, bytes]] = []
    done = {record.line for record in records}
    for record in records:
        answer = _answer(record)
        for row, version, prediction in answer.get("predictions", []):
            out.append((row, orjson.dumps({"row": row, "version": version, "prediction": prediction})))
        for error in answer.get("errors", []):
            errors.append((error["row"], orjson.dumps({"row": error["row"], "error": _error(error)})))
        if "predictions" not in answer:  # an unexpected failure: every row of the chunk
            failure = answer.get("error", {"message": "internal error"})
            first, last = (int(n) for n in record.custom_id.removeprefix("rows ").split("-"))
            for row in range(first, last + 1):
                errors.append((row, orjson.dumps({"row": row, "error": {
                    "code": failure.get("code") or "internal_error", "message": failure.get("message"),
                    "status_code": record.status_code}})))
    for line in lines:
        if line.number in done or line.body is None:
            continue
        for error in line.body["bad"]:  # a chunk never run still names its unreadable rows
            errors.append((error["row"], orjson.dumps({"row": error["row"], "error": _error(error)})))
        if final in NOT_RUN:
            code, message = NOT_RUN[final]
            for row in line.body["rows"]:
                errors.append((row, orjson.dumps({"row": row, "error": {
                    "code": code, "message": message.replace("request", "row"), "status_code": None}})))
    out.sort(key=lambda pair: pair[0])
    errors.sort(key=lambda pair: pair[0])
    return b"".join(e + b"\n" for _, e in out), b"".join(e + b"\n" for _, e in errors)


def _error(error: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in error.items() if k != "row"}
