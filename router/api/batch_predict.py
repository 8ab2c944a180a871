"""How a predict batch's chunk of rows runs: one call through the predict handler
(``router.api.predict.answer_predict``) as the batch's key, in the batch band, so its rows queue on the
version's dynamic batcher beside online requests (and are taken after them, and shed first).

A chunk the handler refuses as bad input (400) is cut in halves, and each half tried again, down to the
single rows that are bad: those are named in the error file and the rest are scored (a chunk of n rows with
one bad row costs about 2 log2(n) extra calls). A refusal that says when to come back (a full queue: 429, a
deadline: 503, with Retry-After) refuses the whole chunk: the runner puts it back and pauses the batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI

from router.api import _inprocess as inprocess
from router.api.predict import answer_predict
from router.batches.models import Batch, Line
from router.batches.rows import predict_model
from router.batches.runner import LineAnswer
from router.state import RouterState

Scored = tuple[list[list[Any]], list[dict[str, Any]]]  # (predictions [row, version, prediction], errors)


class _Refused(Exception):
    def __init__(self, answer: LineAnswer) -> None:
        super().__init__(answer.status_code)
        self.answer = answer


def _row_objects(state: RouterState, model: str, inputs: Any) -> list[dict[str, Any]] | str:
    """The chunk's rows as the predict API's ``inputs`` rows; an array (``.npy``, CSV) becomes rows of the
    model's one input. A string: why the rows cannot be sent."""
    if not isinstance(inputs, np.ndarray):
        return list(inputs)
    served = state.catalog.find(model)
    predictor = next((v.predictor for v in served.versions.values() if v.predictor is not None), None) \
        if served is not None else None
    if predictor is None:
        return f"model {model!r} has no predict version being served"
    if len(predictor.manifest.inputs) != 1:
        names = [t.name for t in predictor.manifest.inputs]
        return f"an .npy or CSV file carries one tensor; this model takes {names}: send JSONL rows"
    name = predictor.manifest.inputs[0].name
    return [{name: row} for row in inputs.tolist()]


def _failed(rows: list[int], status_code: int, code: str | None, message: str) -> list[dict[str, Any]]:
    return [{"row": row, "code": code or "error", "message": f"row {row}: {message}", "status_code": status_code}
            for row in rows]


async def score_chunk(app: FastAPI, batch: Batch, line: Line, request_id: str) -> LineAnswer:
    """``{"predictions": [[row, version, prediction], ...], "errors": [...]}`` of the chunk ``line``
    (its unreadable rows among the errors), or the refusal of one of its calls."""
    assert line.body is not None
    state: RouterState = app.state.router
    model = predict_model(batch.endpoint)
    assert model is not None
    rows: list[int] = line.body["rows"]
    predictions: list[list[Any]] = []
    errors: list[dict[str, Any]] = list(line.body["bad"])
    objects = _row_objects(state, model, line.body["inputs"]) if rows else []
    if isinstance(objects, str):
        errors += _failed(rows, 400, "invalid_request", objects)
    elif rows:
        calls = 0

        async def score(part_rows: list[int], part: list[dict[str, Any]]) -> Scored:
            nonlocal calls
            calls += 1
            answer = await inprocess.call(app, batch, "predict", orjson.dumps({"inputs": part}),
                                          request_id if calls == 1 else f"{request_id}.{calls}",
                                          lambda call: answer_predict(call, model))
            if answer.refused:
                raise _Refused(answer)
            if 200 <= answer.status_code < 300:
                version = answer.body.get("version")
                return [[row, version, p] for row, p in zip(part_rows, answer.body["predictions"], strict=True)], []
            if answer.status_code == 400 and len(part_rows) > 1:
                half = len(part_rows) // 2
                left, right = await score(part_rows[:half], part[:half]), await score(part_rows[half:], part[half:])
                return left[0] + right[0], left[1] + right[1]
            found = answer.body.get("error")
            error: dict[str, Any] = found if isinstance(found, dict) else {}
            return [], _failed(part_rows, answer.status_code, error.get("code"), str(error.get("message")))

        try:
            scored, failed = await score(rows, objects)
        except _Refused as refusal:
            return refusal.answer
        predictions, errors = scored, errors + failed
    errors.sort(key=lambda error: error["row"])
    return LineAnswer(200, {"predictions": predictions, "errors": errors})
