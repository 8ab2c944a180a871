"""A batch's output and error files, as OpenAI writes them, from the lines the store recorded.

Output: one line a request answered 2xx, in input order:
``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error": null}``. Errors: a request
answered otherwise (``response`` as above, ``error`` null), a line that could not run (``response`` null,
``error`` ``{"code", "message", "line"}``), and, for an expired or cancelled batch, each line never run
(``batch_expired`` / ``batch_cancelled``).
"""

from __future__ import annotations

from typing import Any

import orjson

from router.batches.models import Line
from router.store.base import BatchLineRecord

NOT_RUN = {"expired": ("batch_expired", "the batch's completion window ended before this request ran"),
           "cancelled": ("batch_cancelled", "the batch was cancelled before this request ran")}


def line_id(batch_id: str, number: int) -> str:
    return f"batch_req_{batch_id.removeprefix('batch_')}_{number}"


def ran(line: Line, request_id: str, status_code: int, body: dict[str, Any]) -> BatchLineRecord:
    """What the store keeps of a line that got an answer."""
    return BatchLineRecord(line.number, line.custom_id, status_code, {"request_id": request_id, "body": body})


def unrunnable(line: Line) -> BatchLineRecord:
    """What the store keeps of a line that could not run (status 0: no request was made)."""
    assert line.error is not None
    return BatchLineRecord(line.number, line.custom_id, 0, {"error": line.error})


def succeeded(record: BatchLineRecord) -> bool:
    return 200 <= record.status_code < 300


def _entry(batch_id: str, record: BatchLineRecord) -> dict[str, Any]:
    custom_id = record.custom_id or None
    if record.status_code == 0:
        return {"id": line_id(batch_id, record.line), "custom_id": custom_id, "response": None,
                "error": record.body["error"]}
    return {"id": line_id(batch_id, record.line), "custom_id": custom_id,
            "response": {"status_code": record.status_code, "request_id": record.body.get("request_id"),
                         "body": record.body.get("body")}, "error": None}


def render(batch_id: str, records: list[BatchLineRecord], lines: list[Line], final: str) -> tuple[bytes, bytes]:
    """(output file, error file) of a batch ending ``final`` (completed, expired or cancelled)."""
    output: list[bytes] = []
    errors: list[tuple[int, bytes]] = []
    for record in records:
        encoded = orjson.dumps(_entry(batch_id, record))
        (output.append(encoded) if succeeded(record) else errors.append((record.line, encoded)))
    if final in NOT_RUN:
        code, message = NOT_RUN[final]
        done = {record.line for record in records}
        for line in lines:
            if line.number not in done:
                errors.append((line.number, orjson.dumps({
                    "id": line_id(batch_id, line.number), "custom_id": line.custom_id or None, "response": None,
                    "error": {"code": code, "message": message, "line": line.number}})))
    errors.sort(key=lambda pair: pair[0])
    return _jsonl(output), _jsonl([encoded for _, encoded in errors])


def _jsonl(lines: list[bytes]) -> bytes:
    return b"".join(line + b"\n" for line in lines)
