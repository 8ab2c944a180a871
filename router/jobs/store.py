"""Where async jobs live: the ``JobStore`` interface and its one implementation, in this router's memory.

Not durable: a router that restarts forgets its jobs (queued and running ones never finish, finished
results are gone: their ids answer 404), and with several routers a job is visible only on the router
that took it. A store-backed implementation (SQLite or Redis, as ``router.store``) would implement the
same interface.
"""

from __future__ import annotations

from typing import Protocol

from router.jobs.models import Job


class JobStore(Protocol):
    async def add(self, job: Job) -> None: ...

    async def get(self, job_id: str) -> Job | None: ...

    async def save(self, job: Job) -> None:
        """Record the job's new status (and outcome)."""
        ...

    async def expire(self, now: float, retention_s: float) -> tuple[int, int]:
        """Drop the results of jobs finished more than ``retention_s`` ago (their status becomes expired),
        and forget expired jobs after as long again; returns (expired now, forgotten)."""
        ...


class MemoryJobStore:
    """Jobs in a dict of this process: see the module's docstring for what that does not survive."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}

    def __len__(self) -> int:
        return len(self._jobs)

    async def add(self, job: Job) -> None:
        self._jobs[job.id] = job

    async def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    async def save(self, job: Job) -> None:
        self._jobs[job.id] = job

    async def expire(self, now: float, retention_s: float) -> tuple[int, int]:
        expired = forgotten = 0
        for job in list(self._jobs.values()):
            expires_at = job.expires_at(retention_s)
            if expires_at is None or expires_at > now:
                continue
            if job.status == "expired" and expires_at + retention_s <= now:
                del self._jobs[job.id]
                forgotten += 1
            elif job.status != "expired":
                job.status, job.outcome = "expired", None
                expired += 1
        return expired, forgotten
