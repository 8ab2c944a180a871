"""Runs batches: one router a batch (a lease in the store), lines in the batch band, only in spare capacity.

1. Every ``scan_interval_s`` (or at once, on ``wake``) a ``PeriodicLoop`` lists the unfinished batches and
   claims those nobody holds (new, or whose router's lease lapsed: it stopped), up to ``max_active`` on this
   router, earliest deadline first (``expires_at``: the batch nearest its window's end runs first). The
   claim is the store's compare-and-change: with several routers on one store, one wins.
2. A claimed batch in ``validating`` reads its input file (missing or unreadable: ``failed``), checks every
   line and counts them; then ``in_progress``. What a line is comes from the batch's endpoint
   (``router.batches.kinds``): an OpenAI request line (``models.parse_line``), or a chunk of a predict
   batch's rows (``rows``), whose ``request_counts`` count rows.
3. The lines the store has not recorded run through ``execute`` (the online API's own code, admitted as
   ``batch``); the bad lines are recorded as errors without running. ``policy.AIMD`` decides how many run at
   once: a refusal with a Retry-After (shed, no replica ready, the key's rate limit) puts the line back and
   pauses the batch. Each answer is recorded in the store once (by line number), so a resumed batch runs
   only what no router recorded, and its output holds every ``custom_id`` exactly once. (A line in flight
   when its router died ran, but was not recorded: it runs again, and is recorded once.)
4. Every ``progress_interval_s`` the batch's ``request_counts`` are written, which renews the lease and
   says whether a client cancelled it. Past ``expires_at``, or once cancelling, nothing new starts; the
   lines in flight finish.
5. ``finalizing``: the output and error files (``router.batches.output``) are written under ids made
   from the batch's, so a router that resumes a finalizing batch rewrites the same files; then
   ``completed``, ``expired`` or ``cancelled``.
On shutdown a router cancels its lines in flight and gives its batches' leases back: the next scan of
any router (or of this one restarted) resumes them.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from llmserve.batches_settings import BatchesSettings
from llmserve.loops import PeriodicLoop, Tasks
from router.batches import output
from router.batches.files import FileStore
from router.batches.kinds import BatchKind, kind_of
from router.batches.models import MAX_ERRORS_SHOWN, Batch, Line
from router.batches.policy import AIMD
from router.batches.rows import InputFileError
from router.errors import APIError
from router.jobs.runner import runner_id
from router.observe.metrics import Metrics, NoMetrics
from router.store.base import BatchRecord, Store

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LineAnswer:
    """What one line got: the status and JSON body the online call answered, and, for a refusal that says
    when to come back (429 or 503 with Retry-After), the seconds to wait before trying it again."""

    status_code: int
    body: dict[str, Any]
    retry_after_s: float | None = None

    @property
    def refused(self) -> bool:
        return self.retry_after_s is not None and self.status_code in (429, 503)


LineExecutor = Callable[[Batch, Line, str], Awaitable[LineAnswer]]


def _deadline(record: BatchRecord) -> tuple[float, float]:
    """The order batches are claimed in: earliest ``expires_at`` first (a batch closer to missing its
    window gets a runner before one with time to spare), then the oldest."""
    return float(record.detail.get("expires_at", float("inf"))), record.created_at


class LostBatch(Exception):
    """This router no longer holds the batch (its lease lapsed and another router took it)."""


class BatchRunner:
    def __init__(self, settings: BatchesSettings, store: Store, files: FileStore, execute: LineExecutor,
                 metrics: Metrics | None = None, clock: Callable[[], float] = time.time,
                 runner: str | None = None) -> None:
        self.settings = settings
        self.store = store
        self.files = files
        self.runner_id = runner or runner_id()
        self._execute = execute
        self._metrics: Metrics = metrics or NoMetrics()
        self._clock = clock
        self._tasks = Tasks()
        self._active: dict[str, asyncio.Task[None]] = {}
        self._windows: dict[str, AIMD] = {}
        self._scanner = PeriodicLoop("batch scan", settings.scan_interval_s, self.scan)
        self._closing = False

    def now(self) -> float:
        return self._clock()

    @property
    def active(self) -> list[str]:
        return list(self._active)

    def window(self, batch_id: str) -> float | None:
        """The batch's concurrency window on this router (None: not running here)."""
        aimd = self._windows.get(batch_id)
        return None if aimd is None else aimd.window

    def start(self) -> None:
        self._scanner.start()

    def wake(self) -> None:
        self._scanner.wake()

    async def close(self) -> None:
        """Stop: lines in flight are cancelled and this router's batches are given back (resumed elsewhere)."""
        self._closing = True
        await self._scanner.close()
        await self._tasks.cancel_all()

    # 1. scan and claim
    async def scan(self) -> None:
        now = self._clock()
        for record in sorted(await self.store.list_batches(), key=_deadline):  # earliest deadline first
            if len(self._active) >= self.settings.max_active or self._closing:
                return
            if not record.unfinished or record.id in self._active:
                continue
            if record.runner and record.runner != self.runner_id and record.lease_until >= now:
                continue
            claimed = await self.store.change_batch(record.id, self._claim)
            if claimed is not None:
                logger.info("batch %s (%s) claimed by %s%s", claimed.id, claimed.status, self.runner_id,
                            f", resumed from {record.runner}" if record.runner else "")
                self._active[claimed.id] = self._tasks.spawn(self._drive(Batch.of(claimed)), name=claimed.id)

    def _claim(self, stored: BatchRecord) -> BatchRecord | None:
        now = self._clock()
        if not stored.unfinished or (stored.runner and stored.runner != self.runner_id and stored.lease_until >= now):
            return None
        return replace(stored, runner=self.runner_id, lease_until=now + self.settings.lease_s)

    async def _save(self, batch: Batch) -> Batch:
        """Write the batch (renewing the lease) if it is still this router's; the stored status wins when a
        client asked to cancel it meanwhile. LostBatch when another router holds it now."""
        batch.lease_until = self._clock() + self.settings.lease_s

        def change(stored: BatchRecord) -> BatchRecord | None:
            if stored.runner != self.runner_id:
                return None
            new = batch.to_record()
            if stored.status == "cancelling" and batch.status in ("validating", "in_progress"):
                new = replace(new, status="cancelling", detail={**new.detail,
                                                                "cancelling_at": stored.detail.get("cancelling_at")})
            return new

        written = await self.store.change_batch(batch.id, change)
        if written is None:
            raise LostBatch(batch.id)
        saved = Batch.of(written)
        batch.status, batch.cancelling_at = saved.status, saved.cancelling_at
        return batch

    async def _release(self, batch_id: str) -> None:
        def change(stored: BatchRecord) -> BatchRecord | None:
            return replace(stored, runner="", lease_until=0.0) if stored.runner == self.runner_id else None

        try:
            await self.store.change_batch(batch_id, change)
        except Exception:
            logger.exception("could not give back batch %s; it resumes once its lease lapses", batch_id)

    # 2-5. one batch
    async def _drive(self, batch: Batch) -> None:
        try:
            await self._run(batch)
        except LostBatch:
            logger.warning("batch %s is no longer this router's (its lease lapsed); another router runs it", batch.id)
        except asyncio.CancelledError:
            await asyncio.shield(self._release(batch.id))
            raise
        except Exception:
            logger.exception("batch %s failed unexpectedly on this router; another scan resumes it", batch.id)
            await self._release(batch.id)
        finally:
            self._active.pop(batch.id, None)
            self._windows.pop(batch.id, None)
            self._report_load()

    def _report_load(self) -> None:
        now = self._clock()
        window = sum(0.0 if aimd.pause_left(now) else aimd.window for aimd in self._windows.values())
        self._metrics.batch_load(len(self._active), window)

    async def _fail(self, batch: Batch, code: str, message: str) -> None:
        batch.errors = [{"code": code, "message": message, "param": "input_file_id", "line": None}]
        batch.status, batch.failed_at = "failed", self._clock()
        await self._save(batch)

    async def _run(self, batch: Batch) -> None:
        kind = kind_of(batch)
        content = await self.files.content(batch.input_file_id)
        if content is None:
            if batch.status in ("validating", "in_progress"):
                await self._fail(batch, "file_not_found", f"input file {batch.input_file_id} is gone")
                return
            lines: list[Line] = []
        else:
            try:
                lines = kind.lines(content, batch)
            except InputFileError as exc:
                await self._fail(batch, exc.code, f"input file {batch.input_file_id}: {exc.message}")
                return
        if batch.status == "validating" and not lines:
            await self._fail(batch, "empty_file", f"input file {batch.input_file_id} has no request lines")
            return
        if batch.status == "validating":
            batch.total = kind.total(lines)
            bad = [line.error for line in lines if line.error is not None]
            batch.errors = [{**e, "param": None} for e in bad[:MAX_ERRORS_SHOWN]]
            batch.status, batch.in_progress_at = "in_progress", self._clock()
            await self._save(batch)
        records = {record.line: record for record in await self.store.batch_lines(batch.id)}
        await self._record(batch, kind, [output.unrunnable(line) for line in lines
                                         if line.error is not None and line.number not in records])
        records = {record.line: record for record in await self.store.batch_lines(batch.id)}
        tallies = [kind.counts(r) for r in records.values()]
        batch.completed, batch.failed = sum(c for c, _ in tallies), sum(f for _, f in tallies)
        todo = [line for line in lines if line.error is None and line.number not in records]
        if batch.status == "in_progress":
            await self._run_lines(batch, kind, todo)
        await self._finalize(batch, kind, lines)

    async def _record(self, batch: Batch, kind: BatchKind, records: list[output.BatchLineRecord]) -> None:
        added = await self.store.add_batch_lines(batch.id, records) if records else 0
        if added and len(records) == 1:
            completed, failed = kind.counts(records[0])
            batch.completed += completed
            batch.failed += failed
            self._metrics.batch_line("completed" if output.succeeded(records[0]) else "failed")

    def _stopping(self, batch: Batch) -> bool:
        return batch.status != "in_progress" or self._clock() >= batch.expires_at

    async def _run_lines(self, batch: Batch, kind: BatchKind, todo: list[Line]) -> None:
        aimd = self._windows[batch.id] = AIMD(self.settings.max_concurrency, self.settings.min_pause_s)
        pending = collections.deque(todo)
        in_flight: dict[asyncio.Task[LineAnswer], tuple[Line, str]] = {}
        next_save = self._clock() + self.settings.progress_interval_s
        try:
            while pending or in_flight:
                now = self._clock()
                if not self._stopping(batch):
                    for _ in range(min(aimd.room(now, len(in_flight)), len(pending))):
                        line = pending.popleft()
                        request_id = f"{output.line_id(batch.id, line.number)}-{int(now * 1000) % 100000}"
                        in_flight[asyncio.ensure_future(self._answer(batch, line, request_id))] = (line, request_id)
                elif not in_flight:
                    break
                timeout = max(0.01, min(next_save - now, aimd.pause_left(now) or self.settings.progress_interval_s))
                if in_flight:
                    done, _ = await asyncio.wait(in_flight, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                else:
                    done = set()
                    await asyncio.sleep(timeout)
                for task in done:
                    line, request_id = in_flight.pop(task)
                    answer = task.result()
                    if answer.refused:
                        aimd.refused(self._clock(), answer.retry_after_s)
                        pending.appendleft(line)
                        self._metrics.batch_line("refused")
                        continue
                    aimd.succeeded()
                    await self._record(batch, kind, [output.ran(line, request_id, answer.status_code, answer.body)])
                if self._clock() >= next_save:
                    await self._save(batch)
                    next_save = self._clock() + self.settings.progress_interval_s
                    self._report_load()
        finally:
            for task in in_flight:
                task.cancel()
            if in_flight:
                await asyncio.gather(*in_flight, return_exceptions=True)

    async def _answer(self, batch: Batch, line: Line, request_id: str) -> LineAnswer:
        try:
            return await self._execute(batch, line, request_id)
        except Exception:
            logger.exception("batch %s line %d (request %s) failed unexpectedly", batch.id, line.number, request_id)
            error = APIError(f"internal error; quote request id {request_id} when reporting it")
            return LineAnswer(error.status_code, error.body())

    async def _finalize(self, batch: Batch, kind: BatchKind, lines: list[Line]) -> None:
        now = self._clock()
        if batch.status in ("cancelling", "cancelled") or batch.cancelling_at is not None:
            final = "cancelled"  # cancelling_at says so too for a batch resumed while finalizing
        elif batch.status == "expired" or (now >= batch.expires_at and
                                           batch.completed + batch.failed < batch.total):
            final = "expired"
        else:
            final = "completed"
        if batch.status != "finalizing":
            batch.status, batch.finalizing_at = "finalizing", now
            await self._save(batch)
        records = await self.store.batch_lines(batch.id)
        out, errors = kind.render(batch.id, records, lines, final)
        stem = batch.id.removeprefix("batch_")
        if out:
            batch.output_file_id = (await self.files.save(out, f"{batch.id}_output.jsonl", "batch_output",
                                                          batch.owner, file_id=f"file-{stem}-output")).id
        if errors:
            batch.error_file_id = (await self.files.save(errors, f"{batch.id}_error.jsonl", "batch_output",
                                                         batch.owner, file_id=f"file-{stem}-error")).id
        batch.status = final  # type: ignore[assignment]
        setattr(batch, f"{final}_at", self._clock())
        await self._save(batch)
        self._metrics.batch_finished(final)
        logger.info("batch %s %s: %d completed, %d failed of %d", batch.id, final, batch.completed, batch.failed,
                    batch.total)
