"""Async jobs in the router's store (SQLite or Redis, ``router.store``): durable, and shared by every
router on the same store. A job submitted on one router is read (status, result, error) on any other; a
finished one survives restarts until its retention ends; one whose router stopped while it was queued or
running is failed by another router's sweep once that router's lease on it lapses (``JobRunner``).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from router.jobs.models import Job, Outcome
from router.store import JobRecord, Store

_DETAIL = ("kind", "model", "owner", "request_id", "callback_url")


def to_record(job: Job) -> JobRecord:
    outcome = None if job.outcome is None else {"status_code": job.outcome.status_code, "body": job.outcome.body}
    return JobRecord(id=job.id, status=job.status, runner=job.runner, lease_until=job.lease_until,
                     created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
                     outcome=outcome, callback_status=job.callback_status,
                     detail={name: getattr(job, name) for name in _DETAIL})


def from_record(record: JobRecord) -> Job:
    outcome = record.outcome
    detail: dict[str, Any] = record.detail
    return Job(**{name: detail.get(name) for name in _DETAIL}, id=record.id,  # type: ignore[arg-type]
               status=record.status, created_at=record.created_at,  # type: ignore[arg-type]
               started_at=record.started_at, finished_at=record.finished_at,
               outcome=None if outcome is None else Outcome(int(outcome["status_code"]), outcome["body"]),
               callback_status=record.callback_status, runner=record.runner,  # type: ignore[arg-type]
               lease_until=record.lease_until)


class StoreJobStore:
    """``JobStore`` on a ``router.store.Store``: each call is one store call (a failure is the store's
    ``Unavailable``, which the API answers with 503)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def add(self, job: Job) -> None:
        await self.store.add_job(to_record(job))

    async def get(self, job_id: str) -> Job | None:
        record = await self.store.get_job(job_id)
        return None if record is None else from_record(record)

    async def save(self, job: Job) -> bool:
        return await self.store.save_job(to_record(job))

    async def renew(self, runner: str, job_ids: Collection[str], until: float) -> None:
        await self.store.renew_jobs(runner, job_ids, until)

    async def fail_orphans(self, now: float, settled_by: str, outcome: Outcome) -> list[Job]:
        settled = await self.store.fail_orphaned_jobs(now, settled_by, {"status_code": outcome.status_code,
                                                                         "body": outcome.body})
        return [from_record(record) for record in settled]

    async def expire(self, now: float, retention_s: float) -> tuple[int, int]:
        return await self.store.expire_jobs(now, retention_s)
