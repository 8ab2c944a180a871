"""A batch (the OpenAI Batch API), its store record, its JSON view, and the lines of its input file.

Times are Unix seconds (the JSON view rounds them down to integers, as OpenAI's are). Statuses are
OpenAI's: validating -> in_progress -> finalizing -> completed, or failed (the input could not be read),
expired (the completion window ended first: what finished is in the output), cancelling -> cancelled.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import orjson

from router.store.base import BatchRecord

BatchStatus = Literal["validating", "in_progress", "finalizing", "completed", "failed", "expired",
                      "cancelling", "cancelled"]
ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
MAX_ERRORS_SHOWN = 100  # line errors listed in the batch's ``errors`` (all of them are in the error file)
_WINDOW = re.compile(r"^(\d{1,6})([hms])$")
_TIMES = ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at",
          "cancelled_at")


def new_batch_id() -> str:
    return f"batch_{uuid.uuid4().hex}"


def window_seconds(window: str) -> float | None:
    """``"24h"`` -> 86400.0 (hours, minutes or seconds: ``Nh``, ``Nm``, ``Ns``); None for anything else or zero."""
    match = _WINDOW.match(window)
    if match is None or int(match.group(1)) == 0:
        return None
    return int(match.group(1)) * {"h": 3600.0, "m": 60.0, "s": 1.0}[match.group(2)]


@dataclass
class Batch:
    """One batch. ``owner``: the API key that made it (None: auth off); its lines run as that key.
    ``runner``: the router running it, whose lease lasts until ``lease_until`` unless renewed."""

    endpoint: str
    input_file_id: str
    completion_window: str
    created_at: float
    expires_at: float
    owner: str | None = None
    metadata: dict[str, str] | None = None
    id: str = field(default_factory=new_batch_id)
    status: BatchStatus = "validating"
    in_progress_at: float | None = None
    finalizing_at: float | None = None
    completed_at: float | None = None
    failed_at: float | None = None
    expired_at: float | None = None
    cancelling_at: float | None = None
    cancelled_at: float | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    runner: str = ""
    lease_until: float = 0.0
    chunk_rows: int = 0  # a predict batch's rows a unit, fixed when it is made (router.batches.rows)

    def visible_to(self, key_id: str | None, admin: bool) -> bool:
        return admin or self.owner == key_id

    def to_record(self) -> BatchRecord:
        detail = {f.name: getattr(self, f.name) for f in fields(self)
                  if f.name not in ("id", "status", "created_at", "runner", "lease_until")
                  and (f.name != "chunk_rows" or self.chunk_rows)}
        return BatchRecord(id=self.id, status=self.status, created_at=self.created_at, runner=self.runner,
                           lease_until=self.lease_until, detail=detail)

    @classmethod
    def of(cls, record: BatchRecord) -> Batch:
        return cls(**record.detail, id=record.id, status=record.status,  # type: ignore[arg-type]
                   created_at=record.created_at, runner=record.runner, lease_until=record.lease_until)

    def view(self) -> dict[str, Any]:
        """The batch as OpenAI's ``Batch`` object."""
        times = {name: _int(getattr(self, name)) for name in _TIMES}
        return {"id": self.id, "object": "batch", "endpoint": self.endpoint, "input_file_id": self.input_file_id,
                "completion_window": self.completion_window, "status": self.status,
                "output_file_id": self.output_file_id, "error_file_id": self.error_file_id,
                "created_at": int(self.created_at), "expires_at": int(self.expires_at), **times,
                "request_counts": {"total": self.total, "completed": self.completed, "failed": self.failed},
                "errors": {"object": "list", "data": self.errors} if self.errors else None,
                "metadata": self.metadata}


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)


@dataclass(frozen=True)
class Line:
    """One request line of an input file, numbered from 1: its ``body``, or why it cannot run (``error``:
    ``{"code", "message", "line"}``; its custom_id is "" when the line did not say one)."""

    number: int
    custom_id: str
    body: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


def _bad(number: int, custom_id: str, code: str, message: str) -> Line:
    return Line(number, custom_id, error={"code": code, "message": f"line {number}: {message}", "line": number})


def parse_line(number: int, raw: bytes, endpoint: str, seen: set[str]) -> Line:
    """A line checked as OpenAI checks one: JSON with a unique ``custom_id``, ``method`` POST, the batch's
    ``url`` and an object ``body`` (not streamed). ``seen``: the custom_ids of the lines before it."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return _bad(number, "", "invalid_json_line", f"not valid JSON ({exc})")
    if not isinstance(data, dict):
        return _bad(number, "", "invalid_json_line", "not a JSON object")
    custom_id = data.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return _bad(number, "", "missing_custom_id", "custom_id must be a non-empty string")
    if custom_id in seen:
        return _bad(number, custom_id, "duplicate_custom_id", f"custom_id {custom_id!r} is used by an earlier line")
    seen.add(custom_id)
    if data.get("method", "POST") != "POST":
        return _bad(number, custom_id, "invalid_method", f"method must be POST, got {data.get('method')!r}")
    url = data.get("url")
    if url != endpoint:
        known = "" if url in ENDPOINTS else f" (known endpoints: {', '.join(ENDPOINTS)})"
        return _bad(number, custom_id, "invalid_url", f"url {url!r} is not this batch's endpoint {endpoint}{known}")
    body = data.get("body")
    if not isinstance(body, dict):
        return _bad(number, custom_id, "invalid_body", "body must be a JSON object")
    if body.get("stream"):
        return _bad(number, custom_id, "invalid_body", "stream is not supported in a batch")
    return Line(number, custom_id, body=body)


def parse_lines(content: bytes, endpoint: str) -> list[Line]:
    """Every non-blank line of an input file (numbered as an editor numbers them), good or bad."""
    seen: set[str] = set()
    return [parse_line(number, raw, endpoint, seen)
            for number, raw in enumerate(content.split(b"\n"), start=1) if raw.strip()]


def count_lines(content: bytes) -> int:
    return sum(1 for raw in content.split(b"\n") if raw.strip())
