"""An async job, what running it gave, and the JSON a client sees of it (``GET /api/v1/jobs/{id}``, and
the body of its callback)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel

JobStatus = Literal["queued", "running", "succeeded", "failed", "expired"]
CallbackStatus = Literal["pending", "delivered", "failed"]
JOBS_PATH = "/api/v1/jobs"


def new_job_id() -> str:
    return f"job_{uuid.uuid4().hex}"


@dataclass(frozen=True)
class Outcome:
    """What the synchronous call would have answered: its status and its exact JSON body."""

    status_code: int
    body: dict[str, Any]

    @property
    def succeeded(self) -> bool:
        return 200 <= self.status_code < 300

    def error(self) -> dict[str, Any]:
        """The ``error`` object of a failed call (the sync error body's), whatever shape its body had."""
        error = self.body.get("error")
        if isinstance(error, dict):
            return error
        message = error if isinstance(error, str) else str(self.body)[:300]
        return {"message": message, "type": "server_error", "param": None, "code": str(self.status_code)}


@dataclass
class Job:
    """One async request; times are Unix seconds. ``owner``: the API key that made it (None: auth off).
    ``runner``: the router running it, whose lease on it lasts until ``lease_until`` unless renewed (a
    router that stops stops renewing, and another router's sweep fails the job); kept by a shared store."""

    kind: Literal["predict", "generate"]
    model: str
    owner: str | None
    request_id: str
    created_at: float
    callback_url: str | None = None
    id: str = field(default_factory=new_job_id)
    status: JobStatus = "queued"
    started_at: float | None = None
    finished_at: float | None = None
    outcome: Outcome | None = None
    callback_status: CallbackStatus | None = None
    runner: str = ""
    lease_until: float = 0.0

    @property
    def finished(self) -> bool:
        return self.status in ("succeeded", "failed", "expired")

    @property
    def status_url(self) -> str:
        return f"{JOBS_PATH}/{self.id}"

    def expires_at(self, retention_s: float) -> float | None:
        return None if self.finished_at is None else self.finished_at + retention_s

    def visible_to(self, key_id: str | None, admin: bool) -> bool:
        return admin or self.owner == key_id


class JobView(BaseModel):
    """A job as clients see it: ``result`` is the body the synchronous call would have answered, ``error``
    its error object (``{"message", "type", "param", "code"}``), ``status_code`` that call's status."""

    id: str
    object: Literal["job"] = "job"
    status: JobStatus
    kind: str
    model: str
    request_id: str
    status_url: str
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    expires_at: float | None = None
    status_code: int | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    callback_url: str | None = None
    callback_status: CallbackStatus | None = None

    @classmethod
    def of(cls, job: Job, retention_s: float, now: float) -> JobView:
        """The view at ``now``: a result past its retention is gone (status expired) even before the sweep."""
        expires_at = job.expires_at(retention_s)
        expired = job.status == "expired" or (expires_at is not None and expires_at <= now)
        outcome = None if expired else job.outcome
        return cls(id=job.id, status="expired" if expired else job.status, kind=job.kind, model=job.model,
                   request_id=job.request_id, status_url=job.status_url, created_at=job.created_at,
                   started_at=job.started_at, finished_at=job.finished_at, expires_at=expires_at,
                   status_code=job.outcome.status_code if job.outcome is not None else None,
                   result=outcome.body if outcome is not None and outcome.succeeded else None,
                   error=outcome.error() if outcome is not None and not outcome.succeeded else None,
                   callback_url=job.callback_url, callback_status=job.callback_status)
