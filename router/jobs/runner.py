"""Runs async jobs: in the background, a bounded number at once, in the batch band; keeps their results
for the retention period.

1. ``submit`` stores the job (status queued) and spawns its task; past ``max_pending`` jobs it refuses.
2. The task waits for one of ``max_concurrent`` slots, then runs (status running) the job's work: the
   synchronous call's own code, admitted as ``batch`` (the API layer forces that class), so a saturated
   version sheds the job's attempt first. ``patiently`` retries such a refusal after its Retry-After,
   up to ``patience_s``: a job waits for spare capacity instead of failing at the first busy moment.
3. Its outcome (the sync call's status and body) is stored: succeeded for a 2xx, else failed; then the
   callback, if any, gets the job's final JSON.
4. A ``PeriodicLoop`` drops results past their retention (``JobStore.expire``).
"""

from __future__ import annotations

import asyncio
import logging
import time
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
                 callbacks: CallbackSender | None = None) -> None:
        self.settings = settings
        self.store: JobStore = store if store is not None else MemoryJobStore()
        self._clock = clock
        self._sleep = sleep
        self._slots = asyncio.Semaphore(settings.max_concurrent)
        self._tasks = Tasks()
        self._pending = 0
        self._callbacks = callbacks or CallbackSender(settings)
        self._sweeper = PeriodicLoop("async job retention sweep", settings.sweep_interval_s, self._sweep_tick)

    @property
    def pending(self) -> int:
        """Jobs queued or running."""
        return self._pending

    def now(self) -> float:
        return self._clock()

    def start(self) -> None:
        self._sweeper.start()

    async def close(self) -> None:
        await self._sweeper.close()
        await self._tasks.cancel_all()
        await self._callbacks.aclose()

    def view(self, job: Job) -> JobView:
        return JobView.of(job, self.settings.retention_s, self._clock())

    async def get(self, job_id: str) -> Job | None:
        return await self.store.get(job_id)

    def check_room(self) -> None:
        """TooManyJobs when one more job would pass ``max_pending`` (checked before the job's work starts)."""
        if self._pending >= self.settings.max_pending:
            raise TooManyJobs(self._pending, self.settings.max_pending, 5)

    async def submit(self, job: Job, work: Work) -> Job:
        """Store ``job`` (queued) and run ``work`` for it in the background."""
        self.check_room()
        self._pending += 1
        try:
            await self.store.add(job)
        except BaseException:
            self._pending -= 1
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

    async def _run(self, job: Job, work: Work) -> None:
        try:
            async with self._slots:
                job.status, job.started_at = "running", self._clock()
                await self.store.save(job)
                try:
                    outcome = await work()
                except asyncio.CancelledError:
                    outcome = Outcome(503, APIError("the router shut down before the job finished; submit it "
                                                    "again", code="job_interrupted").body())
                    await self._finish(job, outcome)
                    raise
                except Exception:
                    logger.exception("async job %s (request %s) failed unexpectedly", job.id, job.request_id)
                    outcome = Outcome(500, APIError(f"internal error; quote request id {job.request_id} when "
                                                    "reporting it").body())
            await self._finish(job, outcome)
        finally:
            self._pending -= 1
        if job.callback_url is not None:
            job.callback_status = "pending"
            delivered = await self._callbacks.send(job.callback_url, self.view(job).model_dump(mode="json"), job.id)
            job.callback_status = "delivered" if delivered else "failed"
            await self.store.save(job)

    async def _finish(self, job: Job, outcome: Outcome) -> None:
        job.outcome, job.finished_at = outcome, self._clock()
        job.status = "succeeded" if outcome.succeeded else "failed"
        await self.store.save(job)
        logger.info("async job %s (request %s) %s with %d", job.id, job.request_id, job.status,
                    outcome.status_code, extra={"request_id": job.request_id})

    async def sweep(self) -> tuple[int, int]:
        """Drop expired results now: (expired, forgotten)."""
        return await self.store.expire(self._clock(), self.settings.retention_s)

    async def _sweep_tick(self) -> None:
        expired, forgotten = await self.sweep()
        if expired or forgotten:
            logger.info("async jobs: %d results expired, %d expired jobs forgotten", expired, forgotten)
