"""Structured JSON logs carry the request id."""

from __future__ import annotations

import json
import logging

from llmserve.logs import JSONFormatter
from router.observe.request_record import RequestRecord


def test_request_log_lines_are_json_with_the_request_id() -> None:
    captured: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            captured.append(JSONFormatter().format(record))

    logger = logging.getLogger("router.requests")
    handler = Capture()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        record = RequestRecord("req-123", "/v1/chat/completions", model="m", version="v1", replica="m:v1/0")
        record.finish(200)
    finally:
        logger.removeHandler(handler)
    entry = json.loads(captured[-1])
    assert entry["request_id"] == "req-123" and entry["level"] == "info" and entry["logger"] == "router.requests"
    assert "version=v1" in entry["message"] and entry["ts"].endswith("Z")


def test_exceptions_keep_their_traceback() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    entry = json.loads(JSONFormatter().format(record))
    assert "Traceback" in entry["exception"] and "ValueError: boom" in entry["exception"]
