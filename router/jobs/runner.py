"""Runs async jobs: in the background, a bounded number at once, in the batch band; keeps their results
for the retention period.

1. ``submit`` stores the job (status queued) and spawns its task; past ``max_pending`` jobs it refuses.
2. The task waits for one of ``max_concurrent`` slots, then runs (status running) the job's work: the
   synchronous call's own code, admitted as ``batch`` (the API layer forces that class), so a saturated
   version sheds the job's attempt first. ``patiently`` retries such a refusal after its Retry-After,
   up to ``patience_s``: a job waits for spare capacity instead of failing at the first busy moment.
3. Its outcome (the sync call's status and body) is stored: succeeded for a 2xx, else failed; then the
   callback, if any, gets the job's final JSON.
4. Every third of ``lease_s`` a ``PeriodicLoop`` renews this router's lease on its queued and running jobs
   (``runner_id``: unique to this process, so a restarted router never renews what its predecessor left).
5. Every ``sweep_interval_s`` another renews them too, then fails the jobs of any router whose lease lapsed
   (it stopped: killed, crashed, cut off from the store) with ``job_interrupted``, "submit it again", and
   calls their callbacks; then it drops results past their retention (``JobStore.expire``). With a shared
   store each orphan is settled by one router only, and the stopped router's late writes are refused.

An orphan is failed, not run again: the request's work is a closure over the checked call (its key, its
admission, its body), and a run might have reached the engine before the router stopped; a client that
resubmits decides for itself whether running it twice is right.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

from llmserve.jobs_settings import JobsSettings
from llmserve.loops import PeriodicLoop, Tasks
from router.errors import APIError
from router.jobs.callback import CallbackSender
from router.jobs.errors import TooManyJobs
from router.jobs.models import Job, JobView, Outcome
from router.jobs.store import JobStore, MemoryJobStore

logger = logging.getLogger(__name__)

T = TypeVar("T")
Work = Callable[[], Awaitable[Outcome]]


ORPHANED = ("the router running this job stopped before it finished (its lease on the job lapsed); "
            "submit it again")


def _interrupted() -> Outcome:
    return Outcome(503, APIError("the router shut down before the job finished; submit it again",
                                 code="job_interrupted").body())


def runner_id() -> str:
    """Who runs a job: unique to this process (a restarted router is a new runner)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def _retryable(exc: APIError) -> float | None:
    """The seconds to wait before trying again after a refusal that says when to come back (shedding, a full
    predict queue, no replica ready yet), else None; rate limits are settled at submission."""
    wait = getattr(exc, "retry_after_s", None)
    if exc.status_code in (429, 503) and isinstance(wait, (int, float)):
        return float(wait)
    return None


class JobRunner:
    def __init__(self, settings: JobsSettings, store: JobStore | None = None,
                 clock: Callable[[], float] = time.time, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 callbacks: CallbackSender | None = None, runner: str | None = None) -> None:
        self.settings = settings
        self.store: JobStore = store if store is not None else MemoryJobStore()
        self.runner_id = runner or runner_id()
        self._clock = clock
        self._sleep = sleep
        self._slots = asyncio.Semaphore(settings.max_concurrent)
        self._tasks = Tasks()
        self._mine: dict[str, Job] = {}  # queued or running here
        self._callbacks = callbacks or CallbackSender(settings)
        self._sweeper = PeriodicLoop("async job sweep", settings.sweep_interval_s, self._sweep_tick)
        self._leases = PeriodicLoop("async job leases", settings.lease_s / 3, self.renew)

    @property
    def pending(self) -> int:
        """Jobs queued or running on this router."""
        return len(self._mine)

    def now(self) -> float:
        return self._clock()

    def start(self) -> None:
        self._leases.start()
        self._sweeper.start()

    async def close(self) -> None:
        await self._sweeper.close()
        await self._leases.close()
        await self._tasks.cancel_all()
        await self._callbacks.aclose()

    def view(self, job: Job) -> JobView:
        return JobView.of(job, self.settings.retention_s, self._clock())

    async def get(self, job_id: str) -> Job | None:
        return await self.store.get(job_id)

    def check_room(self) -> None:
        """TooManyJobs when one more job would pass ``max_pending`` (checked before the job's work starts)."""
        if self.pending >= self.settings.max_pending:
            raise TooManyJobs(self.pending, self.settings.max_pending, 5)

    async def submit(self, job: Job, work: Work) -> Job:
        """Store ``job`` (queued, run by this router) and run ``work`` for it in the background."""
        self.check_room()
        job.runner, job.lease_until = self.runner_id, self._clock() + self.settings.lease_s
        self._mine[job.id] = job
        try:
            await self.store.add(job)
        except BaseException:
            del self._mine[job.id]
            raise
        self._tasks.spawn(self._run(job, work), name=f"job {job.id}")
        return job

    async def patiently(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """``attempt()``, tried again after each refusal that carries a Retry-After, until ``patience_s``."""
        give_up_at = time.monotonic() + self.settings.patience_s
        while True:
            try:
                return await attempt()
            except APIError as exc:
                wait = _retryable(exc)
                if wait is None or time.monotonic() + wait > give_up_at:
                    raise
                logger.info("a job's attempt was refused (%s); trying again in %.1fs", exc.code, wait)
                await self._sleep(max(wait, 0.05))

    async def _save(self, job: Job) -> bool:
        if await self.store.save(job):
            return True
        logger.warning("async job %s is no longer this router's to write (another router failed it when this "
                       "router's lease lapsed, or it expired); dropped its status %s", job.id, job.status,
                       extra={"request_id": job.request_id})
        return False

    async def _run(self, job: Job, work: Work) -> None:
        try:
            try:
                await self._slots.acquire()
            except asyncio.CancelledError:  # shut down while queued: say so now, not when the lease lapses
                await self._finish(job, _interrupted())
                raise
            try:
                job.status, job.started_at = "running", self._clock()
                if not await self._save(job):
                    return
                try:
                    outcome = await work()
                except asyncio.CancelledError:
                    await self._finish(job, _interrupted())
                    raise
                except Exception:
                    logger.exception("async job %s (request %s) failed unexpectedly", job.id, job.request_id)
                    outcome = Outcome(500, APIError(f"internal error; quote request id {job.request_id} when "
                                                    "reporting it").body())
            finally:
                self._slots.release()
            if not await self._finish(job, outcome):
                return
        finally:
            self._mine.pop(job.id, None)
        await self._call_back(job)

    async def _call_back(self, job: Job) -> None:
        if job.callback_url is not None:
            job.callback_status = "pending"
            delivered = await self._callbacks.send(job.callback_url, self.view(job).model_dump(mode="json"), job.id)
            job.callback_status = "delivered" if delivered else "failed"
            await self._save(job)

    async def _finish(self, job: Job, outcome: Outcome) -> bool:
        job.outcome, job.finished_at = outcome, self._clock()
        job.status = "succeeded" if outcome.succeeded else "failed"
        if not await self._save(job):
            return False
        logger.info("async job %s (request %s) %s with %d", job.id, job.request_id, job.status,
                    outcome.status_code, extra={"request_id": job.request_id})
        return True

    async def renew(self) -> None:
        """Extend this router's lease on the jobs queued or running here."""
        if self._mine:
            until = self._clock() + self.settings.lease_s
            await self.store.renew(self.runner_id, list(self._mine), until)
            for job in self._mine.values():
                job.lease_until = until

    async def settle_orphans(self) -> list[Job]:
        """Fail the jobs whose router's lease lapsed (this router's renewed first), and call their callbacks."""
        await self.renew()
        outcome = Outcome(503, APIError(ORPHANED, code="job_interrupted").body())
        orphans = await self.store.fail_orphans(self._clock(), self.runner_id, outcome)
        for job in orphans:
            logger.warning("async job %s (request %s) failed: the router running it stopped renewing its lease",
                           job.id, job.request_id, extra={"request_id": job.request_id})
            if job.callback_url is not None:
                self._tasks.spawn(self._call_back(job), name=f"job {job.id} callback")
        return orphans

    async def sweep(self) -> tuple[int, int]:
        """Drop expired results now: (expired, forgotten)."""
        return await self.store.expire(self._clock(), self.settings.retention_s)

    async def _sweep_tick(self) -> None:
        await self.settle_orphans()
        expired, forgotten = await self.sweep()
        if expired or forgotten:
            logger.info("async jobs: %d results expired, %d expired jobs forgotten", expired, forgotten)
