"""The predict path's domain errors: no HTTP here, ``router.errors`` maps them to answers."""

from __future__ import annotations

import math


class InvalidInput(ValueError):
    """An input that does not match the model's schema; ``param`` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class Overloaded(Exception):
    """Refused at admission by a version's batcher.

    ``status`` says which refusal: 429 when the queue is full (a fallback model may
    answer instead), 503 when the request's deadline cannot be met or the version is
    retiring; either way the client is told to retry after ``retry_after_s``.
    """

    def __init__(self, status: int, reason: str, retry_after_s: float) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.retry_after_s = max(1, math.ceil(retry_after_s))
