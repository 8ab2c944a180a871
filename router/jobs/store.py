"""Where async jobs live: the ``JobStore`` interface and its two implementations.

``StoreJobStore`` (``router.jobs.durable``) keeps them in the router's store (SQLite or Redis): they
survive a restart and every router sharing the store sees them; the router uses it whenever it has a
store. ``MemoryJobStore`` keeps them in this process (a router without a store: tests, the load tests):
a restart forgets them, and only the router that took a job knows it.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Protocol

from router.jobs.models import Job, Outcome


class JobStore(Protocol):
    async def add(self, job: Job) -> None: ...

    async def get(self, job_id: str) -> Job | None: ...

    async def save(self, job: Job) -> bool:
        """Record the job's new status (and outcome); False when it is no longer ``job.runner``'s to write
        (another router settled it as orphaned, or it expired): nothing was written."""
        ...

    async def renew(self, runner: str, job_ids: Collection[str], until: float) -> None:
        """Extend ``runner``'s lease on those of ``job_ids`` it still runs."""
        ...

    async def fail_orphans(self, now: float, settled_by: str, outcome: Outcome) -> list[Job]:
        """Fail the queued and running jobs whose runner's lease ended before ``now`` (it stopped) with
        ``outcome``; each is settled once, whichever router sweeps. Returns them."""
        ...

    async def expire(self, now: float, retention_s: float) -> tuple[int, int]:
        """Drop the results of jobs finished more than ``retention_s`` ago (their status becomes expired),
        and forget expired jobs after as long again; returns (expired now, forgotten)."""
        ...


class MemoryJobStore:
    """Jobs in a dict of this process: see the module's docstring for what that does not survive. Nobody
    else runs them, so none is ever orphaned (a process that stops takes the dict with it)."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}

    def __len__(self) -> int:
        return len(self._jobs)

    async def add(self, job: Job) -> None:
        self._jobs[job.id] = job

    async def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    async def save(self, job: Job) -> bool:
        self._jobs[job.id] = job
        return True

    async def renew(self, runner: str, job_ids: Collection[str], until: float) -> None:
        for job_id in job_ids:
            if (job := self._jobs.get(job_id)) is not None and job.runner == runner and not job.finished:
                job.lease_until = until

    async def fail_orphans(self, now: float, settled_by: str, outcome: Outcome) -> list[Job]:
        return []

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
