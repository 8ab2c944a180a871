"""The SQLite store's async jobs: a mixin of ``SQLiteStore`` whose methods run in its transactions.

One row a job: the columns the sweeps select by (status, runner, lease, finish time) and the rest of the
record as JSON. Every router on the same file sees every job; each change is one ``BEGIN IMMEDIATE``
transaction, so a renewal and an orphan sweep, or two sweeps, cannot both win.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Callable, Collection
from typing import Any, Protocol, TypeVar

from router.store.base import UNFINISHED_JOB_STATUSES, Conflict, JobRecord

T = TypeVar("T")
_COLUMNS = ("id", "status", "runner", "lease_until", "finished_at")
_UNFINISHED = f"status IN ({', '.join(repr(s) for s in UNFINISHED_JOB_STATUSES)})"


class _Transactions(Protocol):
    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T: ...

    async def _write(self, fn: Callable[[sqlite3.Connection], T], changed: str | None = None) -> T: ...


def _row(job: JobRecord) -> tuple[Any, ...]:
    data = {k: v for k, v in job.to_dict().items() if k not in _COLUMNS}
    return job.id, job.status, job.runner, job.lease_until, job.finished_at, json.dumps(data)


def _record(row: tuple[Any, ...]) -> JobRecord:
    return JobRecord(**dict(zip(_COLUMNS, row[:5], strict=True)), **json.loads(row[5]))


def _select(db: sqlite3.Connection, where: str, args: tuple[Any, ...]) -> list[JobRecord]:
    rows = db.execute(f"SELECT {', '.join(_COLUMNS)}, data FROM jobs WHERE {where}", args).fetchall()
    return [_record(r) for r in rows]


def _update(db: sqlite3.Connection, job: JobRecord, where: str = "", args: tuple[Any, ...] = ()) -> bool:
    row = _row(job)
    cursor = db.execute("UPDATE jobs SET status = ?, runner = ?, lease_until = ?, finished_at = ?, data = ? "
                        f"WHERE id = ?{where}", (*row[1:], job.id, *args))
    return cursor.rowcount > 0


class SQLiteJobs:
    """The ``Store`` job methods of ``SQLiteStore``."""

    async def add_job(self: _Transactions, job: JobRecord) -> None:
        def insert(db: sqlite3.Connection) -> None:
            try:
                db.execute("INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?)", _row(job))
            except sqlite3.IntegrityError:
                raise Conflict(f"async job {job.id!r} exists") from None

        await self._write(insert)

    async def get_job(self: _Transactions, job_id: str) -> JobRecord | None:
        found = await self._run(lambda db: _select(db, "id = ?", (job_id,)))
        return found[0] if found else None

    async def save_job(self: _Transactions, job: JobRecord) -> bool:
        return await self._write(lambda db: _update(db, job, " AND runner = ? AND status != 'expired'",
                                                    (job.runner,)))

    async def renew_jobs(self: _Transactions, runner: str, job_ids: Collection[str], until: float) -> int:
        def renew(db: sqlite3.Connection) -> int:
            renewed = 0
            for job_id in job_ids:
                cursor = db.execute(f"UPDATE jobs SET lease_until = ? WHERE id = ? AND runner = ? AND {_UNFINISHED}",
                                    (until, job_id, runner))
                renewed += cursor.rowcount
            return renewed

        return await self._write(renew) if job_ids else 0

    async def fail_orphaned_jobs(self: _Transactions, now: float, settled_by: str, outcome: dict[str, Any]
                                 ) -> list[JobRecord]:
        def fail(db: sqlite3.Connection) -> list[JobRecord]:
            settled = [dataclasses.replace(job, status="failed", runner=settled_by, finished_at=now, outcome=outcome)
                       for job in _select(db, f"{_UNFINISHED} AND lease_until < ?", (now,))]
            for job in settled:
                _update(db, job)
            return settled

        return await self._write(fail)

    async def expire_jobs(self: _Transactions, now: float, retention_s: float) -> tuple[int, int]:
        def expire(db: sqlite3.Connection) -> tuple[int, int]:
            # deleted first: a job expired by this very call stays (expired) until the next one
            deleted = db.execute("DELETE FROM jobs WHERE status = 'expired' AND finished_at + ? <= ?",
                                 (2 * retention_s, now)).rowcount
            due = _select(db, "status IN ('succeeded', 'failed') AND finished_at + ? <= ?", (retention_s, now))
            for job in due:
                _update(db, dataclasses.replace(job, status="expired", outcome=None))
            return len(due), deleted

        return await self._write(expire)
